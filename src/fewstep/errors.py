"""The base class of every error a user can fix by changing a setting, a path or a file.

The command-line entry points print such an error as one line (``error: ...``) and exit with
status 2, instead of a traceback; anything else is a bug and keeps its traceback.
"""


class FewstepError(Exception):
    """A user-fixable problem; the message names the fix."""


def run_cli(main, *args, **kwargs):
    """Call a command's ``main``; a FewstepError becomes ``error: <message>`` on stderr and exit status 2."""
    import sys

    try:
        return main(*args, **kwargs)
    except FewstepError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
