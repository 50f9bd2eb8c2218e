"""``python -m fewstep.export``: see :mod:`fewstep.export.command`."""

from fewstep.cli import run_cli
from fewstep.export.command import main

run_cli(main)
