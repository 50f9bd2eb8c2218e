"""``python -m fewstep.report [MULTIRUN_DIR]``: one table and a few plots for a Hydra multirun (SPEC §6, §8).

For every run directory under MULTIRUN_DIR (Hydra's ``<job.num>/``) it reads ``.hydra/overrides.yaml`` (the
swept values), ``summary.json``, ``metrics.jsonl`` and, when ``python -m fewstep.eval`` wrote one, ``eval.json``.
It writes into MULTIRUN_DIR:

* ``report.csv`` — one row per run: status, swept params, steps, steps/s, wall time, final loss, peak memory
  and every quality metric of every sampling method in the summaries (``nfe_1/fd``, ``euler_50/swd``, ...);
* ``report.md`` — the same rows with the headline metrics (acc, fd, pixel_fd for digits; swd for toy2d),
  the best run and the plots;
* ``heatmap_<metric>.png`` over the two swept params (``line_<metric>.png`` when one param varies) of the
  1-NFE metric: digits-FD when present, else swd, else the final loss;
* ``loss_curves.png`` — loss against step, one line per run.

A run without ``summary.json`` (it failed, was killed or is still running) is a row marked ``failed``: the
report never stops on one. Without MULTIRUN_DIR the newest ``multirun/<date>/<time>`` under the current
directory is reported. The sweep presets (``experiment=sweep/...``) also refresh the report after every job
through :class:`SweepReportCallback`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("fewstep.report")

# Metric names in table order; others found in the summaries follow, sorted.
METRIC_ORDER = ("acc", "fd", "pixel_fd", "precision", "recall", "swd")
# The subset report.md shows (report.csv has all).
KEY_METRICS = ("acc", "fd", "pixel_fd", "swd")
HIGHER_IS_BETTER = {"acc", "precision", "recall"}
# The heatmap's metric: the first one any run has.
HEADLINE = ("nfe_1/fd", "nfe_1/swd", "loss")
BASE_COLUMNS = ("steps", "steps_per_s", "nfe/per_step", "wall_time_s", "loss", "peak_memory_mb")


@dataclass
class Run:
    """One run directory of a multirun."""

    name: str
    path: Path
    overrides: dict[str, str]
    status: str  # ok | failed | stopped
    summary: dict = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) from metrics.jsonl
    values: dict[str, Any] = field(default_factory=dict)  # column -> value


# --------------------------------------------------------------------------- reading


def failure_reason(run_dir: Path) -> str:
    """The last ``run failed: ...`` line a failed sweep point logged in its ``__main__.log`` ("" if none)."""
    try:
        lines = (Path(run_dir) / "__main__.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.split("run failed: ", 1)[1] for line in reversed(lines) if "run failed: " in line), "")


def _sort_key(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_run_dirs(root: Path) -> list[Path]:
    """Subdirectories that hold a run (a ``.hydra`` folder, ``summary.json`` or ``metrics.jsonl``)."""
    markers = (".hydra", "summary.json", "metrics.jsonl")
    dirs = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / m).exists() for m in markers)
    ]
    return sorted(dirs, key=_sort_key)


def latest_multirun(base: Path = Path("multirun")) -> Path | None:
    """The newest ``multirun/<date>/<time>`` that holds runs, or None."""
    candidates = [p for p in base.glob("*/*") if p.is_dir() and find_run_dirs(p)]
    return max(candidates, key=lambda p: (p.parent.name, p.name)) if candidates else None


def _override_key(text: str) -> tuple[str, str] | None:
    """``key=value`` (with Hydra's ``+``/``++``/``~`` prefixes) -> (key, value)."""
    text = text.strip()
    if "=" not in text:
        return None
    key, value = text.split("=", 1)
    return key.lstrip("+~"), value


def read_overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    pairs = (_override_key(str(item)) for item in items)
    return dict(p for p in pairs if p is not None)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) from ``metrics.jsonl``; unreadable lines (a run killed mid-write) are skipped."""
    curve = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return curve
    for line in lines:
        try:
            row = json.loads(line)
            curve.append((int(row["step"]), float(row["loss"])))
        except (ValueError, KeyError, TypeError):
            continue
    return curve


def declared_sweep_keys(root: Path) -> list[str]:
    """Keys the multirun sweeps according to ``multirun.yaml``: ``hydra.sweeper.params`` (and an Optuna
    ``search_space``) merged with the command line as Hydra's sweepers do, where a later ``key=value`` replaces
    a declared axis and ``key=a,b`` / ``range(...)`` / ``choice(...)`` adds one."""
    try:
        cfg = yaml.safe_load((root / "multirun.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    hydra = cfg.get("hydra") or {}
    sweeper = hydra.get("sweeper") or {}
    keys = list((sweeper.get("search_space") or {}).keys())
    declared = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    task = [str(t) for t in ((hydra.get("overrides") or {}).get("task") or [])]
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        final = {}
        for override in OverridesParser.create().parse_overrides(declared + task):
            final[override.key_or_group] = override.is_sweep_override()
        keys += [k for k, swept in final.items() if swept and k not in keys]
    except Exception:  # noqa: BLE001 - an unparsable override only loses the declaration, not the runs
        keys += [d.split("=", 1)[0] for d in declared]
    return [k.lstrip("+~") for k in keys]


def swept_keys(runs: list[Run], declared: list[str]) -> list[str]:
    """The overrides whose value differs between runs, in override order. With a single run, the keys the
    multirun declared as sweeps (an axis collapsed on the command line, ``a=1``, is not swept)."""
    all_keys: list[str] = []
    for run in runs:
        for key in run.overrides:
            if key not in all_keys:
                all_keys.append(key)
    varying = [k for k in all_keys if len({run.overrides.get(k) for run in runs}) > 1]
    if len(runs) > 1:
        return varying
    return [k for k in all_keys if k in declared] + [k for k in declared if k not in all_keys]


def _method_order(name: str):
    if name.startswith("nfe_") and name[4:].isdigit():
        return (0, int(name[4:]), name)
    return (1, 0, name)


def _metric_order(name: str):
    return (METRIC_ORDER.index(name), name) if name in METRIC_ORDER else (len(METRIC_ORDER), name)


def _evaluations(run_dir: Path, summary: dict) -> dict[str, dict]:
    """``{method: {metric: value}}`` from summary.json's ``eval``, completed by a later ``eval.json``."""
    evals = {k: dict(v) for k, v in (summary.get("eval") or {}).items() if isinstance(v, dict)}
    extra = _read_json(run_dir / "eval.json") or {}
    for method, metrics in (extra.get("metrics") or {}).items():
        if isinstance(metrics, dict):
            evals.setdefault(method, {}).update(metrics)
    return evals


