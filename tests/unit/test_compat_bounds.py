"""A library whose private names a compat module relies on is bounded above in the
project's dependencies, as eventsourcing, faust-streaming and aiokafka are: test_compat
checks those names against the installed version only, and a fresh ``pip install`` (a
service's, which runs no tests) otherwise takes whatever version is newest."""

from __future__ import annotations

import importlib
import pkgutil
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

import daybook.infrastructure.compat as compat

ROOT = Path(__file__).resolve().parents[2]
#: Every compat module, found rather than listed: a new one is checked too.
MODULES = tuple(
    importlib.import_module(f"{compat.__name__}.{info.name}")
    for info in pkgutil.iter_modules(compat.__path__)
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_library_a_compat_module_relies_on_has_an_upper_bound() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    libraries = {canonical(internal.library) for module in MODULES for internal in module.RELIED_ON}
    assert libraries >= {
        "eventsourcing",
        "psycopg-pool",
        "aiokafka",
        "faust-streaming",
        "prometheus-client",
        "opentelemetry-api",
    }
    unbounded = set()
    for library in sorted(libraries):
        named = [r for r in requirements if canonical(r.name) == library]
        assert named, f"{library} is not a dependency"
        if not any(s.operator in ("<", "<=", "==", "~=") for r in named for s in r.specifier):
            unbounded.add(library)
    assert unbounded == set(), f"no upper bound in pyproject.toml for {sorted(unbounded)}"
