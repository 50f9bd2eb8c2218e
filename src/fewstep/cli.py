"""The command line of fewstep's tools (precompute, export, sample, eval, bench, report, convert_openuni): their
``key=value`` arguments (:func:`parse_kv`) and their entry point (:func:`run_cli`: a user error becomes one
``error:`` line and exit status 2; what makes an error a user's is :mod:`fewstep.errors`).

One parser for all of them: OmegaConf dotlist syntax (lists as ``nfe=[1,2,4]``) merged over the tool's typed
defaults. Every mistake exits with one ``error:`` line that names the fix (an unknown key gets the closest known
one) followed, on the same line, by the tool's usage.
"""

from __future__ import annotations

import difflib
import sys

from fewstep.errors import describe, user_error


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse_kv(argv: list[str] | None, defaults: dict, usage: str):
    """The tool's arguments as a struct ``DictConfig`` (``-h``/``--help`` print ``usage`` and exit 0)."""
    from omegaconf import OmegaConf

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        raise SystemExit(0)
    usage_line = _one_line(usage)
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"error: expected key=value, got {arg!r}; {usage_line}")
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0] not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean {close[0]}=?)" if close else ""
            raise SystemExit(f"error: unknown argument {key}={hint}; {usage_line}")
    base = OmegaConf.create(defaults)
    OmegaConf.set_struct(base, True)
    try:
        args = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    except Exception as err:  # omegaconf raises several types for bad values
        raise SystemExit(f"error: {describe(err, limit=1000)}; {usage_line}") from None
    missing = sorted(OmegaConf.missing_keys(args))
    if missing:
        raise SystemExit(f"error: {missing[0]}= is required; {usage_line}")
    for key, default in defaults.items():  # NFE lists: nfe=2 is nfe=[2]; nfe=1,2 or nfe=[0] is named here
        if isinstance(default, list) and default and all(type(v) is int for v in default):
            value = args[key]
            if type(value) is int:
                args[key] = [value]
                value = args[key]
            if not OmegaConf.is_list(value) or not all(type(v) is int and v >= 1 for v in value):
                given = next((a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+~") == key), value)
                example = ",".join(str(v) for v in default)
                raise SystemExit(
                    f"error: {key}={given}: give a list of positive integers, e.g. {key}=[{example}]; {usage_line}"
                )
    return args


def run_cli(main, *args, **kwargs):
    """Call a command's ``main``; a FewstepError (also one raised inside Hydra's ``instantiate``) becomes
    ``error: <message>`` on stderr and exit status 2, as does a tool's ``SystemExit("error: ...")``."""
    try:
        return main(*args, **kwargs)
    except SystemExit as done:  # a tool's own one-line refusal (``SystemExit("error: ...")``): status 2 as well
        if isinstance(done.code, str) and done.code.startswith("error:"):
            print(done.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        raise SystemExit(2) from None
