"""Sample grids: image grids for image-like data, scatter plots for 2-D data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def save_samples(x: torch.Tensor, path: str | Path, title: str = "", nrow: int | None = None, data=None) -> Path:
    """Write samples in data space ([-1, 1]) as a PNG: a grid of images, or a scatter for (N, 2), drawn over
    the data's own points when ``data`` has ``reference_points()`` (toy2d)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = x.detach().float().cpu()
    if x.ndim == 2 and x.shape[1] == 2:
        reference = data.reference_points().numpy() if hasattr(data, "reference_points") else None
        return _scatter(x.numpy(), path, title, reference)
    return _image_grid(x, path, nrow)


def _image_grid(x: torch.Tensor, path: Path, nrow: int | None) -> Path:
    from PIL import Image

    if x.ndim == 2:  # flat vectors of a square image
        side = int(math.isqrt(x.shape[1]))
        x = x.reshape(-1, 1, side, side)
    if x.ndim == 3:
        x = x[:, None]
    n, c, h, w = x.shape
    if c not in (1, 3):  # latents: show the first channel
        x, c = x[:, :1], 1
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    pad = 1
    canvas = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad) * 0.5
    imgs = ((x.clamp(-1, 1) + 1) / 2).numpy()
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = (
            torch.from_numpy(imgs[i])
        )
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    scale = max(1, 512 // max(img.size))
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
    img.save(path)
    return path


def _scatter(points: np.ndarray, path: Path, title: str, reference: np.ndarray | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.3, c="0.7", label="data")
    ax.scatter(points[:, 0], points[:, 1], s=4 if reference is not None else 2, alpha=0.8, c="C0", label="samples")
    if reference is not None:
        ax.legend(loc="upper right", fontsize=7, markerscale=3)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
