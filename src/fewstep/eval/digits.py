"""Fixed quality protocol for generated 8x8 digits (so figures compare across runs and code versions).

Classifier
    An MLP 64-256-256-10 (ReLU, dropout 0.2) trained on the 1,500-image train
    split of :func:`~fewstep.data.digits_split.load_digits_split` — CPU, seed 0,
    Adam (lr 1e-3), batch 64, ``CLASSIFIER_PROTOCOL["epochs"]`` epochs (~1 s on
    2 cores; held-out accuracy ~0.97). Cached after the first training in
    ``$FEWSTEP_CACHE`` (default ``~/.cache/fewstep``) as
    ``digits_mlp_<hash>.pt``, the hash covering the whole protocol, so changing
    the protocol invalidates old files. An unreadable cache file is retrained
    with a warning.

Metrics (:meth:`DigitsEvaluator.evaluate`), samples in data space clamped to [-1, 1]:
    ``acc``        fraction classified as the intended label;
    ``fd``         digits-FD: Fréchet distance between the 256-d penultimate
                   features (post-ReLU 2nd hidden layer, eval mode) of the
                   samples and of all 1,797 real digits;
    ``pixel_fd``   Fréchet distance on the raw 64 pixels vs all real digits;
    ``precision``, ``recall``  k-NN (k=5) manifold precision/recall on the
                   256-d features vs all real digits.

Callers generate ``EVAL_N`` = 1,000 samples with labels :func:`eval_labels`
(100 per class) from noise :func:`eval_noise` (seed ``EVAL_NOISE_SEED``).
:meth:`DigitsEvaluator.reference_points` gives the floor (1,000 real digits)
and ceiling (1,000 clamped N(0, 1) noise images) measured with the same code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewstep.data.digits_split import NUM_CLASSES, load_digits_split
from fewstep.eval.metrics import feature_stats, frechet_distance_from_stats, knn_radii, manifold_coverage

log = logging.getLogger(__name__)

EVAL_N = 1000
EVAL_NOISE_SEED = 1234
PR_K = 5
FLOOR_SEED = 0

CLASSIFIER_PROTOCOL: dict[str, Any] = {
    "name": "digits_mlp",
    "version": 1,
    "layers": [64, 256, 256, 10],
    "activation": "relu",
    "dropout": 0.2,
    "optimizer": "adam",
    "lr": 1e-3,
    "batch_size": 64,
    "epochs": 30,
    "seed": 0,
    "data": "load_digits_split/x_train (1500, stratified, seed 0, [-1,1])",
}


def protocol_hash(protocol: dict[str, Any] | None = None) -> str:
    """Short sha256 of the classifier protocol (architecture, training recipe, seed)."""
    blob = json.dumps(protocol or CLASSIFIER_PROTOCOL, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$FEWSTEP_CACHE`` if set, else ``~/.cache/fewstep``."""
    env = os.environ.get("FEWSTEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fewstep"


def classifier_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the trained classifier for the current protocol is (or will be) cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"digits_mlp_{protocol_hash()}.pt"


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch (and numpy's BLAS, via threadpoolctl when available) on one thread, then restore.

    The protocol's nets and matrices are tiny: one thread is as fast as many on an idle
    machine and many times faster on a busy one (spinning worker threads), and it pins
    the summation order so the classifier trains bit-identically everywhere.
    """
    try:
        from threadpoolctl import threadpool_limits

        blas = threadpool_limits(limits=1)
    except Exception:  # noqa: BLE001 - optional
        blas = nullcontext()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with blas:
            yield
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- classifier


class DigitsMLP(nn.Module):
    """64-256-256-10 MLP; :meth:`features` is the post-ReLU 2nd hidden layer (the digits-FD space)."""

    def __init__(self, hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, NUM_CLASSES)
        self.drop = nn.Dropout(dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.fc1(x.reshape(x.shape[0], -1))))
        return torch.relu(self.fc2(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


def _build_classifier() -> DigitsMLP:
    p = CLASSIFIER_PROTOCOL
    return DigitsMLP(hidden=p["layers"][1], dropout=p["dropout"])


def train_classifier() -> DigitsMLP:
    """Train the protocol classifier from scratch (deterministic, CPU; global RNG state left untouched)."""
    p = CLASSIFIER_PROTOCOL
    d = load_digits_split()
    t0 = time.perf_counter()
    # grad on even when called lazily from a caller's no_grad / inference_mode block
    with single_thread(), torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        x = torch.from_numpy(d["x_train"]).float()
        y = torch.from_numpy(d["y_train"]).long()
        torch.manual_seed(p["seed"])  # init and dropout masks
        model = _build_classifier()
        opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
        g = torch.Generator().manual_seed(p["seed"])  # batch order
        model.train()
        for _ in range(p["epochs"]):
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0], p["batch_size"]):
                idx = perm[i : i + p["batch_size"]]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval().requires_grad_(False)
    log.info("trained digits classifier in %.2f s", time.perf_counter() - t0)
    return model


def _load_cached(path: Path) -> DigitsMLP:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("protocol_hash") != protocol_hash():
        raise ValueError("not a classifier file of the current protocol")
    model = _build_classifier()
    model.load_state_dict(blob["state_dict"], strict=True)
    if not all(torch.isfinite(t).all() for t in model.state_dict().values()):
        raise ValueError("non-finite weights")
    return model.eval().requires_grad_(False)


def _save_cached(model: DigitsMLP, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"protocol_hash": protocol_hash(), "state_dict": model.state_dict()}, f)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # atomic: concurrent processes never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(f"could not cache the digits classifier at {path}: {e}", stacklevel=3)


_MEMO: dict[Path, DigitsMLP] = {}


def load_classifier(cache_dir: str | os.PathLike | None = None, *, retrain: bool = False) -> DigitsMLP:
    """The protocol classifier (eval mode, CPU, frozen): from the in-process memo, the cache file, or trained.

    A cache file that cannot be loaded (corrupt, truncated, wrong protocol) is
    retrained and overwritten with a warning, never an error.
    """
    path = classifier_cache_path(cache_dir).resolve()
    if not retrain and path in _MEMO:
        return _MEMO[path]
    model = None
    if not retrain and path.exists():
        try:
            model = _load_cached(path)
        except Exception as e:  # noqa: BLE001 - any unreadable cache means "retrain"
            reason = f"{type(e).__name__}: {str(e).strip()[:120]}"
            warnings.warn(f"digits classifier cache {path} is unreadable ({reason}); retraining", stacklevel=2)
    if model is None:
        model = train_classifier()
        _save_cached(model, path)
    _MEMO[path] = model
    return model


# ----------------------------------------------------------------------------- protocol helpers


def eval_labels(n: int = EVAL_N) -> torch.Tensor:
    """Protocol labels: ``0, 1, ..., 9, 0, 1, ...`` (100 per class for n = 1,000), int64."""
    return torch.arange(n, dtype=torch.long) % NUM_CLASSES


def eval_noise(
    shape: int | tuple[int, ...] | torch.Size,
    n: int = EVAL_N,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The protocol's fixed noise: (n, *shape) N(0, 1) drawn on the CPU from a generator seeded ``EVAL_NOISE_SEED``."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    return torch.randn((n, *shape), generator=g).to(device=device, dtype=dtype)


def _to_pixels(x: Any) -> torch.Tensor:
    """Samples (N, 64) / (N, 8, 8) / (N, 1, 8, 8), tensor or array -> finite CPU float32 (N, 64) in [-1, 1]."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to(device="cpu", dtype=torch.float32)
    if t.ndim < 2 or t[0].numel() != 64:
        raise ValueError(f"digits samples must be (N, 64), (N, 8, 8) or (N, 1, 8, 8); got {tuple(t.shape)}")
    t = t.reshape(t.shape[0], 64)
    bad = ~torch.isfinite(t)
    if bad.any():
        warnings.warn(f"{int(bad.sum())} non-finite sample values replaced (nan->0, +-inf->+-1)", stacklevel=3)
        t = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0)
    return t.clamp(-1.0, 1.0)


def _to_labels(y: Any, n: int) -> np.ndarray:
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    arr = arr.reshape(-1).astype(np.int64)
    if arr.shape[0] != n:
        raise ValueError(f"got {arr.shape[0]} labels for {n} samples")
    return arr


# ----------------------------------------------------------------------------- evaluator


class DigitsEvaluator:
    """Scores generated digits against all 1,797 real ones; see the module docstring for the protocol.

    ``evaluate(x, y)`` returns ``{"acc", "fd", "pixel_fd", "precision", "recall"}``
    (floats; ``acc`` is NaN when ``y`` is None). Real-digit statistics are computed
    once per evaluator. Everything runs on the CPU in float64 statistics.
    """

    def __init__(
        self,
        classifier: DigitsMLP | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        k: int = PR_K,
        batch_size: int = 2048,
    ) -> None:
        self._classifier = classifier
        self.cache_dir = cache_dir
        self.k = int(k)
        self.batch_size = int(batch_size)
        self._real: dict[str, np.ndarray] | None = None
        self._refpoints: dict[str, dict[str, float]] | None = None

    @property
    def classifier(self) -> DigitsMLP:
        if self._classifier is None:
            self._classifier = load_classifier(self.cache_dir)
        return self._classifier

    @torch.no_grad()
    def _forward(self, pix: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, 256) float64, predicted labels (N,)) of clamped pixels."""
        model = self.classifier.eval()
        feats, preds = [], []
        with single_thread():
            for i in range(0, pix.shape[0], self.batch_size):
                f = model.features(pix[i : i + self.batch_size])
                feats.append(f.double().numpy())
                preds.append(model.head(f).argmax(dim=1).numpy())
        return np.concatenate(feats), np.concatenate(preds)

    def features(self, x: Any) -> np.ndarray:
        """Penultimate features (N, 256), float64, of samples ``x`` (clamped to [-1, 1])."""
        return self._forward(_to_pixels(x))[0]

    def predict(self, x: Any) -> np.ndarray:
        """Predicted class (N,) of samples ``x`` (clamped to [-1, 1])."""
        return self._forward(_to_pixels(x))[1]

    @property
    def real_stats(self) -> dict[str, np.ndarray]:
        """Cached statistics of all 1,797 real digits: features, their mean/cov/k-NN radii, pixel mean/cov."""
        if self._real is None:
            pix = torch.from_numpy(load_digits_split()["x_all"]).float()
            feats, _ = self._forward(pix)
            with single_thread():
                mu, sigma = feature_stats(feats)
                pmu, psigma = feature_stats(pix.double().numpy())
                radii = knn_radii(feats, self.k)
            self._real = {
                "feats": feats,
                "mu": mu,
                "sigma": sigma,
                "radii": radii,
                "pixel_mu": pmu,
                "pixel_sigma": psigma,
            }
        return self._real

    def evaluate(self, x: Any, y: Any = None) -> dict[str, float]:
        """Score samples ``x`` (N, 64) / (N, 8, 8) / (N, 1, 8, 8) in data space with intended labels ``y`` (N,)."""
        pix = _to_pixels(x)
        n = pix.shape[0]
        if n <= self.k:
            raise ValueError(f"need more than k={self.k} samples to evaluate, got {n}")
        real = self.real_stats
        feats, preds = self._forward(pix)
        acc = float((preds == _to_labels(y, n)).mean()) if y is not None else float("nan")
        with single_thread():
            mu, sigma = feature_stats(feats)
            pmu, psigma = feature_stats(pix.double().numpy())
            return {
                "acc": acc,
                "fd": frechet_distance_from_stats(mu, sigma, real["mu"], real["sigma"]),
                "pixel_fd": frechet_distance_from_stats(pmu, psigma, real["pixel_mu"], real["pixel_sigma"]),
                "precision": manifold_coverage(real["feats"], real["radii"], feats),
                "recall": manifold_coverage(feats, knn_radii(feats, self.k), real["feats"]),
            }

    def reference_points(self) -> dict[str, dict[str, float]]:
        """``{"floor": metrics, "ceiling": metrics}``, measured (cached per evaluator).

        floor: 1,000 real digits (100 per class, drawn without replacement with
        ``np.random.default_rng(0)`` from all 1,797) with their true labels.
        ceiling: :func:`eval_noise` ``((64,), 1000)`` (N(0, 1), clamped) with :func:`eval_labels`.
        """
        if self._refpoints is None:
            x, y = floor_samples()
            self._refpoints = {
                "floor": self.evaluate(x, y),
                "ceiling": self.evaluate(eval_noise((64,), EVAL_N), eval_labels(EVAL_N)),
            }
        return self._refpoints


def floor_samples(n: int = EVAL_N, seed: int = FLOOR_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real digits (n/10 per class where possible, topped up at random) and their labels, drawn with ``seed``."""
    d = load_digits_split()
    x_all, y_all = d["x_all"], d["y_all"]
    rng = np.random.default_rng(seed)
    per_class = n // NUM_CLASSES
    picked = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y_all == c)
        picked.append(rng.choice(idx, size=min(per_class, idx.size), replace=False))
    chosen = np.concatenate(picked)
    if chosen.size < n:
        rest = np.setdiff1d(np.arange(y_all.size), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, size=min(n - chosen.size, rest.size), replace=False)])
    return x_all[chosen], y_all[chosen]
