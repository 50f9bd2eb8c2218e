"""The sklearn digits as a captioned RGB image folder, and generated images back to 8×8 digits.

:func:`write_digit_folder` writes the 1,500 training digits of :func:`~fewstep.data.digits_split.load_digits_split`
(the 297 held-out ones never) as ``side``-pixel grey RGB PNGs, each 8×8 pixel a ``side/8`` square, with a
``metadata.jsonl`` of ``{"file_name", "text"}`` rows that ``python -m fewstep.precompute images=DIR`` reads. The
captions name the digit in one of :data:`PHRASINGS`, cycling through them. :func:`to_digits` is the way back:
RGB images in [0, 1] → channel mean → mean over each square → the evaluator's [-1, 1] scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fewstep.data.digits_split import NUM_CLASSES, SIDE, load_digits_split

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = ("a handwritten {word}", "the digit {n}", "a {word}", "the number {word}")


def caption(label: int, phrasing: int) -> str:
    """The caption of digit ``label`` in phrasing ``phrasing`` (modulo the number of phrasings)."""
    return PHRASINGS[phrasing % len(PHRASINGS)].format(word=WORDS[label], n=label)


def prompts_for(labels) -> list[str]:
    """One prompt per label, the phrasings taken in turn within each class (label ``y`` at its k-th occurrence
    gets phrasing ``k``), so every class is asked for in every phrasing."""
    seen = [0] * NUM_CLASSES
    out = []
    for y in labels:
        y = int(y)
        out.append(caption(y, seen[y]))
        seen[y] += 1
    return out


def vocabulary() -> list[str]:
    """Every word of every caption (for the demo's word-level tokenizers)."""
    words = set()
    for label in range(NUM_CLASSES):
        for p in range(len(PHRASINGS)):
            words.update(caption(label, p).split())
    return sorted(words)


def to_rgb(x: np.ndarray, side: int) -> np.ndarray:
    """Digits (N, 64) in [-1, 1] → uint8 RGB (N, side, side, 3), each digit pixel a ``side/8`` square."""
    if side % SIDE:
        raise ValueError(f"side={side} must be a multiple of {SIDE}")
    grey = np.clip((np.asarray(x, dtype=np.float32).reshape(-1, SIDE, SIDE) + 1.0) * 127.5, 0, 255)
    grey = np.round(grey).astype(np.uint8)
    big = grey.repeat(side // SIDE, axis=1).repeat(side // SIDE, axis=2)
    return np.repeat(big[..., None], 3, axis=-1)


def to_digits(images: np.ndarray) -> np.ndarray:
    """RGB images (N, H, W, 3) in [0, 1] (a pipeline's ``output_type="np"``) → digits (N, 64) in [-1, 1]: the
    channel mean averaged over each (H/8)×(W/8) square."""
    images = np.asarray(images, dtype=np.float64)
    n, h, w, _ = images.shape
    if h % SIDE or w % SIDE:
        raise ValueError(f"images of {h}x{w} pixels do not split into {SIDE}x{SIDE} squares")
    grey = images.mean(axis=-1).reshape(n, SIDE, h // SIDE, SIDE, w // SIDE).mean(axis=(2, 4))
    return (grey.reshape(n, SIDE * SIDE) * 2.0 - 1.0).astype(np.float32)


def write_digit_folder(folder: str | Path, side: int = 32) -> Path:
    """The training digits as PNGs ``{index:04d}_{label}.png`` with captions in ``metadata.jsonl``; the folder.
    Written once: a folder whose ``metadata.jsonl`` exists is left as it is."""
    from PIL import Image

    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if meta.exists():
        return folder
    d = load_digits_split()
    x, y = d["x_train"], d["y_train"]
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (rgb, text) in enumerate(zip(to_rgb(x, side), prompts_for(y), strict=True)):
        name = f"{i:04d}_{int(y[i])}.png"
        Image.fromarray(rgb).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": text}))
    tmp = meta.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    tmp.replace(meta)  # last: a folder with metadata.jsonl is complete
    return folder
