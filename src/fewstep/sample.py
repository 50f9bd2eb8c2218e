"""``python -m fewstep.sample run_dir=DIR nfe=[1,2,4]``: sample grids and raw samples from a run.

Writes ``DIR/samples/nfe_<n>.png`` (a 10×10 grid) and, where the data has an evaluation protocol,
``DIR/samples/nfe_<n>.npz`` with arrays ``x`` (data space, [-1, 1]) and ``y`` (labels) for any
evaluator. Uses the EMA weights unless ``weights=student``; the student's grids and ``.npz`` go to
``DIR/student_samples/`` instead, never over the run's own final (EMA) samples in ``samples/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fewstep.cli import parse_kv
from fewstep.training.outputs import final_outputs
from fewstep.training.runs import load_run

USAGE = (
    "usage: python -m fewstep.sample run_dir=DIR [nfe=[1,2,4]] [baseline_steps=0] [weights=ema|student] "
    "[device=cpu|cuda] [grid_size=100]"
)
DEFAULTS = {"run_dir": "???", "nfe": [1, 2, 4], "baseline_steps": 0, "weights": "ema", "device": None, "grid_size": 100}


def main(argv: list[str] | None = None, evaluate: bool = False) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_kv(argv, DEFAULTS, USAGE)
    run = load_run(args.run_dir, device=args.device)
    model_fn = run.model_fn(args.weights)
    # samples/ holds the run's final samples (its EMA weights): the student's go beside it, as fewstep.eval's
    # samples under another sampler or checkpoint go to <out>_samples/.
    samples_dir = Path(run.run_dir) / ("samples" if args.weights == "ema" else f"{args.weights}_samples")
    logging.info("sampling %s at step %d (%s weights) into %s", run.checkpoint, run.step, args.weights, samples_dir)
    results = final_outputs(
        run.run_dir, model_fn, run.sampler, run.data, list(args.nfe), args.baseline_steps, run.device,
        evaluate=evaluate, raw=True, grid_size=args.grid_size, log=logging.info, samples_dir=samples_dir,
    )  # fmt: skip
    logging.info("samples in %s", samples_dir)
    return results


if __name__ == "__main__":
    from fewstep.cli import run_cli

    run_cli(main)