def load_run(run_dir: Path) -> Run:
    summary = _read_json(run_dir / "summary.json")
    curve = read_curve(run_dir)
    if summary is None:
        status, summary = "failed", {}
    else:
        status = "stopped" if summary.get("stopped_by") else "ok"
    run = Run(run_dir.name, run_dir, read_overrides(run_dir), status, summary, curve)
    values: dict[str, Any] = {k: summary.get(k) for k in BASE_COLUMNS if k != "loss"}
    values["loss"] = summary.get("loss", curve[-1][1] if curve else None)
    if values["steps"] is None and curve:
        values["steps"] = curve[-1][0]  # how far a failed run got
    for method, metrics in _evaluations(run_dir, summary).items():
        for metric, value in metrics.items():
            values[f"{method}/{metric}"] = value
    run.values = values
    return run


def collect(root: Path) -> tuple[list[Run], list[str]]:
    """The runs under ``root`` and the swept parameter names."""
    runs = [load_run(p) for p in find_run_dirs(root)]
    return runs, swept_keys(runs, declared_sweep_keys(root))


def metric_columns(runs: list[Run]) -> list[str]:
    # every "<method>/<metric>" value but the base columns (nfe/per_step has a "/" too)
    cols = {c for run in runs for c in run.values if "/" in c and c not in BASE_COLUMNS}
    return sorted(cols, key=lambda c: (_method_order(c.split("/")[0]), _metric_order(c.split("/", 1)[1])))


def headline_metric(runs: list[Run]) -> str:
    for col in HEADLINE:
        if any(_finite(run.values.get(col)) is not None for run in runs):
            return col
    return "loss"


