"""A diffusers component's ``config.json``, read before any weight: ``validate`` checks weights are reachable
and the latent cache fits the transformer from it, so a bad combination fails in a line, not after loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fewstep.models.family import PretrainedNotFound, load_error, resolve_pretrained


def _hub_reachable(endpoint: str) -> bool:
    """False when the hub's host does not even resolve (no network): fail at once instead of after
    huggingface_hub's retries (about 25 s). Behind a proxy the local resolver may not know it: assume yes."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(endpoint).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _read_hub_config(repo: str, subfolder: str | None, revision: str | None) -> dict:
    import logging
    import warnings

    from diffusers.configuration_utils import ConfigMixin
    from huggingface_hub import constants, try_to_load_from_cache

    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    cached = try_to_load_from_cache(repo, filename, revision=revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if not constants.HF_HUB_OFFLINE and not _hub_reachable(constants.ENDPOINT):
        raise OSError(
            f"{constants.ENDPOINT} is unreachable from here (no network) and {repo} "
            "is neither a local folder nor cached"
        )

    class ComponentConfig(ConfigMixin):  # reads any component's config.json
        config_name = "config.json"

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry messages: the one error line says it all
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(ComponentConfig.load_config(repo, subfolder=subfolder, revision=revision))
    finally:
        hub_log.setLevel(level)


def pretrained_config(model) -> dict:
    """The ``config.json`` of the model config's transformer (or UNet): a local file, or the hub's (cached, or
    fetched: a few kB). Raises PretrainedNotFound, one line naming ``model.pretrained``, when neither works."""

    component = (
        "unet" if str(model.get("_target_", "")).endswith(("DiffusionUNetModel", "SDXLUNetModel")) else "transformer"
    )
    source, sub = resolve_pretrained(str(model.pretrained), component, model.get("subfolder"))
    local = Path(source) / (sub or "") / "config.json"
    if local.exists():
        return json.loads(local.read_text())
    try:
        return _read_hub_config(source, sub, model.get("revision"))
    except PretrainedNotFound:
        raise
    except Exception as err:  # noqa: BLE001 - diffusers / huggingface_hub raise many types for an unreachable id
        raise load_error("model.pretrained", str(model.pretrained), err) from None


def max_latent_side(config: dict) -> int | None:
    """The largest latent height/width the transformer takes: ``pos_embed_max_size`` patches of ``patch_size``
    (SD3's cropped position embedding); None for families without such a limit."""
    limit = config.get("pos_embed_max_size")
    return int(limit) * int(config.get("patch_size") or 1) if limit else None
