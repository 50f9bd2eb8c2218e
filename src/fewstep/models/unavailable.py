"""A placeholder for model families that a paper row names before fewstep has a wrapper for them.

A ``conf/model/<family>.yaml`` whose ``_target_`` is :class:`UnavailableModel` composes (an experiment's values can be
read and tested) but a run stops at start with one line: ``model family <family> is not available yet ...``.
Every family of SPEC §7 has a wrapper now (OpenUni was the last); the mechanism stays for the next one.
:func:`check_available` raises that error from the config alone, before data or weights load.
"""

from __future__ import annotations

from fewstep.validate import ConfigError

TARGET = f"{__name__}.UnavailableModel"
AVAILABLE = "model=tiny, tiny_toy, sd35, sd35_lora, sana, sana_lora, qwenimage, qwenimage_lora, openuni or openuni_lora"


class ModelFamilyUnavailable(ConfigError):
    """The configured model family has no fewstep wrapper yet."""


def unavailable_message(family: str) -> str:
    return (
        f"model family {family} is not available yet: fewstep has no {family} wrapper in fewstep/models/ "
        f"(the experiment's values are kept for when it lands); use {AVAILABLE}"
    )


def check_available(model_cfg) -> None:
    """Raise :class:`ModelFamilyUnavailable` when ``model_cfg`` selects a placeholder family."""
    if str(model_cfg.get("_target_", "")) == TARGET:
        raise ModelFamilyUnavailable(unavailable_message(str(model_cfg.get("family", "?"))))


class UnavailableModel:
    """Placeholder ``_target_``: building it raises :class:`ModelFamilyUnavailable`."""

    def __init__(self, family: str = "?", **_ignored) -> None:
        raise ModelFamilyUnavailable(unavailable_message(family))