def lookup_metric(summary: dict, name: str) -> float:
    """``summary`` value at a dotted path (``eval.nfe_1.fd``, ``loss``, ``steps_per_s``) as a float.

    Used for ``optimize_metric`` (the value a Hydra sweeper such as Optuna optimises). Raises KeyError naming
    the keys that exist when the path is missing (e.g. evaluation was off)."""
    node: Any = summary
    walked = []
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            have = sorted(node) if isinstance(node, dict) else []
            where = ".".join(walked) or "summary.json"
            raise KeyError(f"optimize_metric={name}: no {part!r} in {where} (has: {', '.join(map(str, have))})")
        node = node[part]
        walked.append(part)
    return float(node)


# --------------------------------------------------------------------------- tables


def _finite(value) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(value, col: str = "") -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    f = _finite(value)
    if f is None:
        return str(value)
    if col in ("steps_per_s", "wall_time_s", "peak_memory_mb"):
        return f"{f:.1f}"
    return f"{f:.4g}"


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_csv(path: Path, runs: list[Run], params: list[str], metrics: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["run", "status", *params, *BASE_COLUMNS, *metrics])
    for run in runs:
        writer.writerow(
            [run.name, run.status]
            + [run.overrides.get(p, "") for p in params]
            + ["" if run.values.get(c) is None else run.values[c] for c in (*BASE_COLUMNS, *metrics)]
        )
    _write_atomic(path, buf.getvalue())


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def best_run(runs: list[Run], metric: str) -> Run | None:
    scored = [(v, r) for r in runs if r.status == "ok" and (v := _finite(r.values.get(metric))) is not None]
    if not scored:
        return None
    pick = max if metric.split("/")[-1] in HIGHER_IS_BETTER else min
    return pick(scored, key=lambda vr: vr[0])[1]


def write_markdown(
    path: Path, root: Path, runs: list[Run], params: list[str], metrics: list[str], headline: str, plots: list[str]
) -> None:
    shown = [m for m in metrics if m.split("/", 1)[1] in KEY_METRICS]
    labels = {"steps_per_s": "steps/s", "nfe/per_step": "evals/step", "wall_time_s": "wall s", "loss": "final loss",
              "peak_memory_mb": "peak MB"}  # fmt: skip
    header = ["run", "status", *params, *(labels.get(c, c) for c in BASE_COLUMNS), *shown]
    rows = [
        [run.name, run.status]
        + [run.overrides.get(p, "") for p in params]
        + [_fmt(run.values.get(c), c) for c in (*BASE_COLUMNS, *shown)]
        for run in runs
    ]
    failed = [r.name for r in runs if r.status == "failed"]
    out = [
        f"# Sweep report: `{root}`",
        "",
        f"{len(runs)} runs ({len(runs) - len(failed)} finished, {len(failed)} failed or unfinished)"
        + (f"; swept: {', '.join(f'`{p}`' for p in params)}" if params else "; no swept parameter found"),
        "",
        _markdown_table(header, rows),
        "",
    ]
    best = best_run(runs, headline)
    if best is not None:
        what = ", ".join(f"{p}={best.overrides.get(p, '')}" for p in params) or "-"
        direction = "highest" if headline.split("/")[-1] in HIGHER_IS_BETTER else "lowest"
        out += [f"Best by `{headline}` ({direction}): run {best.name} ({what}) = {_fmt(best.values[headline])}", ""]
    if failed:
        out += [f"Failed or unfinished (no summary.json): {', '.join(failed)}. See each run's `__main__.log`.", ""]
        reasons = [(r.name, failure_reason(r.path)) for r in runs if r.status == "failed"]
        out += [f"- {name}: {why}" for name, why in reasons if why] + ([""] if any(w for _, w in reasons) else [])
    if len(params) > 2:
        out += [f"No heatmap: {len(params)} parameters vary (a heatmap needs exactly two, a line plot one).", ""]
    for plot in plots:
        out += [f"![{plot}]({plot})", ""]
    out += footer(metrics, shown)
    _write_atomic(path, "\n".join(out) + "\n")


