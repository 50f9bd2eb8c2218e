"""Shared machinery of the diffusers model families (SD3, SANA, Qwen-Image, ...): written once, used by all.

A family file (``models/sd3.py``, ``models/sana.py``, ``models/qwenimage.py``) holds only what is specific to
its transformer and defines two things:

* a :class:`DiffusersFamilyModel` subclass — the fewstep model ``f(x_t, t, tt, cond) -> velocity`` — that
  names the diffusers transformer class and its exportable TwinFlow subclass, the attribute of the time
  embedding and its :class:`TimePairEmbedding` subclass, the default LoRA targets, and implements
  ``_call(x_t, t, cond)`` (timestep scale, latent packing, masks);
* a module-level ``FAMILY`` (a :class:`Family`): the pipeline class, how its VAE normalises latents and how
  its ``encode_prompt`` is called for ``fewstep.precompute``, and the model class for ``fewstep.export``.

:func:`families` finds every ``FAMILY`` in ``fewstep.models``, so a new family is one file plus its YAML.

Shared here: resolving ``model.pretrained`` (hub id, pipeline folder or bare transformer folder), dtype
parsing, the time-pair (target time + sign) embedding and its zero-init exactness, LoRA wrapping / merging,
the trainable weights (what the EMA holds), chunked no-grad passes, the sharding units under FSDP, and the
export transformer.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import pkgutil
import re
from pathlib import Path

import torch
from torch import nn

from fewstep.errors import FewstepError, describe

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
        raise ValueError(f"{key}={name!r} is unknown; use float32, bfloat16, float16 or auto") from None


COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # trainer.mixed_precision -> its compute dtype


def weight_dtype_name(dtype: str, lora: bool, mixed_precision: str) -> str:
    """``model.dtype``, with ``auto`` resolved: a LoRA model's frozen base in the compute dtype of
    ``trainer.mixed_precision`` (bfloat16 under bf16, as the reference loads Qwen-Image; float32 without mixed
    precision), full fine-tuning's trainable weights in float32. LoRA weights and the time embeddings are float32
    either way."""
    if str(dtype) != "auto":
        return str(dtype)
    return COMPUTE_DTYPES.get(str(mixed_precision), "float32") if lora else "float32"


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


def load_error(key: str, pretrained: str, err: Exception) -> PretrainedNotFound:
    """A one-line :class:`PretrainedNotFound` for a failed ``from_pretrained``."""
    return PretrainedNotFound(
        f"{key}={pretrained}: could not load it ({describe(err)}); give a local diffusers "
        "folder, or a hub id that is cached or downloadable (HF_HUB_OFFLINE unset, logged in for gated repos)"
    )


def load_component(cls, pretrained: str, component: str, subfolder, revision, dtype, key="model.pretrained"):
    """``cls.from_pretrained`` of one resolved pipeline component, load failures as one line."""
    source, sub = resolve_pretrained(pretrained, component, subfolder, key=key)
    try:
        return cls.from_pretrained(source, subfolder=sub, revision=revision, **dtype_kwargs(dtype))
    except PretrainedNotFound:
        raise
    except (OSError, ValueError) as err:
        raise load_error(key, pretrained, err) from err


# --------------------------------------------------------------------------- the time-pair embedding


class TimePairEmbedding:
    """Mixin for a family's time-embedding subclass: the TwinFlow target-time term and sign embedding.

    :meth:`from_base` turns the pretrained embedder into the subclass in place of it: the original
    sub-modules are kept (same state-dict keys), ``target_embedder`` is a copy of the embedder whose output
    layers (``zero_layers``) are zero, and ``sign_embedding`` is a 2-row table of zeros (row 1 = negative
    time, the fake trajectory). Both extras therefore start at exactly zero, so at step 0 the model equals
    the pretrained one. The family's ``forward`` adds ``target(|tt|)·(t − tt) + sign[t < 0]``.

    The per-call signed times reach it through ``time_pair_times``, set around the transformer's forward;
    without them (a pipeline call) ``t`` is ``timestep / timestep_scale`` and ``tt`` the default target.
    """

    zero_layers: tuple[str, ...] = ()  # dotted names of the copy's output Linear layers, zeroed
    timestep_scale: float = 1000.0  # the transformer's timestep = t · timestep_scale
    time_pair_times: tuple[torch.Tensor, torch.Tensor] | None = None
    default_target_time: float = 0.0

    @classmethod
    def from_base(cls, base: nn.Module, sign_width: int | None = None, timestep_scale: float | None = None):
        """The pretrained embedder ``base`` with the zero-initialised extras (``sign_width``: the sign table's
        width, default the output width of ``zero_layers[0]``; ``timestep_scale`` overrides the class value)."""
        if isinstance(base, cls):
            return base
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, value in vars(base).items():  # plain attributes (flags) of the embedder
            if not name.startswith("_") and name != "training":
                setattr(new, name, value)
        for name, child in base.named_children():
            setattr(new, name, child)
        target = copy.deepcopy(base)  # a copy of the pretrained embedder, whose output layers start at zero
        for name in cls.zero_layers:
            linear = target.get_submodule(name)
            nn.init.zeros_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        new.target_embedder = target
        ref = base.get_submodule(cls.zero_layers[0]).weight
        new.sign_embedding = nn.Embedding(2, sign_width or ref.shape[0], device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(new.sign_embedding.weight)
        new.time_pair_times = None
        if timestep_scale is not None:
            new.timestep_scale = float(timestep_scale)
        return new

    def signed_times(self, timestep: torch.Tensor, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, tt)`` as float32 rows of length ``n`` (see the class docstring)."""
        if self.time_pair_times is not None:
            t, tt = self.time_pair_times
        else:  # called without a wrapper (a pipeline): t from the timestep, tt the default target
            t = timestep.float() / self.timestep_scale
            tt = torch.full_like(t, float(self.default_target_time))
        t = t.reshape(-1).to(device).float().expand(n)
        tt = tt.reshape(-1).to(device).float().expand(n)
        return t, tt

    def target_weight_dtype(self) -> torch.dtype:
        return self.target_embedder.get_submodule(self.zero_layers[0]).weight.dtype

    def scaled_target(self, target: torch.Tensor, t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        """``target·(t − tt)`` row-wise."""
        return target * (t - tt).to(target.dtype)[:, None]

    def sign(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.sign_embedding((t < 0).long()).to(dtype)


class TwinFlowTransformerMixin:
    """For a family's exportable transformer class (config ``time_pair``, ``default_target_time``): inside a
    pipeline, which passes only ``timestep``, the target time is ``target_timestep`` if given (same scale as
    ``timestep``), else ``target_time_source.current_target_time()`` (e.g. the ``TwinFlowScheduler``), else
    ``config.default_target_time`` (0: the few-step jump)."""

    time_embed_attr = "time_text_embed"
    target_time_source = None

    def use_scheduler_target_time(self, scheduler) -> None:
        """Read ``tt`` from ``scheduler.current_target_time()`` at every call (any/mul sampling styles); None: back to
        ``config.default_target_time``. It is that scheduler object: after swapping a pipeline's scheduler, call
        this again with the new one."""
        self.target_time_source = scheduler

    def init_time_pair(self, embedding_cls, time_pair: bool, default_target_time: float, **from_base) -> None:
        if time_pair:
            emb = embedding_cls.from_base(getattr(self, self.time_embed_attr), **from_base)
            setattr(self, self.time_embed_attr, emb)
            emb.default_target_time = float(default_target_time)
        self.target_time_source = None

    @contextlib.contextmanager
    def pipeline_times(self, timestep, target_timestep, batch: int, device):
        """Set the embedding's ``(t, tt)`` for one pipeline call (no-op if a fewstep model set them)."""
        emb = getattr(self, self.time_embed_attr)
        set_here = isinstance(emb, TimePairEmbedding) and emb.time_pair_times is None
        if set_here:
            scale = emb.timestep_scale
            t = torch.as_tensor(timestep, device=device).float().reshape(-1) / scale
            t = t.expand(batch)
            if target_timestep is not None:
                tt = torch.as_tensor(target_timestep, device=t.device).float().reshape(-1) / scale
                tt = tt.expand_as(t)
            elif self.target_time_source is not None:
                tt = torch.full_like(t, float(self.target_time_source.current_target_time()))
            else:
                tt = torch.full_like(t, float(self.config.default_target_time))
            emb.time_pair_times = (t, tt)
        try:
            yield
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


def add_lora(module: nn.Module, lora: dict, exclude: tuple[str, ...] = (), default_targets=()) -> None:
    """Freeze ``module`` and add a peft LoRA adapter (``rank``, ``alpha``, ``target_modules``, ``dropout``,
    ``init``) whose weights are the only trainable ones; trainable weights are kept in float32."""
    from peft import LoraConfig

    module.requires_grad_(False)
    targets = list(lora.get("target_modules") or default_targets)
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


_EMPTY: list = []  # non-empty while a rank other than 0 of a sharded run builds its networks (building_empty)


def builds_empty() -> bool:
    """Whether networks built now are to stay on the ``meta`` device (no weights read, drawn or stored): true on a
    rank other than 0 of a sharded run while it builds (:meth:`fewstep.training.distributed.Sharded.building`),
    whose ``place`` then fills their shards from rank 0."""
    return bool(_EMPTY)


@contextlib.contextmanager
def building_empty():
    """Networks built inside stay on the ``meta`` device (:func:`builds_empty`)."""
    _EMPTY[:] = [True]
    try:
        yield
    finally:
        _EMPTY.clear()


_LOAD_DEVICE: list = []  # the device pretrained weights load onto while networks are built (loading_onto)


@contextlib.contextmanager
def loading_onto(device: torch.device | str | None):
    """Pretrained transformers loaded inside go straight to ``device`` when it is an accelerator
    (``from_pretrained(device_map=device)``: tensor by tensor from the memory-mapped safetensors files, so a process
    never holds the whole model in host memory; 8 DDP ranks of Qwen-Image would otherwise hold 8 × 41 GB at once).
    On the CPU, or with ``None``, loading is unchanged."""
    device = torch.device(device) if device is not None else None
    _LOAD_DEVICE[:] = [device] if device is not None and device.type != "cpu" else []
    try:
        yield
    finally:
        _LOAD_DEVICE.clear()


def load_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained`` arguments of a transformer load: its dtype and, inside :func:`loading_onto` an
    accelerator, the ``device_map`` that loads it there directly."""
    kwargs = dtype_kwargs(dtype)
    if _LOAD_DEVICE:
        kwargs["device_map"] = _LOAD_DEVICE[0]
    return kwargs


def empty_transformer(cls, config: dict, dtype: torch.dtype) -> nn.Module:
    """``cls.from_config(config)`` with its parameters on the ``meta`` device in ``dtype`` (no storage), in eval mode
    like ``from_pretrained``; the buffers computed at construction (rotary tables) are real and keep their dtype,
    as a loaded model's do. Under ``trainer.distributed=fsdp`` the ranks other than 0 build this, and
    :meth:`fewstep.training.distributed.Sharded.place` fills its shards with rank 0's weights."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = cls.from_config(config)
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                sub._parameters[name] = nn.Parameter(param.to(dtype), requires_grad=param.requires_grad)
    return module.eval()


# --------------------------------------------------------------------------- chunked no-grad passes


def chunked_no_grad(forward, chunk: int, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond):
    """``forward(x_t, t, tt, cond)`` in row chunks of at most ``chunk`` when gradients are off (teacher,
    sampling and other no-grad passes), else in one call: the same rows, a lower activation peak."""
    # here, not at the top: an export copies this module's top-level fewstep imports beside it (export/code.py)
    from fewstep.data.base import cond_select

    n = x_t.shape[0]
    if chunk <= 0 or torch.is_grad_enabled() or n <= chunk:
        return forward(x_t, t, tt, cond)

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


def cond_tensors(cond, keys: tuple[str, ...], family: str, device, dtype, optional: tuple[str, ...] = ()):
    """The condition's tensors ``keys`` (cast to ``dtype``) and ``optional`` ones (as stored, or None)."""
    if not isinstance(cond, dict) or any(k not in cond for k in keys):
        raise TypeError(
            f"{family} models take cond={{{', '.join(repr(k) for k in keys + optional)}}} (cached text embeddings, "
            f"data=latents); got {type(cond).__name__}"
        )
    required = [cond[k].to(device=device, dtype=dtype) for k in keys]
    return required + [cond[k].to(device) if cond.get(k) is not None else None for k in optional]


# --------------------------------------------------------------------------- the fewstep model


class DiffusersFamilyModel(nn.Module):
    """``f(x_t, t, tt, cond) -> velocity`` over a diffusers transformer; a family subclass sets the class
    attributes below and implements :meth:`_call`.

    ``lora.enabled`` freezes the transformer and trains a LoRA adapter plus, with ``time_pair``, the
    target-time and sign embeddings (kept in float32): the trainable weights are what the EMA teacher holds.
    ``dtype`` is the weights' dtype; inputs are cast to it and the output is returned in the input's dtype.
    ``no_grad_chunk > 0`` runs no-grad calls (teacher passes, sampling) in row chunks of that size: same
    outputs, lower peak memory, more kernel launches."""

    family = "?"
    transformer_class: type | None = None  # the diffusers transformer
    export_class: type | None = None  # its TwinFlowTransformerMixin subclass (config time_pair)
    time_embed_attr = "time_text_embed"  # the transformer's time-embedding attribute
    time_embed_class: type | None = None  # the TimePairEmbedding subclass that replaces it
    default_lora_targets: tuple[str, ...] = ()
    default_pretrained = ""
    pretrained_hint = ""  # how to get loadable weights, added to a failed model.pretrained's error line

    def __init__(
        self,
        pretrained: str | None = None,
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
        random_init: bool = False,
        architecture: str | None = None,
        num_layers: int | None = None,
    ):
        super().__init__()
        pretrained = self.default_pretrained if pretrained is None else pretrained
        self.no_grad_chunk = int(no_grad_chunk)
        if prediction_type != "flow":
            raise ValueError(
                f"{self.family} transformers predict a flow velocity; model.prediction_type={prediction_type!r} "
                "must be 'flow'"
            )
        self.prediction_type = prediction_type
        self.time_pair = bool(time_pair)
        self.weight_dtype = parse_dtype(dtype)
        lora = dict(lora or {})
        self.lora_enabled = bool(lora.get("enabled", False))
        self.pretrained = str(pretrained)
        self.random_init = bool(random_init)
        if self.random_init:
            transformer = self.random_transformer(architecture, num_layers, self.weight_dtype)
        else:
            transformer = self.load_transformer(pretrained, subfolder, revision, self.weight_dtype)
        channels = self.data_channels(transformer.config)
        if data_shape and int(data_shape[0]) != channels:
            raise ValueError(
                f"the data has {data_shape[0]}-channel latents but model.pretrained={pretrained} expects "
                f"{channels}; precompute the cache with the same pretrained model"
            )
        if self.time_pair:
            self.add_time_pair_embeddings(transformer)
        if self.lora_enabled:
            add_lora(transformer, lora, exclude=self.time_pair_prefixes(), default_targets=self.default_lora_targets)
            if self.time_pair:
                emb = getattr(transformer, self.time_embed_attr)
                emb.target_embedder.requires_grad_(True)
                emb.sign_embedding.requires_grad_(True)
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            transformer.requires_grad_(True)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.transformer = transformer

    # -- per-family hooks -----------------------------------------------------------------------

    @classmethod
    def load_transformer(cls, pretrained: str, subfolder: str | None, revision: str | None, dtype: torch.dtype):
        """The pretrained transformer (resolved first); a fewstep export loads as the family's export class. Where
        :func:`builds_empty` (a rank other than 0 of a sharded run) only its config is read:
        the same module on the ``meta`` device (:func:`empty_transformer`), whose shards rank 0 fills."""
        source, sub = resolve_pretrained(pretrained, "transformer", subfolder)
        try:
            config = cls.transformer_class.load_config(source, subfolder=sub, revision=revision)
            exported = config.get("_class_name") == cls.export_class.__name__
            target = cls.export_class if exported else cls.transformer_class
            if builds_empty():
                return empty_transformer(target, config, dtype)
            return target.from_pretrained(source, subfolder=sub, revision=revision, **load_kwargs(dtype))
        except PretrainedNotFound:
            raise
        except (OSError, ValueError) as err:
            raise load_error("model.pretrained", pretrained, err) from err

    @classmethod
    def shipped_architecture(cls, architecture: str | None):
        """The shipped architecture ``model.architecture``, which must be this family's transformer class."""
        from fewstep.models import architectures  # not at the top: an export would copy it (export/code.py)

        if not architecture:
            raise architectures.ArchitectureError(
                f"model.random_init=true needs model.architecture (one of {', '.join(architectures.names())})"
            )
        arch = architectures.load(architecture)
        if arch.class_name != cls.transformer_class.__name__:
            raise architectures.ArchitectureError(
                f"model.architecture={architecture} is a {arch.class_name}, not the {cls.family} family's "
                f"{cls.transformer_class.__name__}; pick a {cls.family} architecture or another model"
            )
        return arch

    @classmethod
    def random_transformer(cls, architecture: str | None, num_layers: int | None, dtype: torch.dtype):
        """``model.random_init=true``: the shipped architecture ``model.architecture`` (published config, random
        weights, no download; :mod:`fewstep.models.architectures`) at ``model.num_layers`` depth (None: all),
        materialised on the training device in ``dtype``. For step-time and memory measurements only."""
        from fewstep.models import architectures  # not at the top: an export would copy it (export/code.py)

        arch = cls.shipped_architecture(architecture)
        if builds_empty():  # a rank other than 0 of a sharded run: rank 0 draws the weights
            return empty_transformer(cls.transformer_class, arch.with_layers(num_layers).config, dtype)
        return architectures.random_transformer(architecture, dtype, num_layers=num_layers, cls=cls.transformer_class)

    @staticmethod
    def data_channels(config) -> int:
        """Latent channels of the data (the cache) this transformer takes."""
        return int(config.in_channels)

    def time_pair_kwargs(self, transformer) -> dict:
        """Extra arguments of the family's ``TimePairEmbedding.from_base``."""
        return {}

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The transformer's velocity at signed time ``t`` (the family's call convention)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------

    @classmethod
    def time_pair_prefixes(cls) -> tuple[str, str]:
        """State-dict prefixes of the TwinFlow embeddings (never LoRA-wrapped: they are trained in full)."""
        return (f"{cls.time_embed_attr}.target_embedder.", f"{cls.time_embed_attr}.sign_embedding")

    def add_time_pair_embeddings(self, transformer: nn.Module):
        """Replace the transformer's time embedding by the family's :class:`TimePairEmbedding` (idempotent)."""
        base = getattr(transformer, self.time_embed_attr)
        emb = self.time_embed_class.from_base(base, **self.time_pair_kwargs(transformer))
        setattr(transformer, self.time_embed_attr, emb)
        return emb

    def has_time_pair(self, transformer: nn.Module | None = None) -> bool:
        transformer = self.transformer if transformer is None else transformer
        return isinstance(getattr(transformer, self.time_embed_attr, None), TimePairEmbedding)

    def time_pair_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the time-pair embeddings add (``<embed>.target_embedder.*``, ``<embed>.sign_embedding.*``)."""
        prefixes = self.time_pair_prefixes()
        return {k: v for k, v in self.transformer.state_dict().items() if k.startswith(prefixes)}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond) -> torch.Tensor:
        return chunked_no_grad(self._forward, self.no_grad_chunk, x_t, t, tt, cond)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond) -> torch.Tensor:
        emb = getattr(self.transformer, self.time_embed_attr)
        if self.time_pair:
            emb.time_pair_times = (t, tt)
        try:
            out = self._call(x_t, t, cond)
        finally:
            if self.time_pair:
                emb.time_pair_times = None
        return out.to(x_t.dtype)

    def export_transformer(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A standalone diffusers transformer with this model's weights (LoRA merged): the family's export
        class when the model has the time-pair embeddings, else the vanilla class."""
        config = {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")}
        config.pop("time_pair", None)
        config.pop("default_target_time", None)
        state = merged_state_dict(self.transformer) if self.lora_enabled else self.transformer.state_dict()
        if self.has_time_pair():
            out = self.export_class.from_config({**config, "time_pair": True})
        else:
            out = self.transformer_class.from_config(config)
        out.load_state_dict(state, strict=True)
        dtype = dtype or self.weight_dtype
        if next(out.parameters()).dtype != dtype:
            out = out.to(dtype)
        return out.eval()


# --------------------------------------------------------------------------- families (precompute, export, data)


class Family:
    """One model family as precompute, ``data=latents`` and export see it. The defaults fit a Stable Diffusion
    style pipeline: an ``AutoencoderKL`` with ``(mean − shift_factor)·scaling_factor`` latents and an
    ``encode_prompt(prompts, device, 1, False)`` whose first output is the prompt embedding."""

    name = "diffusers"
    pipeline_class = ""  # the diffusers pipeline class name (model_index.json ``_class_name``)
    model_class: type | None = None  # its DiffusersFamilyModel (None: no fewstep export)
    default_null_prompt = ""  # the unconditional prompt cached as null.safetensors
    # precompute's default ``max_sequence_length``: the pipeline's own ``__call__`` default, so a cache truncates long
    # prompts where the reference pipeline does (None: the text condition has a fixed length, the option is unused)
    max_sequence_length: int | None = None
    text_modules = ("text_encoder", "text_encoder_2", "text_encoder_3")

    # -- latents ------------------------------------------------------------------------------

    def vae_info(self, vae) -> dict:
        """What the manifest records about the latent normalisation."""
        return {
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
        }

    def vae_scale(self, vae) -> int:
        """Pixels per latent side."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Cached-space latents (N, C, h, w) of images in [-1, 1]."""
        info = self.vae_info(vae)
        latents = vae.encode(pixels).latent_dist.mode()
        return (latents - info["shift_factor"]) * info["scaling_factor"]

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from cached-space latents."""
        info = self.vae_info(vae)
        return vae.decode(latents / info["scaling_factor"] + info["shift_factor"], return_dict=False)[0]

    # -- text -----------------------------------------------------------------------------------

    def encode_text(self, pipe, prompts: list[str], device, max_sequence_length: int | None, options: dict) -> dict:
        """The cached condition tensors of ``prompts`` (float32, CPU)."""
        out = pipe.encode_prompt(prompts, device, 1, False)
        return {"prompt_embeds": out[0].float().cpu()}

    def encode_null(self, pipe, prompt: str, device, max_sequence_length: int | None, options: dict) -> dict:
        """The cached condition of the unconditional prompt (``null.safetensors``): as the pipeline encodes its
        negative prompt for classifier-free guidance (here the same as :meth:`encode_text`)."""
        return self.encode_text(pipe, [prompt], device, max_sequence_length, options)

    def null_prompt(self, option: str | None) -> str:
        return self.default_null_prompt if option is None else str(option)

    # -- sampling -------------------------------------------------------------------------------

    def guided_velocity(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance at sampling time (``sampler=euler sampler.guidance_scale=g``), as the family's
        pipeline combines its conditional and unconditional predictions: here plain ``v_u + g·(v_c − v_u)``.
        Training targets (TwinFlow's enhanced target, image-free and MeanFlow guidance, DMD2's real score) stay
        plain linear guidance for every family, as the reference trains (docs/families.md)."""
        return v_uncond + scale * (v_cond - v_uncond)

    def pipeline_guidance(self, scale: float) -> dict:
        """The keyword arguments with which the family's diffusers pipeline guides as :meth:`guided_velocity` does
        at ``scale`` (the exported model card's loading code): ``guidance_scale`` here (the pipelines apply it
        above 1 only)."""
        return {"guidance_scale": float(scale)}


DEFAULT_FAMILY = Family()


def families() -> dict[str, Family]:
    """Every ``FAMILY`` defined by a module of ``fewstep.models`` (imports them), by name."""
    import fewstep.models as package

    found: dict[str, Family] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, Family):
            found[family.name] = family
    return found


def family_for_pipeline(pipeline_class: str) -> Family:
    """The family whose pipeline class is ``pipeline_class`` (the generic default for unknown pipelines)."""
    for family in families().values():
        if family.pipeline_class == pipeline_class:
            return family
    return DEFAULT_FAMILY


def family_named(name: str) -> Family:
    found = families()
    return found.get(name, DEFAULT_FAMILY)


def bind_guidance(sampler, model) -> None:
    """Give a guided sampler (``guidance_scale > 0`` and a ``guidance`` rule) the model family's
    :meth:`Family.guided_velocity` (models without a family, e.g. ``tiny``: plain CFG)."""
    if getattr(sampler, "guidance_scale", 0.0) > 0 and hasattr(sampler, "guidance"):
        name = family_of_model_class(type(model))
        sampler.guidance = (DEFAULT_FAMILY if name is None else family_named(name)).guided_velocity


def family_of_model_class(cls) -> str | None:
    """The family a model class trains (``cls.family``; None for models without one, e.g. ``tiny``)."""
    name = getattr(cls, "family", None)
    return name if isinstance(name, str) and name != "?" else None
