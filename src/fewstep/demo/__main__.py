"""``python -m fewstep.demo``: see :mod:`fewstep.demo.run`."""

import sys

from fewstep.demo.run import DemoError, main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DemoError as err:
        sys.exit(f"error: {err}")