def footer(metrics: list[str], shown: list[str]) -> list[str]:
    """What the report holds: the metric column naming where there are metrics, and which metrics only report.csv
    has (a toy2d sweep has swd only; a sweep without evaluation has no metric at all)."""
    if not metrics:
        return ["No quality metrics: the runs were not evaluated (trainer.evaluate=false, or data without an "
                "evaluator); report.csv has every column."]  # fmt: skip
    only_csv = sorted({m.split("/", 1)[1] for m in metrics if m not in shown})  # e.g. digits' precision, recall
    names = " and ".join([", ".join(only_csv[:-1]), only_csv[-1]] if len(only_csv) > 1 else only_csv)
    return [
        "Columns: `nfe_N/<metric>` = the few-step sampler at N steps, `euler_K/<metric>` = the K-step Euler",
        "baseline; report.csv has every column" + (f", {names} included." if names else "."),
    ]


# --------------------------------------------------------------------------- plots


def _axis_values(values: list[str]) -> list[str]:
    uniq = list(dict.fromkeys(values))
    if all(_finite(v) is not None for v in uniq):
        return sorted(uniq, key=float)
    return sorted(uniq)


def _slug(name: str) -> str:
    return name.replace("/", "_").replace(".", "_")


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _cell(runs: list[Run], metric: str) -> tuple[float | None, str]:
    """Mean metric of the finished runs in a cell, and a note when there is none."""
    vals = [v for r in runs if r.status == "ok" and (v := _finite(r.values.get(metric))) is not None]
    if vals:
        return sum(vals) / len(vals), ""
    if any(r.status == "failed" for r in runs):
        return None, "failed"
    return None, "n/a" if runs else ""


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _write_atomic(path, buf.getvalue())


def plot_heatmap(path: Path, runs: list[Run], params: list[str], metric: str) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    a, b = params
    ys = _axis_values([r.overrides.get(a, "") for r in runs])
    xs = _axis_values([r.overrides.get(b, "") for r in runs])
    grid = np.full((len(ys), len(xs)), np.nan)
    notes = [["" for _ in xs] for _ in ys]
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            members = [r for r in runs if r.overrides.get(a, "") == yv and r.overrides.get(b, "") == xv]
            value, notes[i][j] = _cell(members, metric)
            if value is not None:
                grid[i, j] = value
    higher = metric.split("/")[-1] in HIGHER_IS_BETTER
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.5, 1.0 * len(ys) + 1.8))
    cmap = plt.get_cmap("viridis" if higher else "viridis_r").with_extremes(bad="#dddddd")
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    if finite.size:
        fig.colorbar(image, ax=ax, label=metric)
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isfinite(grid[i, j]):
                dark = (grid[i, j] > mid) != higher  # light text on the dark end of the colormap
                ax.text(j, i, f"{grid[i, j]:.4g}", ha="center", va="center", color="white" if dark else "black")
            elif notes[i][j]:
                ax.text(j, i, notes[i][j], ha="center", va="center", color="#aa0000")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(b)
    ax.set_ylabel(a)
    ax.set_title(f"{metric} ({'higher' if higher else 'lower'} is better)")
    _save(fig, path)
    plt.close(fig)


