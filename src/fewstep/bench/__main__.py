"""``python -m fewstep.bench``: see :mod:`fewstep.bench.command`."""

from fewstep.bench.command import main
from fewstep.cli import run_cli

run_cli(main)
