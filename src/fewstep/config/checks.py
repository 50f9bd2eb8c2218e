"""The pieces every config check uses: :class:`ConfigError` (one line naming the fix), range checks and how a group
choice is named. Light (no torch, no models): objectives import it for their own checks (``Objective.check_config``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fewstep.errors import FewstepError


class ConfigError(FewstepError, ValueError):
    """A bad config value or combination; the message names the fix."""


def check_range(key: str, value, lo=None, hi=None, lo_open=False, hi_open=False, hint: str = "") -> None:
    """One line ``<key>=<value> must lie in ...`` when ``value`` is outside [lo, hi] (or open ends)."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        left = "-inf" if lo is None else lo
        right = "inf" if hi is None else hi
        span = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise ConfigError(f"{key}={value} must lie in {span}{hint}")


def choice(cfg: DictConfig, group: str) -> str:
    """``group=<choice>`` as the user wrote it (Hydra's runtime choices), else ``group._target_=<class>``."""
    chosen = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}") if "hydra" in cfg else None
    if chosen is None:
        try:
            from hydra.core.hydra_config import HydraConfig  # set only inside a Hydra job

            chosen = HydraConfig.get().runtime.choices[group]
        except Exception:  # noqa: BLE001 - no Hydra run (the API, tests): name the class instead
            return f"{group}._target_={cfg[group].get('_target_')}"
    return f"{group}={chosen}"
