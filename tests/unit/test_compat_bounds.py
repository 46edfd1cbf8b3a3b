"""A library whose private names a compat module relies on is bounded above in the
project's dependencies, as eventsourcing, faust-streaming and aiokafka are: test_compat
checks those names against the installed version only, and a fresh ``pip install`` (a
service's, which runs no tests) otherwise takes whatever version is newest."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from daybook.infrastructure.compat import aiokafka as aiokafka_compat
from daybook.infrastructure.compat import eventsourcing as eventsourcing_compat
from daybook.infrastructure.compat import faust as faust_compat
from daybook.infrastructure.compat import opentelemetry as opentelemetry_compat
from daybook.infrastructure.compat import prometheus_client as prometheus_compat

ROOT = Path(__file__).resolve().parents[2]
MODULES = (
    aiokafka_compat,
    eventsourcing_compat,
    faust_compat,
    opentelemetry_compat,
    prometheus_compat,
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_library_a_compat_module_relies_on_has_an_upper_bound() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    libraries = {canonical(internal.library) for module in MODULES for internal in module.RELIED_ON}
    assert libraries >= {"eventsourcing", "psycopg-pool", "aiokafka", "faust-streaming"}
    unbounded = set()
    for library in sorted(libraries):
        named = [r for r in requirements if canonical(r.name) == library]
        assert named, f"{library} is not a dependency"
        if not any(s.operator in ("<", "<=", "==", "~=") for r in named for s in r.specifier):
            unbounded.add(library)
    assert unbounded == set(), f"no upper bound in pyproject.toml for {sorted(unbounded)}"
