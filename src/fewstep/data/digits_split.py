"""scikit-learn's 1,797 real 8×8 handwritten digits with the fixed split.

The images ship inside scikit-learn (no download). Pixels 0..16 are scaled to
[-1, 1]; the split is stratified with seed 0: 1,500 train, 297 held out. The
evaluator and the training data module both read it from here, so their
splits can never drift apart.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

NUM_CLASSES = 10
SIDE = 8
TRAIN_SIZE = 1500


@lru_cache(maxsize=1)
def load_digits_split() -> dict[str, np.ndarray]:
    """Return ``x_train, y_train, x_test, y_test, x_all, y_all`` (float32 in [-1, 1], int64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data.astype(np.float32) / 8.0) - 1.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, train_size=TRAIN_SIZE, stratify=y, random_state=0)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, "x_all": x, "y_all": y}
