"""Self-contained exports: the code of an exported pipeline's fewstep components travels inside the folder.

``save_pretrained`` records a fewstep component in ``model_index.json`` as ``["fewstep.models.sd3",
"SD3TwinFlowTransformer2DModel"]``, which diffusers can only resolve when that module is already imported.
:func:`vendor_components` rewrites each such entry to a *library name* that diffusers resolves two ways:

- **without fewstep** (``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)``): the component
  folder holds ``<library>.py``, so diffusers loads the class from it. ``<library>.py`` is a copy of the
  module that defines the class; the fewstep modules it imports at module level (and theirs) are copied
  beside it under flat names (``fewstep.models.family`` → ``fewstep_models_family.py``) with their imports
  made relative, and ``<library>.py`` imports each of them once more directly, because diffusers copies only
  the files a remote-code module imports itself;
- **with fewstep** (``import fewstep``, then a bare ``<Family>Pipeline.from_pretrained(DIR)``):
  ``import fewstep`` registers each library name on ``diffusers.pipelines`` (see
  :func:`register_library_names`), which diffusers consults before the folder's code, so the installed
  classes load and no remote code runs.

This works for any family: what is copied is whatever module defines the component's class.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.util
import json
import pkgutil
import sys
import types
from pathlib import Path

PREFIX = "fewstep"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/fewstep: the models/ and samplers/ whose classes exports name
VENDORED_MARK = "# vendored by fewstep.export_code"  # kept as written by earlier versions: exports are recognised by it


def library_name(module: str) -> str:
    """The flat name a fewstep module has in an export (``fewstep.models.sd3`` → ``fewstep_models_sd3``)."""
    return module.replace(".", "_")


def _module_source(module: str) -> tuple[str, Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"{module} has no Python source to copy into the export")
    path = Path(spec.origin)
    return path.read_text(), path


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _imported_modules(node: ast.ImportFrom) -> list[str]:
    """The fewstep modules an absolute ``from fewstep... import ...`` brings in: the module itself, or its
    submodules when the names are modules (``from fewstep.models import architectures``)."""
    base = node.module or ""
    subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
    return subs if subs and len(subs) == len(node.names) else [base]


def closure(module: str) -> list[str]:
    """``module`` and every fewstep module it imports at module level, transitively (in discovery order)."""
    seen, todo = [], [module]
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.append(name)
        tree = ast.parse(_module_source(name)[0])
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PREFIX):
                todo += [m for m in _imported_modules(node) if m != PREFIX]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith(PREFIX + ".")]
    return seen


def _rewrite(source: str, members: set[str]) -> str:
    """``source`` with every import of a ``members`` module (at any depth) made relative to the flat copies."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PREFIX)):
            continue
        indent = lines[node.lineno - 1][: node.col_offset]
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        modules = _imported_modules(node)
        if modules == [node.module] and node.module in members:
            new = f"{indent}from .{library_name(node.module)} import {names}\n"
        elif modules != [node.module] and all(m in members for m in modules):
            new = "".join(
                f"{indent}from . import {library_name(f'{node.module}.{a.name}')} as {a.asname or a.name}\n"
                for a in node.names
            )
        else:
            continue  # a module outside the closure, imported inside a function the pipeline does not call
        edits.append((node.lineno - 1, node.end_lineno, new))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = [new]
    return "".join(lines)


def vendor_module(module: str, folder: Path) -> str:
    """Copy ``module`` and its fewstep closure into ``folder`` under flat names; returns the library name."""
    members = closure(module)
    for name in members:
        source = _rewrite(_module_source(name)[0], set(members))
        if name == module:  # diffusers copies only the files this one imports itself: import every member here
            direct = [m for m in members if m != module]
            source += f"\n\n{VENDORED_MARK}: diffusers copies the modules imported here into its module cache\n"
            source += "".join(
                f"from .{library_name(m)} import __name__ as _{library_name(m)}  # noqa\n" for m in direct
            )
        (folder / f"{library_name(name)}.py").write_text(source)
    return library_name(module)


def vendor_components(out: Path) -> dict[str, list[str]]:
    """Rewrite ``out/model_index.json``'s fewstep components to library names and copy their code into their
    folders (see the module docstring); returns the rewritten entries."""
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    changed = {}
    for component, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and str(entry[0]).startswith(PREFIX + "."):
            changed[component] = [vendor_module(str(entry[0]), out / component), entry[1]]
    index.update(changed)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return changed


class _LibraryProxy(types.ModuleType):
    """Stands for a fewstep module under its library name; imports it on first attribute access."""

    def __init__(self, library: str, module: str):
        super().__init__(library)
        self._fewstep_module = module

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(self._fewstep_module), name)


