"""The base class of every error a user can fix by changing a setting, a path or a file.

The command-line entry points (:func:`fewstep.cli.run_cli`) print such an error as one line (``error: ...``) and
exit with status 2, instead of a traceback; anything else is a bug and keeps its traceback.
"""


class FewstepError(Exception):
    """A user-fixable problem; the message names the fix."""


def describe(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it), for quoting a library's error
    inside a one-line fewstep message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {' '.join(text.splitlines()[0].split())[:limit]}" if text else type(err).__name__


SETTINGS = ("objective.", "teacher.", "sampler.", "model.", "data.", "trainer.", "logger.")


def user_error(err: BaseException) -> FewstepError | None:
    """The FewstepError ``err`` is, or the one Hydra's ``instantiate`` wrapped while building a component
    (a missing pretrained folder, an unreachable hub id, a bad cache), or a ValueError a component's constructor
    raised naming the setting it refuses (``teacher.decay=1.5 must lie in [0, 1]``); None for anything else (a
    bug)."""
    from hydra.errors import InstantiationException

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, FewstepError):
            return err
        if not isinstance(err, InstantiationException):
            if seen and isinstance(err, ValueError) and str(err).startswith(SETTINGS):
                return FewstepError(str(err))
            return None
        seen.add(id(err))
        err = err.__cause__
    return None
