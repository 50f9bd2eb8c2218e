"""Small networks for the embedded default and the tests.

``TinyMLP`` is a residual MLP with adaptive layer norm: the conditioning
vector (time, target time, class label) scales and shifts every block and the output layer, and
sets per-pixel gains on a direct path from ``x_t`` to the output (``input_skip``). With
``time_pair=True`` (objectives that need it) it also embeds the target time
``tt`` and the time sign; otherwise it is a vanilla flow-matching net and
ignores ``tt``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def fourier_features(t: torch.Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of a (B,) signal scaled to [0, scale] (1000: as in diffusion models)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(emb_dim, 3 * width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(2 * width, width)
        )
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(emb).chunk(3, dim=-1)
        return h + (1 + gate) * self.mlp(self.norm(h) * (1 + scale) + shift)


class TinyMLP(nn.Module):
    """Residual MLP velocity model ``f(x_t, t, tt, label) -> v`` for flat or small image data.

    Labels ``0..num_classes-1`` are classes; label ``num_classes`` is the null
    (unconditional) token.
    """

    def __init__(
        self,
        data_shape: list[int] | tuple[int, ...],
        num_classes: int = 10,
        width: int = 256,
        depth: int = 3,
        emb_dim: int = 128,
        dropout: float = 0.0,
        time_pair: bool = True,
        prediction_type: str = "flow",
        input_skip: bool = True,
        out_modulation: bool = True,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        if prediction_type != "flow":
            raise ValueError(
                f"TinyMLP predicts a flow velocity; model.prediction_type={prediction_type!r} must be 'flow'"
            )
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = int(num_classes)
        self.time_pair = bool(time_pair)
        self.emb_dim = emb_dim
        # The time features see t·time_scale. 1000 (diffusion convention) has large d/dt; sCM needs a small
        # scale (its c_noise(t) = t) or its JVP tangent explodes (docs/objectives.md).
        self.time_scale = float(time_scale)
        dim = math.prod(self.data_shape)
        self.inp = nn.Linear(dim, width)
        self.label_emb = nn.Embedding(self.num_classes + 1, emb_dim)
        n_time = 2 if self.time_pair else 1
        self.time_mlp = nn.Sequential(nn.Linear(n_time * emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if self.time_pair:
            # 2-row sign embedding (row 0: t >= 0 real trajectory, row 1: t < 0 fake); zero-initialised.
            self.sign_emb = nn.Embedding(2, emb_dim)
            nn.init.zeros_(self.sign_emb.weight)
        self.blocks = nn.ModuleList([ResBlock(width, emb_dim, dropout) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, dim)
        # adaLN shift/scale of the normalised features before the output layer (as DiT's final layer)
        self.out_mod = nn.Linear(emb_dim, 2 * width) if out_modulation else None
        # Per-pixel gains on the input, set by the conditioning: the output LayerNorm rescales every
        # sample, so without this path the net cannot pass x_t (at t = 1: the noise z, which the
        # velocity z - x contains) through at its own scale.
        self.skip = nn.Linear(emb_dim, dim) if input_skip else None
        for layer in (self.out, self.out_mod, self.skip):  # zero-initialised: the output starts at 0
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def adapt_initial_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``trainer.init_from`` of a run without the time-pair embedding (flow matching) into this model: the
        target-time features get zero input columns in ``time_mlp.0`` (the sign embedding is zero already), so
        the loaded model computes exactly what the vanilla one did, whatever ``tt``."""
        key = "time_mlp.0.weight"
        w = weights.get(key)
        if self.time_pair and w is not None and w.shape == (self.emb_dim, self.emb_dim):
            weights = dict(weights)
            weights[key] = torch.cat([w, torch.zeros_like(w)], dim=1)
        return weights

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b = x_t.shape[0]
        feats = [fourier_features(t.abs(), self.emb_dim, scale=self.time_scale)]
        if self.time_pair:
            feats.append(fourier_features(tt.abs(), self.emb_dim, scale=self.time_scale))
        emb = self.time_mlp(torch.cat(feats, dim=-1).to(x_t.dtype)) + self.label_emb(cond)
        if self.time_pair:
            emb = emb + self.sign_emb((t < 0).long())
        emb = torch.nn.functional.silu(emb)
        flat = x_t.reshape(b, -1)
        h = self.inp(flat)
        for block in self.blocks:
            h = block(h, emb)
        h = self.out_norm(h)
        if self.out_mod is not None:
            shift, scale = self.out_mod(emb).chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        out = self.out(h)
        if self.skip is not None:
            out = out + self.skip(emb) * flat
        return out.reshape(x_t.shape)
