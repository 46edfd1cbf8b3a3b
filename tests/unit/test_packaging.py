"""daybook installs under one name, and its folders are exactly its packages."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import daybook

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"domain": "daybook.domain", "projections": "daybook.projections"}
LAYERS["infrastructure"] = "daybook.infrastructure"


def folder_packages() -> set[str]:
    """Every folder with an ``__init__.py`` under the three layers, by its import name."""
    found = {"daybook"}
    for folder, name in LAYERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            if relative.parts[:1] == ("face",):
                continue  # the face is the package ``daybook`` itself
            found.add(".".join([name, *relative.parts]))
    return found


def test_every_folder_is_listed_as_a_package_and_nothing_else() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == folder_packages()
    assert config["package-dir"]["daybook"] == "infrastructure/face"


def test_no_module_imports_a_layer_by_its_folder_name() -> None:
    # Anywhere in a line, so code in strings (run in subprocesses) is caught too.
    layer = r"(domain|projections|infrastructure)\b"
    bare = re.compile(rf"(?<![\w.])from\s+{layer}|(?:^|[;\"'])\s*import\s+{layer}", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("domain", "projections", "infrastructure", "tests", "scripts")
        for path in (ROOT / folder).rglob("*.py")
        if bare.search(path.read_text())
    ]
    assert offenders == []


def test_scripts_do_not_import_tests() -> None:
    importing = re.compile(r"(?<![\w.])(from|import)\s+tests\b")
    offenders = [
        path.name for path in (ROOT / "scripts").rglob("*.py") if importing.search(path.read_text())
    ]
    assert offenders == []


def test_nothing_generic_lands_at_the_top_of_site_packages(tmp_path: Path) -> None:
    # Run from an empty folder: the repository's folders must not be what makes it work.
    probe = (
        "import importlib.util, daybook, daybook.infrastructure.cli;"
        "print([n for n in ('domain', 'projections', 'infrastructure')"
        " if importlib.util.find_spec(n)])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_face_exports_what_it_lists() -> None:
    assert sorted(daybook.__all__) == daybook.__all__
    for name in daybook.__all__:
        assert getattr(daybook, name) is not None


def test_the_ledger_and_the_cli_start_without_the_streaming_libraries(tmp_path: Path) -> None:
    """An embedding service, the HTTP server and most of the CLI never talk to a broker:
    importing daybook, or the CLI, loads neither aiokafka nor faust (a fifth of a second
    at every start, for the broker errors' classes alone, and a ledger's process held
    them for ever). The streaming commands import them when they run."""
    probe = (
        "import sys, daybook, daybook.infrastructure.cli, daybook.infrastructure.http.app;"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'aiokafka', 'faust', 'mode'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
