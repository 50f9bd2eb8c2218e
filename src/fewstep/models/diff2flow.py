"""diff2flow bridge (SPEC §5): epsilon / v-prediction diffusion models seen as flow-matching models.

A diffusion state ``x_diff = √ᾱ·x + √(1 − ᾱ)·ε`` is, up to the scale ``√ᾱ + √(1 − ᾱ)``,
the flow state ``x_t = t·z + (1 − t)·x`` at flow time

    ``t = σ(ᾱ) = √(1 − ᾱ) / (√ᾱ + √(1 − ᾱ))``, inverse ``ᾱ(t) = (1 − t)² / ((1 − t)² + t²)``,

with ``z = ε`` and ``x_diff = (√ᾱ + √(1 − ᾱ))·x_flow``. A prediction at that state
becomes a flow velocity ``ε̂ − x̂0`` with
epsilon: ``x̂0 = (x_diff − √(1 − ᾱ)·ε̂)/√ᾱ``; v: ``x̂0 = √ᾱ·x_diff − √(1 − ᾱ)·v̂``,
``ε̂ = √ᾱ·v̂ + √(1 − ᾱ)·x_diff``.

The model is fed the (continuous) diffusion timestep whose ᾱ matches, found by
interpolating the scheduler's ``alphas_cumprod`` table
(:func:`diffusion_timestep_from_flow_time`); the state arithmetic uses ``ᾱ(t)``
exactly. Used by ``TwinFlowScheduler`` and by the model-side bridge.
"""

from __future__ import annotations

import math

import torch

from fewstep.path import expand_like

PREDICTION_TYPES = ("flow_matching", "epsilon", "v_prediction")


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    trained_betas: list[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """ᾱ_k (float64, k = 0..T−1) for the diffusers beta schedules: linear, scaled_linear, squaredcos_cap_v2;
    ``rescale_betas_zero_snr``: √ᾱ shifted and scaled so that ᾱ_0 is kept and ᾱ_{T−1} = 0 (zero terminal SNR)."""
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [
                min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
                for i in range(num_train_timesteps)
            ],
            dtype=torch.float64,
        )
    else:
        raise ValueError(
            f"Unknown beta_schedule {beta_schedule!r}: use linear, scaled_linear, squaredcos_cap_v2 or trained_betas."
        )
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if rescale_betas_zero_snr:
        root = alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        alphas_cumprod = ((root - last) * first / (first - last)) ** 2
    return alphas_cumprod


def flow_time_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ(ᾱ) = √(1 − ᾱ) / (√ᾱ + √(1 − ᾱ)): the flow time of a diffusion noise level."""
    alpha_bar = torch.as_tensor(alpha_bar)
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return b / (a + b)


def alpha_bar_from_flow_time(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flow_time_from_alpha_bar`: ᾱ(t) = (1 − t)² / ((1 − t)² + t²), |t| used."""
    t = torch.as_tensor(t).abs()
    return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)


