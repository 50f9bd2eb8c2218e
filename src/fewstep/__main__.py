"""``python -m fewstep [overrides]``: compose the config with Hydra and train."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fewstep.config.schema import register_schemas
from fewstep.config.searchpath import CONF_DIR, with_user_search_path
from fewstep.config.validate import check_overrides
from fewstep.errors import FewstepError, user_error

register_schemas()


def main() -> None:
    """Check the overrides first (a typo or a wrong choice: one ``error:`` line, exit 2), then run Hydra
    with the user's config folders (``./conf``, ``FEWSTEP_CONFIG_PATH``) on its search path."""
    try:
        problem = check_overrides(sys.argv[1:])
        sys.argv = [sys.argv[0], *with_user_search_path(sys.argv[1:])]
    except FewstepError as err:
        problem = str(err)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    # the loop (accelerate, the models) loads here, not at import: --help and a refused override answer at once
    from fewstep.training.loop import RunFinished, train

    _export_submitit_dist_env()
    _log_warnings()
    try:
        summary = train(cfg)
    except Exception as err:  # a setting, path or file to fix (also inside instantiate): one line, no traceback
        found = user_error(err)
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun and isinstance(found, RunFinished):
            # A sweep launched again into its sweep dir: its finished points are skipped as they are, not failed.
            logging.getLogger(__name__).info("skipped: %s", found)
            summary = json.loads((Path(HydraConfig.get().runtime.output_dir) / "summary.json").read_text())
        else:
            if multirun:  # into the point's __main__.log, where the report points
                logging.getLogger(__name__).error("run failed: %s", found or err, exc_info=found is None)
            if found is None or multirun:
                raise  # a bug keeps its traceback; a sweep records the failed point (its report shows it) and goes on
            print(f"error: {found}", file=sys.stderr)
            sys.exit(2)
    if cfg.get("optimize_metric"):  # the value a Hydra sweeper (Optuna) optimises; rank 0 holds the evaluation
        from fewstep.report import lookup_metric

        return lookup_metric(summary, cfg.optimize_metric) if "eval" in summary else None
    return None


def _log_warnings() -> None:
    """Warnings (a setting validate forces, objective=scm's time_scale hint) as one ``[WARNING]`` log line each:
    on the console without the source line that raised them, and in the run's ``__main__.log`` (a sweep's
    points keep theirs)."""
    log = logging.getLogger("fewstep")

    def show(message, category, filename, lineno, file=None, line=None):
        log.warning("%s: %s", category.__name__, message)

    warnings.showwarning = show


def _export_submitit_dist_env() -> None:
    """Under a submitit launcher with several tasks per job (hydra/launcher=slurm_accelerate: one task per GPU),
    give each task the torch.distributed env (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) Accelerate reads."""
    if (
        os.environ.get("SUBMITIT_EXECUTOR")
        and int(os.environ.get("SLURM_NTASKS", "1")) > 1
        and "RANK" not in os.environ
    ):
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


if __name__ == "__main__":
    main()
