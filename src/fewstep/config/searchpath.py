"""Where config groups come from: the shipped ones and the user's own.

The shipped groups live in the repository's top-level ``conf/`` and are installed as the package
``fewstep.conf`` (``fewstep/conf/`` in a wheel; an editable install maps the import to ``conf/``).
A user adds groups and experiments without editing the package, in either of two ways:

- a ``conf/`` folder in the working directory (``conf/model/mine.yaml`` -> ``model=mine``,
  ``conf/experiment/mine.yaml`` -> ``experiment=mine``), picked up automatically;
- ``FEWSTEP_CONFIG_PATH=DIR[:DIR...]``, folders laid out the same way.

Both are appended to Hydra's ``hydra.searchpath`` (after any the user gives on the command line), so
a shipped file of the same name wins: give your own files new names.
"""

from __future__ import annotations

import os
from pathlib import Path

from fewstep.errors import FewstepError


def _shipped_conf_dir() -> Path:
    """The folder of the installed ``fewstep.conf`` package holding ``config.yaml``; else (``src/`` on sys.path
    without the install's mapping, e.g. a checkout run with PYTHONPATH=src) the checkout's ``conf/``."""
    try:
        import fewstep.conf as package

        folders = [Path(package.__file__).parent] if getattr(package, "__file__", None) else []
        folders += [Path(str(p)) for p in getattr(package, "__path__", [])]  # a namespace package's folders
        for folder in folders:
            if folder.is_absolute() and (folder / "config.yaml").is_file():
                return folder
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = _shipped_conf_dir()
ENV_VAR = "FEWSTEP_CONFIG_PATH"
SEARCHPATH_KEY = "hydra.searchpath"


class ConfigPathError(FewstepError, ValueError):
    """A folder named in FEWSTEP_CONFIG_PATH does not exist."""


def user_config_dirs() -> list[Path]:
    """The user's config folders, in search order: ``./conf`` (when it exists and is not the shipped one),
    then each folder of ``FEWSTEP_CONFIG_PATH``; duplicates dropped."""
    candidates = [Path.cwd() / "conf"] if (Path.cwd() / "conf").is_dir() else []
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if not entry:
            continue
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise ConfigPathError(
                f"{ENV_VAR} names {entry}, which is not a folder; give folders laid out like conf/ "
                f"(model/, data/, experiment/, ...), separated by '{os.pathsep}'"
            )
        candidates.append(folder)
    seen, dirs = {CONF_DIR.resolve()}, []
    for folder in candidates:
        real = folder.resolve()
        if real not in seen:
            seen.add(real)
            dirs.append(real)
    return dirs


def config_dirs() -> list[Path]:
    """Every folder config choices come from: the shipped ``conf/`` first, then the user's."""
    return [CONF_DIR, *user_config_dirs()]


def _quote(entry: str) -> str:
    return "'" + entry.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _split_search_path(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the entries of a ``hydra.searchpath=[...]`` override, the other overrides)."""
    given: list[str] = []
    rest = []
    for override in overrides:
        if override.partition("=")[0].lstrip("+") == SEARCHPATH_KEY:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            value = OverridesParser.create().parse_override(override).value()
            given += [str(v) for v in (value if isinstance(value, list) else [value])]
        else:
            rest.append(override)
    return given, rest


def given_search_path(overrides: list[str]) -> list[Path | None]:
    """The folders of a ``hydra.searchpath=[...]`` override (None for an entry that is not a folder,
    e.g. ``pkg://``)."""
    entries = _split_search_path(overrides)[0]
    return [Path(e.removeprefix("file://")) if "://" not in e or e.startswith("file://") else None for e in entries]


def with_user_search_path(overrides: list[str]) -> list[str]:
    """``overrides`` with the user's config folders appended to ``hydra.searchpath`` (merged into a
    ``hydra.searchpath=[...]`` the user gave, which Hydra would otherwise let replace ours)."""
    extra = [f"file://{d}" for d in user_config_dirs()]
    if not extra:
        return list(overrides)
    given, rest = _split_search_path(overrides)
    entries = given + [e for e in extra if e not in given]
    ours = f"{SEARCHPATH_KEY}=[{','.join(_quote(e) for e in entries)}]"
    # beside the user's first override, so it joins their run of positional overrides: appended after flags
    # (`model=x --cfg job --package model`) Hydra's argparse would refuse it as an unrecognized argument
    first = next((i for i, a in enumerate(rest) if not a.startswith("-") and ("=" in a or a[:1] == "~")), None)
    if first is None:
        return [*rest, ours]
    return [*rest[: first + 1], ours, *rest[first + 1 :]]
