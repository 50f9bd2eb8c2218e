"""Published transformer architectures, shipped as their ``config.json`` (no weights), and random-weight
instances of them: the model at real size for step-time and memory measurements with nothing downloaded
(``model.random_init=true``). Time and memory do not depend on the weights' values.

Each JSON holds the diffusers config keys of the family's hub ``transformer/config.json`` plus a
``_fewstep`` block: the family, the published parameter count (checked by a test), the VAE's spatial
factor and latent channels, and the conditioning tensors one sample carries at real size (what the
family's precompute writes), so :mod:`fewstep.data.synthetic` can feed the model without a cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

from fewstep.errors import FewstepError


class ArchitectureError(FewstepError, ValueError):
    """An unknown architecture name or an impossible override."""


@dataclass(frozen=True)
class Architecture:
    name: str
    class_name: str
    config: dict  # the diffusers config (no private keys)
    family: str
    params: float  # the published parameter count
    vae_scale_factor: int
    latent_channels: int
    condition: dict  # name -> per-sample shape
    text_encoder_params: float = 0.0  # the pipeline's text encoders (published counts): what text=online keeps
    text_encoder: str = ""  # which they are

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = int(resolution) // self.vae_scale_factor
        return (self.latent_channels, side, side)

    def with_layers(self, num_layers: int | None) -> Architecture:
        """The same architecture at a reduced depth (CPU dry runs); dual-attention layers past the depth drop."""
        if num_layers is None:
            return self
        if not 1 <= int(num_layers) <= self.config["num_layers"]:
            raise ArchitectureError(
                f"model.num_layers={num_layers} must be in 1..{self.config['num_layers']} for {self.name}"
            )
        config = dict(self.config, num_layers=int(num_layers))
        if "dual_attention_layers" in config:
            config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < int(num_layers)]
        return Architecture(**{**self.__dict__, "config": config})


def names() -> list[str]:
    folder = resources.files(__name__)
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load(name: str) -> Architecture:
    """The shipped architecture ``name`` (e.g. ``sd35_medium``, ``sd35_large``, ``sana_1600m_1024px``,
    ``qwen_image``)."""
    available = names()
    if name not in available:
        import difflib

        close = difflib.get_close_matches(str(name), available, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ArchitectureError(
            f"model.architecture={name!r} is not shipped{hint}; choose one of {', '.join(available)}"
        )
    raw = json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
    meta = raw["_fewstep"]
    return Architecture(
        name=name,
        class_name=raw["_class_name"],
        config={k: v for k, v in raw.items() if not k.startswith("_")},
        family=meta["family"],
        params=float(meta["params"]),
        vae_scale_factor=int(meta["vae_scale_factor"]),
        latent_channels=int(meta["latent_channels"]),
        condition={k: tuple(v) for k, v in meta["condition"].items()},
        text_encoder_params=float(meta.get("text_encoder_params", 0.0)),
        text_encoder=str(meta.get("text_encoder", "")),
    )


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Give every meta-device parameter storage on ``device`` in ``dtype`` and fill it: matrices and
    convolutions ~ N(0, 0.02²), norm scales 1, biases and other vectors 0 (a generic, finite init: the
    values do not matter for time and memory). Buffers computed at construction move to ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            data = torch.empty(param.shape, device=device, dtype=dtype)
            if data.ndim >= 2:
                data.normal_(0.0, 0.02, generator=gen)
            elif name == "weight":
                data.fill_(1.0)
            else:
                data.zero_()
            sub._parameters[name] = nn.Parameter(data, requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                if buf.is_meta:
                    raise ArchitectureError(f"buffer {name} of {type(sub).__name__} has no values to materialize")
                sub._buffers[name] = buf.to(device)
    return module


def random_transformer(
    name: str, dtype: torch.dtype, device: torch.device | str | None = None, num_layers: int | None = None, cls=None
):
    """A random-weight instance of architecture ``name`` built on the meta device and materialised on
    ``device`` (default: CUDA when present, else CPU) in ``dtype``. ``cls`` overrides the diffusers class
    (a fewstep subclass with the same config keys)."""
    import diffusers
    from accelerate import init_empty_weights

    arch = load(name).with_layers(num_layers)
    cls = cls or getattr(diffusers, arch.class_name)
    device = torch.device(device) if device is not None else default_device()
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(arch.config)
    return materialize(model, device, dtype).eval()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
