"""``python -m fewstep.eval run_dir=DIR nfe=[1,2,4]``: quality metrics of a run; writes ``DIR/eval.json`` and its
grids and raw samples to ``DIR/eval_samples/`` (never into the run's own ``samples/``).

Digits protocol: 1,000 samples (100 per class, fixed noise), clamped to [-1, 1]; acc, digits-FD,
pixel-FD, precision/recall against all 1,797 real digits, with the protocol's floor (real digits)
and ceiling (Gaussian noise) beside them. Toy 2-D data: sliced Wasserstein distance.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fewstep.cli import parse_kv
from fewstep.errors import FewstepError
from fewstep.models.family import bind_guidance
from fewstep.training.outputs import final_outputs
from fewstep.training.runs import load_run

USAGE = (
    "usage: python -m fewstep.eval run_dir=DIR [nfe=[1,2,4]] [baseline_steps=50] [weights=ema|student] "
    "[device=cpu|cuda] [checkpoint=DIR (default: the newest valid one)] [out=FILE (default: DIR/eval.json)] "
    "[sampler.KEY=VALUE ... (override the run's sampler, e.g. sampler.style=few sampler.stochast_ratio=1.0)]"
)
DEFAULTS = {
    "run_dir": "???",
    "nfe": [1, 2, 4],
    "baseline_steps": 50,
    "weights": "ema",
    "device": None,
    "checkpoint": None,
    "out": None,
}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    group = next((a for a in argv if a.split("=", 1)[0] == "sampler"), None)
    if group is not None:  # a training-style group choice: eval keeps the run's sampler kind
        raise SystemExit(
            f"error: {group}: fewstep.eval scores the run's own sampler; change its keys with sampler.KEY=VALUE "
            "(e.g. sampler.style=few), and the multi-step Euler baseline with baseline_steps=N; "
            + " ".join(USAGE.split())
        )
    sampler_overrides = [a.removeprefix("sampler.") for a in argv if a.startswith("sampler.")]
    args = parse_kv([a for a in argv if not a.startswith("sampler.")], DEFAULTS, USAGE)
    run = load_run(args.run_dir, device=args.device, checkpoint=args.checkpoint, command="eval")
    if not hasattr(run.data, "evaluator"):
        raise SystemExit(
            f"error: run_dir={args.run_dir} trains on {type(run.data).__name__}, which has no quality evaluator "
            "(fewstep.eval scores digits and toy2d runs); for its grids use python -m fewstep.sample "
            f"run_dir={args.run_dir}, or add an evaluator (see fewstep.eval.features)"
        )
    sampler_cfg = OmegaConf.merge(run.cfg.sampler, OmegaConf.from_dotlist(sampler_overrides))
    sampler = run.sampler if not sampler_overrides else _sampler(sampler_cfg)
    bind_guidance(sampler, run.student)  # an overridden guided sampler combines as the model's family does
    default_name = "eval.json" if args.weights == "ema" else f"eval_{args.weights}.json"
    path = Path(args.out) if args.out else run.run_dir / default_name
    # The run's own samples/ holds what training wrote (its sampler, its final EMA weights, trainer.final_nfe):
    # an evaluation never writes there. Its grids and .npz go beside its JSON: DIR/eval_samples/ for eval.json,
    # <FILE stem>_samples/ for out=FILE (weights=student: eval_student.json and eval_student_samples/).
    samples_dir = path.parent / f"{path.stem}_samples"
    results = final_outputs(
        run.run_dir, run.model_fn(args.weights), sampler, run.data, list(args.nfe), args.baseline_steps,
        run.device, evaluate=True, log=logging.info, samples_dir=samples_dir,
    )  # fmt: skip
    evaluator = run.data.evaluator()
    out = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "weights": args.weights,
        "samples_dir": str(samples_dir),
        "sampler": OmegaConf.to_container(sampler_cfg),
        "metrics": results,
        "reference": evaluator.reference_points() if hasattr(evaluator, "reference_points") else {},
    }
    path.write_text(json.dumps(out, indent=2))
    logging.info("wrote %s", path)
    return out


def _sampler(cfg):
    from hydra.utils import instantiate

    try:
        return instantiate(cfg, _convert_="all")
    except Exception as err:  # an unknown key or a bad value: one line naming it
        cause = err.__cause__ or err
        raise FewstepError(f"sampler override: {str(cause).splitlines()[0]}") from None


if __name__ == "__main__":
    from fewstep.cli import run_cli

    run_cli(main)
