"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``) as a fewstep model ``f(x_t, t, tt, cond)``.

``SD3Model`` (``model=sd35`` full fine-tune, ``model=sd35_lora`` with a peft LoRA adapter) loads the
transformer from a hub id or a local folder and calls diffusers' own forward with ``timestep = |t|·1000``
and ``cond = {"prompt_embeds", "pooled_prompt_embeds"}`` (SPEC §4).

With ``time_pair=True`` (objectives that need the target time and the sign: TwinFlow, RCGM) the
transformer's ``time_text_embed`` is replaced by :class:`TwinFlowTimeTextEmbedding`, a subclass that keeps
the original sub-modules (same state-dict keys) and adds

    ``temb + target_embedder(|tt|·1000, pooled)·(t − tt) + sign_embedding[t < 0]``

(the reference's ``aux_time_embed``; ``target_embedder`` has the architecture of the time-text embedder).
Both extras start at exactly zero (``target_embedder``'s output layers and the 2-row sign table are
zero-initialised), so at step 0 the model equals the pretrained one. The per-call signed times reach the
embedding through its ``time_pair_times`` attribute, set by the caller around the transformer's forward.
``time_pair=False`` leaves the transformer untouched (no extra modules).

:class:`SD3TwinFlowTransformer2DModel` is the same transformer as a diffusers class whose config carries
``time_pair``: exported pipelines save it, and ``StableDiffusion3Pipeline.from_pretrained`` restores it
(after ``import fewstep.models.sd3``; diffusers resolves the library name ``fewstep.models.sd3`` from
``sys.modules``). Inside a pipeline, which passes only ``timestep``, the target time is
``target_timestep`` if given, else ``target_time_source.current_target_time()`` (e.g. the
``TwinFlowScheduler``), else ``config.default_target_time`` (0: the few-step jump).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers' loader finds the base class here
from torch import nn

from fewstep.errors import FewstepError

NUM_TRAIN_TIMESTEPS = 1000
# state-dict prefixes of the TwinFlow embeddings (never LoRA-wrapped: they are trained in full)
TIME_PAIR_PREFIXES = ("time_text_embed.target_embedder.", "time_text_embed.sign_embedding")
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class PretrainedNotFound(FewstepError, ValueError):
    """``model.pretrained`` (or ``pretrained=``) names nothing loadable; the message is one line."""


def parse_dtype(name: str | torch.dtype, key: str = "model.dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"{key}={name!r} is unknown; use float32, bfloat16 or float16") from None


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained`` dtype argument (omitted for float32, the default of every diffusers version)."""
    return {} if dtype == torch.float32 else {"torch_dtype": dtype}


def resolve_pretrained(
    pretrained: str, component: str, subfolder: str | None = None, key: str = "model.pretrained"
) -> tuple[str, str | None]:
    """``(path_or_hub_id, subfolder)`` for one component of a diffusers pipeline.

    A local folder may be a pipeline (``<dir>/<component>/config.json``) or the component itself
    (``<dir>/config.json``); a hub id ``owner/name`` is a pipeline repo (subfolder ``component``).
    Raises :class:`PretrainedNotFound` (one line naming ``key``) before any weight is read.
    """
    if not pretrained:
        raise PretrainedNotFound(f"{key} is empty: give a diffusers folder or a hub id (e.g. {key}=owner/name)")
    path = Path(os.path.expanduser(str(pretrained)))
    if path.exists():
        if not path.is_dir():
            raise PretrainedNotFound(f"{key}={pretrained}: is a file; give the pipeline or {component} folder")
        if subfolder:
            if not (path / subfolder / "config.json").exists():
                raise PretrainedNotFound(f"{key}={pretrained}: no {subfolder}/config.json there; fix the subfolder")
            return str(path), subfolder
        if (path / component / "config.json").exists():
            return str(path), component
        if (path / "config.json").exists():
            return str(path), None
        raise PretrainedNotFound(
            f"{key}={pretrained}: neither {component}/config.json nor config.json found; point it at a diffusers "
            f"pipeline folder or a bare {component} folder"
        )
    text = str(pretrained)
    if text.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(text):
        raise PretrainedNotFound(f"{key}={pretrained}: no such folder (and not a hub id owner/name); fix the path")
    return text, subfolder if subfolder else component


def _load_error(key: str, pretrained: str, err: Exception) -> PretrainedNotFound:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PretrainedNotFound(
        f"{key}={pretrained}: could not load it ({type(err).__name__}: {first[:200]}); give a local diffusers "
        "folder, or a hub id that is cached or downloadable (HF_HUB_OFFLINE unset, logged in for gated repos)"
    )


# --------------------------------------------------------------------------- the embeddings


class TwinFlowTimeTextEmbedding(CombinedTimestepTextProjEmbeddings):
    """SD3's time-text embedder plus the target-time term and the sign embedding (module docstring).

    Keeps the original ``time_proj`` / ``timestep_embedder`` / ``text_embedder`` (so pretrained keys are
    unchanged) and adds ``target_embedder`` (same architecture, output layers zero) and ``sign_embedding``
    (2 rows, zero; row 1 = negative time, the fake trajectory)."""

    time_pair_times: tuple[torch.Tensor, torch.Tensor] | None = None
    default_target_time: float = 0.0

    @classmethod
    def from_base(cls, base: CombinedTimestepTextProjEmbeddings) -> TwinFlowTimeTextEmbedding:
        if isinstance(base, cls):
            return base
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.time_proj = base.time_proj
        new.timestep_embedder = base.timestep_embedder
        new.text_embedder = base.text_embedder
        target = copy.deepcopy(base)  # a copy of the pretrained embedder, whose output layers start at zero
        for linear in (target.timestep_embedder.linear_2, target.text_embedder.linear_2):
            nn.init.zeros_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        new.target_embedder = target
        ref = base.timestep_embedder.linear_2.weight
        new.sign_embedding = nn.Embedding(2, ref.shape[0], device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(new.sign_embedding.weight)
        new.time_pair_times = None
        return new

    def forward(self, timestep: torch.Tensor, pooled_projection: torch.Tensor) -> torch.Tensor:
        temb = super().forward(timestep, pooled_projection)
        if self.time_pair_times is not None:
            t, tt = self.time_pair_times
        else:  # called without a wrapper (a pipeline): t from the timestep, tt the default target
            t = timestep.float() / NUM_TRAIN_TIMESTEPS
            tt = torch.full_like(t, float(self.default_target_time))
        n = temb.shape[0]
        t = t.reshape(-1).to(temb.device).float().expand(n)
        tt = tt.reshape(-1).to(temb.device).float().expand(n)
        weight_dtype = self.target_embedder.timestep_embedder.linear_1.weight.dtype
        target = self.target_embedder(tt.abs() * NUM_TRAIN_TIMESTEPS, pooled_projection.to(weight_dtype))
        extra = target * (t - tt).to(target.dtype)[:, None] + self.sign_embedding((t < 0).long()).to(target.dtype)
        return temb + extra.to(temb.dtype)


def has_time_pair(transformer: nn.Module) -> bool:
    return isinstance(getattr(transformer, "time_text_embed", None), TwinFlowTimeTextEmbedding)


def add_time_pair_embeddings(transformer: nn.Module) -> TwinFlowTimeTextEmbedding:
    """Replace ``transformer.time_text_embed`` in place by :class:`TwinFlowTimeTextEmbedding` (idempotent)."""
    emb = TwinFlowTimeTextEmbedding.from_base(transformer.time_text_embed)
    transformer.time_text_embed = emb
    return emb


def time_pair_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the time-pair embeddings add (``time_text_embed.target_embedder.*``, ``...sign_embedding.*``)."""
    return {k: v for k, v in transformer.state_dict().items() if k.startswith(TIME_PAIR_PREFIXES)}


# --------------------------------------------------------------------------- the exportable diffusers class


class SD3TwinFlowTransformer2DModel(SD3Transformer2DModel):
    """``SD3Transformer2DModel`` whose config records the TwinFlow embeddings (``time_pair``), so
    ``save_pretrained`` / ``from_pretrained`` round-trip them. Accepts ``target_timestep`` (× 1000, like
    ``timestep``) in ``forward``; see the module docstring for the default."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        time_pair: bool = True,
        default_target_time: float = 0.0,
    ):
        super().__init__(
            sample_size,
            patch_size,
            in_channels,
            num_layers,
            attention_head_dim,
            num_attention_heads,
            joint_attention_dim,
            caption_projection_dim,
            pooled_projection_dim,
            out_channels,
            pos_embed_max_size,
            dual_attention_layers,
            qk_norm,
        )
        if time_pair:
            add_time_pair_embeddings(self).default_target_time = float(default_target_time)
        self.target_time_source = None  # e.g. a TwinFlowScheduler: tt = source.current_target_time()

    def use_scheduler_target_time(self, scheduler) -> None:
        """Read ``tt`` from ``scheduler.current_target_time()`` at every call (any/mul sampling styles)."""
        self.target_time_source = scheduler

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.Tensor = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
        target_timestep: torch.Tensor | float | None = None,
    ):
        emb = self.time_text_embed
        set_here = isinstance(emb, TwinFlowTimeTextEmbedding) and emb.time_pair_times is None
        if set_here:
            t = torch.as_tensor(timestep, device=hidden_states.device).float().reshape(-1) / NUM_TRAIN_TIMESTEPS
            t = t.expand(hidden_states.shape[0])
            if target_timestep is not None:
                tt = torch.as_tensor(target_timestep, device=t.device).float().reshape(-1) / NUM_TRAIN_TIMESTEPS
                tt = tt.expand_as(t)
            elif self.target_time_source is not None:
                tt = torch.full_like(t, float(self.target_time_source.current_target_time()))
            else:
                tt = torch.full_like(t, float(self.config.default_target_time))
            emb.time_pair_times = (t, tt)
        try:
            return super().forward(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                block_controlnet_hidden_states=block_controlnet_hidden_states,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=return_dict,
                skip_layers=skip_layers,
            )
        finally:
            if set_here:
                emb.time_pair_times = None


# --------------------------------------------------------------------------- LoRA


def lora_target_names(module: nn.Module, targets: list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """Full names of the Linear layers a peft ``target_modules`` list selects (a name equals a target or ends
    with ``.<target>``), minus those under ``exclude`` prefixes (the fully trained TwinFlow embeddings)."""
    names = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear) or name.startswith(exclude):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def add_lora(module: nn.Module, lora: dict, exclude: tuple[str, ...] = ()) -> None:
    """Freeze ``module`` and add a peft LoRA adapter (``rank``, ``alpha``, ``target_modules``, ``dropout``,
    ``init``) whose weights are the only trainable ones; trainable weights are kept in float32."""
    from peft import LoraConfig

    module.requires_grad_(False)
    targets = list(lora.get("target_modules") or DEFAULT_LORA_TARGETS)
    names = lora_target_names(module, targets, exclude)
    if not names:
        raise ValueError(
            f"model.lora.target_modules={targets} matched no Linear layer of {type(module).__name__}; "
            "name layers such as to_q, to_k, to_v, to_out.0"
        )
    init = lora.get("init", "gaussian")
    init = {"true": True, "false": False}.get(str(init).lower(), init)  # peft: True | False | "gaussian" | ...
    if init is False:
        raise ValueError("model.lora.init=false starts the adapter away from the pretrained model; use gaussian")
    config = LoraConfig(
        r=int(lora.get("rank", 64)),
        lora_alpha=float(lora.get("alpha", 64)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        init_lora_weights=init,
        target_modules=names,
    )
    module.add_adapter(config)


def lora_config_of(module: nn.Module):
    """The peft ``LoraConfig`` of ``module``'s default adapter (None without one)."""
    config = getattr(module, "peft_config", None) or {}
    return config.get("default")


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``module`` with every LoRA adapter merged into its base layer (keys of the plain model).
    Leaves ``module`` unchanged."""
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    lora_prefixes = []
    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer):
            lora_prefixes.append(name + ".")
            base = sub.get_base_layer()
            weight = base.weight.detach().clone()
            for adapter in sub.active_adapters:
                if adapter in sub.lora_A:
                    weight += sub.get_delta_weight(adapter).to(weight.dtype)
            merged[name + ".weight"] = weight
            if getattr(base, "bias", None) is not None:
                merged[name + ".bias"] = base.bias.detach().clone()
    for key, value in module.state_dict().items():
        if any(key.startswith(p) for p in lora_prefixes):
            continue
        merged[key] = value.detach().clone()
    return merged


# --------------------------------------------------------------------------- the fewstep model


def chunked_no_grad(forward, chunk: int, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond):
    """``forward(x_t, t, tt, cond)`` in row chunks of at most ``chunk`` when gradients are off (teacher,
    sampling and other no-grad passes), else in one call: the same rows, a lower activation peak."""
    n = x_t.shape[0]
    if chunk <= 0 or torch.is_grad_enabled() or n <= chunk:
        return forward(x_t, t, tt, cond)
    from fewstep.data.base import cond_select

    outs = []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=x_t.device)
        part = cond_select(cond, rows.to(cond_device(cond, x_t.device)))
        outs.append(forward(x_t[rows], t[rows], tt[rows], part))
    return torch.cat(outs)


def cond_device(cond, default: torch.device) -> torch.device:
    if isinstance(cond, dict):
        return next(iter(cond.values())).device
    return cond.device if isinstance(cond, torch.Tensor) else default


def _cond_tensors(cond, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(cond, dict) or "prompt_embeds" not in cond or "pooled_prompt_embeds" not in cond:
        raise TypeError(
            "SD3 models take cond={'prompt_embeds', 'pooled_prompt_embeds'} (cached text embeddings, data=latents); "
            f"got {type(cond).__name__}"
        )
    return (
        cond["prompt_embeds"].to(device=device, dtype=dtype),
        cond["pooled_prompt_embeds"].to(device=device, dtype=dtype),
    )


def load_sd3_transformer(pretrained: str, subfolder: str | None, revision: str | None, dtype: torch.dtype):
    """Load the transformer of ``pretrained`` (resolved first); a fewstep export loads as its own class."""
    source, sub = resolve_pretrained(pretrained, "transformer", subfolder)
    try:
        config = SD3Transformer2DModel.load_config(source, subfolder=sub, revision=revision)
        cls = (
            SD3TwinFlowTransformer2DModel
            if config.get("_class_name") == SD3TwinFlowTransformer2DModel.__name__
            else SD3Transformer2DModel
        )
        return cls.from_pretrained(source, subfolder=sub, revision=revision, **dtype_kwargs(dtype))
    except PretrainedNotFound:
        raise
    except (OSError, ValueError) as err:
        raise _load_error("model.pretrained", pretrained, err) from err


class SD3Model(nn.Module):
    """``f(x_t, t, tt, cond) -> velocity`` over a diffusers SD3 transformer (see the module docstring).

    ``lora.enabled`` freezes the transformer and trains a LoRA adapter plus, with ``time_pair``, the
    target-time and sign embeddings (kept in float32). ``dtype`` is the weights' dtype; inputs are cast to
    it and the output is returned in the input's dtype. ``no_grad_chunk > 0`` runs no-grad calls (teacher
    passes, sampling) in row chunks of that size: same outputs, lower peak memory, more kernel launches."""

    def __init__(
        self,
        pretrained: str = "stabilityai/stable-diffusion-3.5-medium",
        subfolder: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        prediction_type: str = "flow",
        lora: dict | None = None,
        no_grad_chunk: int = 0,
        data_shape: list[int] | tuple[int, ...] | None = None,
        num_classes: int = 0,
        time_pair: bool = False,
    ):
        super().__init__()
        self.no_grad_chunk = int(no_grad_chunk)
        if prediction_type != "flow":
            raise ValueError(
                f"SD3 transformers predict a flow velocity; model.prediction_type={prediction_type!r} must be 'flow'"
            )
        self.prediction_type = prediction_type
        self.time_pair = bool(time_pair)
        self.weight_dtype = parse_dtype(dtype)
        lora = dict(lora or {})
        self.lora_enabled = bool(lora.get("enabled", False))
        self.pretrained = str(pretrained)
        transformer = load_sd3_transformer(pretrained, subfolder, revision, self.weight_dtype)
        channels = transformer.config.in_channels
        if data_shape and int(data_shape[0]) != channels:
            raise ValueError(
                f"the data has {data_shape[0]}-channel latents but model.pretrained={pretrained} expects "
                f"{channels}; precompute the cache with the same pretrained model"
            )
        if self.time_pair:
            add_time_pair_embeddings(transformer)
        if self.lora_enabled:
            add_lora(transformer, lora, exclude=TIME_PAIR_PREFIXES)
            if self.time_pair:
                transformer.time_text_embed.target_embedder.requires_grad_(True)
                transformer.time_text_embed.sign_embedding.requires_grad_(True)
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            transformer.requires_grad_(True)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.transformer = transformer

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond) -> torch.Tensor:
        return chunked_no_grad(self._forward, self.no_grad_chunk, x_t, t, tt, cond)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond) -> torch.Tensor:
        prompt_embeds, pooled = _cond_tensors(cond, x_t.device, self.weight_dtype)
        emb = self.transformer.time_text_embed
        if self.time_pair:
            emb.time_pair_times = (t, tt)
        try:
            out = self.transformer(
                hidden_states=x_t.to(self.weight_dtype),
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                timestep=t.abs().float() * NUM_TRAIN_TIMESTEPS,
                return_dict=False,
            )[0]
        finally:
            if self.time_pair:
                emb.time_pair_times = None
        return out.to(x_t.dtype)

    # -- export helpers -----------------------------------------------------------------------

    def export_transformer(self, dtype: torch.dtype | None = None) -> SD3Transformer2DModel:
        """A standalone diffusers transformer with this model's weights (LoRA merged): an
        :class:`SD3TwinFlowTransformer2DModel` when the model has the time-pair embeddings, else vanilla."""
        config = {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")}
        config.pop("time_pair", None)
        config.pop("default_target_time", None)
        state = merged_state_dict(self.transformer) if self.lora_enabled else self.transformer.state_dict()
        if has_time_pair(self.transformer):
            out = SD3TwinFlowTransformer2DModel.from_config({**config, "time_pair": True})
        else:
            out = SD3Transformer2DModel.from_config(config)
        out.load_state_dict(state, strict=True)
        dtype = dtype or self.weight_dtype
        if next(out.parameters()).dtype != dtype:
            out = out.to(dtype)
        return out.eval()
