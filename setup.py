"""The package layout pyproject.toml cannot express: the config groups live in the top-level ``conf/``
(where users read and copy them) and ship inside the package as ``fewstep.conf`` (``fewstep/conf/`` in
the wheel; an editable install maps the import to ``conf/``)."""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).parent
CONF_GROUPS = sorted(
    "fewstep.conf." + ".".join(d.relative_to(ROOT / "conf").parts)
    for d in (ROOT / "conf").rglob("*")
    if d.is_dir() and d.name != "__pycache__"
)

setup(
    packages=[*find_namespace_packages("src", include=["fewstep", "fewstep.*"]), "fewstep.conf", *CONF_GROUPS],
    package_dir={"": "src", "fewstep.conf": "conf"},
    package_data={
        **{name: ["*.yaml"] for name in ("fewstep.conf", *CONF_GROUPS)},
        "fewstep.models.architectures": ["*.json"],  # shipped architecture configs (no weights)
    },
)