def plot_line(path: Path, runs: list[Run], param: str, metric: str) -> None:
    import matplotlib.pyplot as plt

    xs = _axis_values([r.overrides.get(param, "") for r in runs])
    points = [(x, _cell([r for r in runs if r.overrides.get(param, "") == x], metric)) for x in xs]
    numeric = all(_finite(x) is not None for x in xs)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    pos = [float(x) if numeric else i for i, x in enumerate(xs)]
    ok = [(p, v) for p, (_, (v, _)) in zip(pos, points) if v is not None]
    if ok:
        ax.plot([p for p, _ in ok], [v for _, v in ok], "o-")
    for p, (_, (v, note)) in zip(pos, points):
        if v is None and note:
            ax.annotate(note, (p, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom", color="#aa0000")
    if not numeric:
        ax.set_xticks(pos, xs)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    higher = metric.split("/")[-1] in HIGHER_IS_BETTER
    ax.set_title(f"{metric} ({'higher' if higher else 'lower'} is better)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_loss_curves(path: Path, runs: list[Run], params: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    positive = True
    for run in runs:
        if not run.curve:
            continue
        steps, losses = zip(*run.curve)
        positive &= all(v > 0 for v in losses)
        label = ", ".join(f"{_short(p)}={run.overrides.get(p, '')}" for p in params) or f"run {run.name}"
        style = ("-" if run.status == "ok" else "--") + ("o" if len(steps) < 20 else "")
        suffix = "" if run.status == "ok" else f" ({run.status})"
        ax.plot(steps, losses, style, markersize=3, label=f"{run.name}: {label}{suffix}")
    if positive and ax.lines:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=2 if len(ax.lines) > 16 else 1)
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- entry points


def write_report(root: str | Path) -> dict:
    """Write the report files into ``root``; return what was written (paths, params, headline metric)."""
    import matplotlib

    matplotlib.use("Agg")
    root = Path(root)
    runs, params = collect(root)
    if not runs:
        raise FileNotFoundError(
            f"{root}: no run directories (subfolders with .hydra/, summary.json or metrics.jsonl); "
            "give a multirun/<date>/<time> folder"
        )
    metrics = metric_columns(runs)
    headline = headline_metric(runs)
    for stale in [*root.glob("heatmap_*.png"), *root.glob("line_*.png")]:  # from an earlier refresh
        stale.unlink(missing_ok=True)
    plots = []
    if len(params) == 2:
        name = f"heatmap_{_slug(headline)}.png"
        plot_heatmap(root / name, runs, params, headline)
        plots.append(name)
    elif len(params) == 1:
        name = f"line_{_slug(headline)}.png"
        plot_line(root / name, runs, params[0], headline)
        plots.append(name)
    if any(run.curve for run in runs):
        plot_loss_curves(root / "loss_curves.png", runs, params)
        plots.append("loss_curves.png")
    write_csv(root / "report.csv", runs, params, metrics)
    write_markdown(root / "report.md", root, runs, params, metrics, headline, plots)
    return {
        "csv": root / "report.csv",
        "markdown": root / "report.md",
        "plots": [root / p for p in plots],
        "params": params,
        "headline": headline,
        "runs": len(runs),
        "failed": sum(r.status == "failed" for r in runs),
    }


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency; keep the CLI usable without it
    Callback = object  # type: ignore[assignment,misc]


class SweepReportCallback(Callback):
    """Hydra callback (``hydra.callbacks``) that keeps ``report.*`` of a multirun up to date.

    It rewrites the report after every job (so a sweep that stops half-way, or whose jobs run on a cluster,
    still has one) and once more when the multirun ends. It only logs a warning when writing fails, and
    does nothing outside multirun mode or on a non-zero distributed rank."""

    def _refresh(self, config) -> None:
        try:
            from hydra.types import RunMode

            hydra_cfg = config.hydra
            if hydra_cfg.mode != RunMode.MULTIRUN or int(os.environ.get("RANK", "0")) != 0:
                return
            out = write_report(hydra_cfg.sweep.dir)
            log.info("sweep report: %s (%d runs, %d failed)", out["markdown"], out["runs"], out["failed"])
        except Exception as err:  # noqa: BLE001 - a report problem must never fail the sweep
            log.warning("sweep report not written: %s: %s", type(err).__name__, err)

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        self._refresh(config)

    def on_multirun_end(self, config, **kwargs) -> None:
        self._refresh(config)


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line errors of every fewstep tool: ``error: ...; usage: ...`` (exit status 2 under
    :func:`fewstep.errors.run_cli`), not argparse's usage line then ``python -m fewstep.report: error: ...``."""

    def error(self, message: str):
        raise SystemExit(f"error: {message}; {' '.join(self.format_usage().split())}")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m fewstep.report",
        description="Sweep table (report.csv, report.md) and plots (heatmap/line of the 1-NFE metric, loss curves) "
        "for a Hydra multirun directory.",
    )
    parser.add_argument(
        "multirun_dir",
        nargs="?",
        type=Path,
        help="multirun/<date>/<time> (default: the newest one under ./multirun)",
    )
    args = parser.parse_args(argv)
    root = args.multirun_dir or latest_multirun()
    if root is None:
        parser.error("no MULTIRUN_DIR given and no multirun/<date>/<time> with runs under the current directory")
    if not root.is_dir():
        parser.error(f"{root}: not a directory")
    try:
        out = write_report(root)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((root / "report.md").read_text())
    print(f"wrote {out['csv']}, {out['markdown']}" + "".join(f", {p}" for p in out["plots"]))
    return 0


if __name__ == "__main__":
    from fewstep.cli import run_cli

    raise SystemExit(run_cli(main))
