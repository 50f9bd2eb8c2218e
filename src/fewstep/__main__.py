"""``python -m fewstep [overrides]``: compose the config with Hydra and train."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fewstep.schema import register_schemas

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from fewstep.train import train

    summary = train(cfg)
    return summary.get("optimize")


if __name__ == "__main__":
    main()
