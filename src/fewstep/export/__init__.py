"""Export (``python -m fewstep.export``): a run as a diffusers pipeline folder. The command (:mod:`.command`),
the run's model and the pipelines loaded back (:mod:`.pipeline`), the model card (:mod:`.card`), fewstep's classes
copied into the folder (:mod:`.code`) and the push to the Hub (:mod:`.hub`).

``from fewstep.export import load_pipeline, load_lora_pipeline`` is what exported model cards show; it stays."""

from __future__ import annotations

from typing import Any

__all__ = ["load_lora_pipeline", "load_pipeline"]


def __getattr__(name: str) -> Any:  # lazy: `import fewstep` imports fewstep.export.code, not the pipelines
    if name in __all__:
        from fewstep.export import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'fewstep.export' has no attribute {name!r}")
