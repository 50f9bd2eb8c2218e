"""``python -m fewstep.eval run_dir=DIR nfe=[1,2,4]``: quality metrics of a run; writes ``DIR/eval.json``.

Digits protocol: 1,000 samples (100 per class, fixed noise), clamped to [-1, 1]; acc, digits-FD,
pixel-FD, precision/recall against all 1,797 real digits, with the protocol's floor (real digits)
and ceiling (Gaussian noise) beside them. Toy 2-D data: sliced Wasserstein distance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fewstep.generate import final_outputs
from fewstep.runs import load_run, parse_args

USAGE = (
    "usage: python -m fewstep.eval run_dir=DIR [nfe=[1,2,4]] [baseline_steps=50] [weights=ema|student] "
    "[device=cpu|cuda] [checkpoint=DIR (default: the newest valid one)] [out=FILE (default: DIR/eval.json)]"
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
    args = parse_args(argv, DEFAULTS, USAGE)
    run = load_run(args.run_dir, device=args.device, checkpoint=args.checkpoint)
    if not hasattr(run.data, "evaluator"):
        raise SystemExit(f"data {type(run.data).__name__} has no evaluator; see fewstep.eval.features for a hook")
    results = final_outputs(
        run.run_dir, run.model_fn(args.weights), run.sampler, run.data, list(args.nfe), args.baseline_steps,
        run.device, evaluate=True, log=logging.info,
    )  # fmt: skip
    evaluator = run.data.evaluator()
    out = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "weights": args.weights,
        "metrics": results,
        "reference": evaluator.reference_points() if hasattr(evaluator, "reference_points") else {},
    }
    path = Path(args.out) if args.out else run.run_dir / "eval.json"
    path.write_text(json.dumps(out, indent=2))
    logging.info("wrote %s", path)
    return out


if __name__ == "__main__":
    from fewstep.errors import run_cli

    run_cli(main)