def diffusion_timestep_from_flow_time(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The continuous diffusion timestep k whose σ(ᾱ_k) equals |t| (linear interpolation of the table,
    clamped to [0, T − 1] outside the schedule's σ range)."""
    t = torch.as_tensor(t)
    table = flow_time_from_alpha_bar(alphas_cumprod.to(torch.float64)).to(t.device)  # increasing in k
    tq = t.abs().to(torch.float64).clamp(table[0], table[-1])
    hi = torch.searchsorted(table, tq.contiguous()).clamp(1, table.numel() - 1)
    lo = hi - 1
    frac = (tq - table[lo]) / (table[hi] - table[lo])
    return (lo.to(torch.float64) + frac).to(t.dtype if t.is_floating_point() else torch.float64)


def _coeffs(alpha_bar: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_bar = torch.as_tensor(alpha_bar, device=ref.device, dtype=torch.float64)
    if alpha_bar.ndim == 0:
        alpha_bar = alpha_bar.expand(ref.shape[0])
    return expand_like(alpha_bar.sqrt(), ref), expand_like((1 - alpha_bar).sqrt(), ref)


def flow_to_diffusion_state(x_flow: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``x_diff = (√ᾱ + √(1 − ᾱ))·x_flow`` (ᾱ scalar or (B,))."""
    a, b = _coeffs(alpha_bar, x_flow)
    return (a + b) * x_flow


def diffusion_to_flow_state(x_diff: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flow_to_diffusion_state`."""
    a, b = _coeffs(alpha_bar, x_diff)
    return x_diff / (a + b)


def diffusion_to_flow_velocity(
    model_output: torch.Tensor, x_diff: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Flow velocity ``ε̂ − x̂0`` from an epsilon / v prediction at diffusion state ``x_diff``
    (``flow_matching`` passes the output through). Computed in ``x_diff``'s dtype."""
    if prediction_type == "flow_matching":
        return model_output
    a, b = _coeffs(alpha_bar, x_diff)
    out = model_output.to(x_diff.dtype)
    if prediction_type == "epsilon":
        eps = out
        x0 = (x_diff - b * eps) / a
    elif prediction_type == "v_prediction":
        x0 = a * x_diff - b * out
        eps = a * out + b * x_diff
    else:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}.")
    return eps - x0


# --------------------------------------------------------------------------- model-side bridge helpers


def flow_time_range(alphas_cumprod: torch.Tensor) -> tuple[float, float]:
    """``(σ(ᾱ_0), σ(ᾱ_{T−1}))``: the flow times a diffusion model with this schedule was trained on."""
    table = flow_time_from_alpha_bar(alphas_cumprod.to(torch.float64))
    return float(table[0]), float(table[-1])


def alphas_cumprod_from_scheduler_config(config: dict) -> torch.Tensor:
    """ᾱ from a diffusers scheduler config (``num_train_timesteps``, ``beta_schedule``, ``beta_start``,
    ``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr``), with the diffusers defaults for missing keys."""
    return make_alphas_cumprod(
        int(config.get("num_train_timesteps", 1000)),
        str(config.get("beta_schedule", "scaled_linear")),
        float(config.get("beta_start", 0.00085)),
        float(config.get("beta_end", 0.012)),
        config.get("trained_betas"),
        bool(config.get("rescale_betas_zero_snr", False)),
    )


def bridged_velocity(
    predict,
    x_flow: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    max_time: float | None = None,
) -> torch.Tensor:
    """Flow velocity of a diffusion model at flow state ``x_flow`` and (signed) flow time ``t`` (B,).

    ``predict(x_diff, timestep)`` is the diffusion model (epsilon or v prediction) at the continuous
    diffusion ``timestep`` (B,) whose σ matches ``|t|``; ``x_diff = (√ᾱ + √(1 − ᾱ))·x_flow`` with
    ``ᾱ = ᾱ(|t|)``; the prediction becomes ``ε̂ − x̂0`` (SPEC §5). ``|t|`` above ``max_time`` (default: the
    schedule's largest σ) is clamped to it: the model never saw noisier states, and the epsilon → velocity
    map is singular at t = 1. Computed in at least float32; returned in ``x_flow``'s dtype.
    """
    if max_time is None:
        max_time = flow_time_range(alphas_cumprod)[1]
    work = torch.float64 if x_flow.dtype == torch.float64 else torch.float32
    time = t.abs().to(torch.float64).clamp(max=max_time)
    alpha_bar = alpha_bar_from_flow_time(time)
    timestep = diffusion_timestep_from_flow_time(time, alphas_cumprod)
    x_diff = flow_to_diffusion_state(x_flow.to(work), alpha_bar)
    prediction = predict(x_diff, timestep)
    return diffusion_to_flow_velocity(prediction.to(work), x_diff, alpha_bar, prediction_type).to(x_flow.dtype)