def register_library_names(pipelines=None) -> None:
    """Make every ``fewstep.models.*`` / ``fewstep.samplers.*`` module known to diffusers under its library
    name (an attribute of ``diffusers.pipelines``, which ``from_pretrained`` checks before a folder's code), and
    under its module path: a pipeline a user saves with a fewstep component swapped in (``pipe.scheduler =
    TwinFlowScheduler(...)``) names it ``["fewstep.samplers.scheduler", "TwinFlowScheduler"]`` in
    ``model_index.json``, which diffusers resolves only from ``diffusers.pipelines`` or an already imported module.
    Nothing is imported until diffusers asks for a class."""
    if pipelines is None:
        pipelines = sys.modules.get("diffusers.pipelines")
        if pipelines is None:
            return
    root = PACKAGE_DIR
    for package in ("models", "samplers"):
        for info in pkgutil.iter_modules([str(root / package)]):
            module = f"{PREFIX}.{package}.{info.name}"
            for library in (library_name(module), module):
                if library not in vars(pipelines):
                    setattr(pipelines, library, _LibraryProxy(library, module))


def fewstep_pipeline_classes() -> dict[str, str]:
    """``{class name: module}`` of the diffusers pipeline classes fewstep defines (top-level classes of
    ``fewstep.models.*`` deriving from ``DiffusionPipeline``, e.g. ``OpenUniPipeline``), read from the source
    files without importing them."""
    found = {}
    root = PACKAGE_DIR / "models"
    for info in pkgutil.iter_modules([str(root)]):
        path = root / f"{info.name}.py"
        source = path.read_text() if path.is_file() else ""
        if "DiffusionPipeline" not in source:
            continue
        for node in ast.parse(source).body:
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and "DiffusionPipeline" in bases:
                found[node.name] = f"{PREFIX}.models.{info.name}"
    return found


def register_pipeline_classes(diffusers_module=None) -> None:
    """Make fewstep's pipeline classes attributes of the ``diffusers`` module, where
    ``DiffusionPipeline.from_pretrained`` resolves a folder's ``model_index.json`` ``_class_name`` (and where
    ``from diffusers import OpenUniPipeline`` looks). The module's class gets a ``__getattr__`` that imports the
    defining fewstep module on first access, so nothing heavy is imported here."""
    module = diffusers_module if diffusers_module is not None else sys.modules.get("diffusers")
    if module is None:
        return
    names = fewstep_pipeline_classes()
    base = type(module)
    if getattr(base, "_fewstep_pipelines", None) is None:

        class WithFewstepPipelines(base):
            _fewstep_pipelines: dict[str, str] = {}

            def __getattr__(self, name: str):
                source = type(self)._fewstep_pipelines.get(name)
                if source is None:
                    inner = getattr(super(), "__getattr__", None)
                    if inner is None:
                        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
                    return inner(name)
                value = getattr(importlib.import_module(source), name)
                setattr(self, name, value)
                return value

        WithFewstepPipelines.__name__ = base.__name__
        WithFewstepPipelines.__qualname__ = base.__qualname__
        WithFewstepPipelines.__module__ = base.__module__
        module.__class__ = WithFewstepPipelines
    type(module)._fewstep_pipelines.update(names)


class RegisterOnImport:
    """A one-shot import hook: once ``diffusers`` is imported, :func:`register_pipeline_classes` runs on it, and
    once ``diffusers.pipelines`` is, :func:`register_library_names` (``import fewstep`` installs it, so fewstep
    itself never imports diffusers for this)."""

    def __init__(self, targets: dict | None = None):
        default = {"diffusers": register_pipeline_classes, "diffusers.pipelines": register_library_names}
        self.pending = dict(targets or default)
        self._finding = False

    def find_spec(self, fullname, path=None, target=None):
        register = self.pending.get(fullname)
        if register is None or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        del self.pending[fullname]
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        if spec is None or spec.loader is None:
            return spec
        inner = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                inner.exec_module(module)
                register(sys.modules.get(fullname, module))  # diffusers swaps in a lazy module

            def __getattr__(self, name):  # resource readers etc.: the wrapped loader's
                return getattr(inner, name)

        spec.loader = Loader()
        return spec


def install_hook() -> None:
    """Register now what diffusers has already imported, and the rest when it is imported."""
    targets = {}
    for name, register in (("diffusers", register_pipeline_classes), ("diffusers.pipelines", register_library_names)):
        if name in sys.modules:
            register(sys.modules[name])
        else:
            targets[name] = register
    if targets and not any(isinstance(f, RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterOnImport(targets))
