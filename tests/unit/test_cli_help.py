"""Every command and option explains itself: a description, help with the default shown,
and examples that use every option; and ``daybook --version``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

import daybook
from daybook.infrastructure.cli import build_parser, main


def commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share one parser
                yield sub
                yield from commands(sub)


ALL = list(commands(build_parser()))


def test_there_are_commands_to_check() -> None:
    names = {p.prog.removeprefix("daybook ") for p in ALL}
    for expected in (
        "demo",
        "serve",
        "tokens create",
        "tokens revoke",
        "balance",
        "stock",
        "statement",
        "projections status",
        "stream status",
        "relay",
        "worker",
    ):
        assert expected in names


@pytest.mark.parametrize("parser", ALL, ids=lambda p: p.prog)
def test_a_command_has_a_description_and_examples(parser: argparse.ArgumentParser) -> None:
    assert parser.description and len(parser.description) > 20
    assert parser.epilog and "examples:" in parser.epilog
    assert f"\n  {parser.prog}" in parser.epilog


@pytest.mark.parametrize("parser", ALL, ids=lambda p: p.prog)
def test_every_option_has_help_a_shown_default_and_an_example(
    parser: argparse.ArgumentParser,
) -> None:
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        assert action.help, f"{parser.prog} {action.dest} has no help"
        if action.option_strings:
            assert any(flag in (parser.epilog or "") for flag in action.option_strings), (
                f"no example of {action.option_strings} in {parser.prog}'s help"
            )
            if action.default is not None and action.default is not False:
                assert (
                    f"(default: {action.default})" in " ".join(text.split())  # however wrapped
                    or "default" in action.help
                ), f"{parser.prog} {action.dest}: default not shown"
            elif not isinstance(action, argparse._StoreTrueAction) and not action.required:
                assert "default" in action.help, f"{parser.prog} {action.dest}: say the default"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"daybook {daybook.__version__}"


def test_the_version_is_the_packages_and_newer_than_the_one_the_readme_calls_old() -> None:
    """The README tells operators what "daybook 0.2 and earlier" does in a rolling upgrade:
    a process of this code printed 0.2.0 too, so nobody could tell old from new."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["version"] == daybook.__version__
    assert "daybook 0.2 and earlier" in (root / "README.md").read_text()
    assert tuple(int(part) for part in daybook.__version__.split(".")[:2]) > (0, 2)


def test_the_worker_takes_a_readmodels_url() -> None:
    (worker,) = [p for p in ALL if p.prog == "daybook worker"]
    assert "--readmodels-url" in worker.format_help()


@pytest.mark.parametrize("name", ["relay", "worker"])
def test_streaming_help_does_not_promise_a_default_they_cannot_use(name: str) -> None:
    (parser,) = [p for p in ALL if p.prog == f"daybook {name}"]
    assert "sqlite" not in parser.format_help().split("--url", 1)[1].split("--broker")[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["sagas", "run", "--log-level", "debug"],
        ["serve", "--log-level", "debug"],
        ["project", "--log-level", "debug"],
        ["reconcile", "--continuous", "--log-level", "debug"],
    ],
)
def test_a_service_logs_at_its_log_level(argv: list[str]) -> None:
    """``--log-level debug`` reaches the logging set-up (for ``sagas run``, it is how the
    gateway client's line per call is seen). (The suite's fixture removes the set-up.)"""
    import logging

    from daybook.infrastructure.cli import setup_logging

    setup_logging(build_parser().parse_args(argv))
    assert logging.getLogger().level == logging.DEBUG
