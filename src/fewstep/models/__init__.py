"""Model builders. Every model is called as ``f(x_t, t, tt, cond) -> velocity`` (flow convention)."""

from __future__ import annotations

from hydra.utils import instantiate


def build_model(model_cfg, data, objective):
    """Instantiate the configured model for this data and objective.

    ``time_pair`` asks the model for the target-time and sign embeddings; objectives that do not
    need them (flow matching) get the vanilla model.
    """
    model = instantiate(
        model_cfg,
        data_shape=list(data.shape),
        num_classes=data.num_classes,
        time_pair=objective.needs_time_pair,
        _convert_="all",
    )
    if objective.needs_time_pair and not getattr(model, "time_pair", False):
        raise ValueError(
            f"{type(model).__name__} has no target-time/sign embedding, which {type(objective).__name__} needs; "
            "use a model that supports time_pair (model=tiny, model=sd35, ...)"
        )
    return model
