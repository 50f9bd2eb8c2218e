"""fewstep: few-step training of flow-matching image generators (TwinFlow / RCGM).

``import fewstep`` stays light (no diffusers); ``from fewstep import TwinFlowScheduler``
imports the diffusers scheduler on demand.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TwinFlowScheduler"]


def __getattr__(name: str) -> Any:
    if name == "TwinFlowScheduler":
        from fewstep.samplers.scheduler import TwinFlowScheduler

        return TwinFlowScheduler
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
