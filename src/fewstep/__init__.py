"""fewstep: few-step training of flow-matching image generators (TwinFlow / RCGM).

``import fewstep`` stays light (no diffusers); ``from fewstep import TwinFlowScheduler``
imports the diffusers scheduler on demand. It also lets diffusers find fewstep's classes in exported
pipelines by their library names, once diffusers loads its pipelines (:mod:`fewstep.export.code`), so a
bare ``<Family>Pipeline.from_pretrained(EXPORT_DIR)`` needs only ``import fewstep``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TwinFlowScheduler"]


def __getattr__(name: str) -> Any:
    if name == "TwinFlowScheduler":
        from fewstep.samplers.scheduler import TwinFlowScheduler

        return TwinFlowScheduler
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


def _install_export_hook() -> None:
    from fewstep.export.code import install_hook

    install_hook()


_install_export_hook()
