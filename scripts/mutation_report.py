"""The mutation-testing report of the last ``make mutate`` run: killed / survived / timeout / no tests per file,
the score (killed + timeout over the mutants that ran, equivalents left out) and every surviving mutant's diff,
marked where docs/raw/mutation/equivalent.txt says why it cannot be killed.

    python scripts/mutation_report.py [--out docs/raw/mutation/report.md]

Reads what mutmut 3 recorded under mutants/ (``mutmut results --all true``, ``mutmut show NAME``).
equivalent.txt: one mutant a line, ``<mutant name>  <why no test can tell it from the original>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "docs" / "raw" / "mutation" / "equivalent.txt"


def mutmut(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: mutmut {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def diff_of(mutant: str) -> str:
    """The mutant's diff (``mutmut show``, in this process: one interpreter for hundreds of mutants)."""
    from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant

    return get_diff_for_mutant(mutant, path=find_mutant(mutant).path).strip()


def source_file(mutant: str) -> str:
    """``fewstep.path.x_full_time__mutmut_3`` (a method: ``fewstep.objectives.scm.xǁSCMǁloss__mutmut_3``) ->
    ``src/fewstep/path.py``."""
    return "src/" + mutant.rsplit(".", 1)[0].replace(".", "/") + ".py"


def equivalents() -> dict[str, str]:
    if not EQUIVALENT.exists():
        return {}
    out = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.strip().partition(" ")
            out[name] = why.strip()
    return out


def main() -> None:
    os.chdir(ROOT)  # mutmut reads pyproject.toml and mutants/ from here
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "raw" / "mutation" / "report.md"))
    args = parser.parse_args()
    statuses = {}
    for line in mutmut("results", "--all", "true").splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            statuses[name] = status
    if not statuses:
        raise SystemExit("error: no mutmut results under mutants/; run `make mutate` first")
    known = equivalents()
    by_file: dict[str, Counter] = defaultdict(Counter)
    survivors = defaultdict(list)
    untested: dict[str, set] = defaultdict(set)
    for name, status in sorted(statuses.items()):
        path = source_file(name)
        if status == "survived" and name in known:
            status = "equivalent"
        by_file[path][status] += 1
        if status in ("survived", "equivalent"):
            survivors[path].append(name)
        if status == "no tests":
            untested[path].add(name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1])
    from importlib.metadata import version

    lines = [
        "# Mutation testing (mutmut): the last `make mutate`",
        "",
        f"mutmut {version('mutmut')}; made by `make mutate` (`mutmut run`, then `python scripts/mutation_report.py`);"
        " the files and tests are `[tool.mutmut]` in pyproject.toml. `not checked`: the run was stopped before it.",
        "",
        "Score = (killed + timeout) / (killed + timeout + survived + no tests): equivalent mutants left out, a mutant"
        " no fast test reaches (`no tests`) counted as not killed.",
        "",
        "| file | killed | timeout | survived | equivalent | no tests | not checked | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, c in sorted(by_file.items()):
        ran = c["killed"] + c["timeout"] + c["survived"] + c["no tests"]
        score = (c["killed"] + c["timeout"]) / ran if ran else float("nan")
        lines.append(
            f"| {path} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['equivalent']} | {c['no tests']} | "
            f"{c['not checked']} | {100 * score:.1f} % |"
        )
    for path in sorted(untested):
        lines += ["", f"No fast test reaches these functions of {path}: {', '.join(sorted(untested[path]))}"]
    for path in sorted(survivors):
        lines += ["", f"## Surviving mutants: {path}", ""]
        for name in survivors[path]:
            why = known.get(name)
            lines.append(f"### {name}" + (f" (equivalent: {why})" if why else ""))
            lines += ["", "```diff", diff_of(name), "```", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 8 + len(by_file)]))


if __name__ == "__main__":
    main()
