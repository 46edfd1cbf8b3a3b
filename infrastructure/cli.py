"""The ``daybook`` command line. Each area registers its own subcommands.

User mistakes (bad input, refused commands, unreachable stores) print one clear line on
stderr and exit non-zero; only real bugs show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from eventsourcing.persistence import PersistenceError

from daybook.domain.errors import DomainError
from daybook.infrastructure.settings import Settings
from daybook.infrastructure.urls import DEFAULT_URL, BadURL

#: Modules that add subcommands; each has ``register(subparsers) -> None`` and sets
#: ``handler`` (a function of the parsed args returning an exit code) on its parsers.
COMMAND_MODULES = [
    "daybook.infrastructure.demo",
    "daybook.infrastructure.streaming.cli",
    "daybook.infrastructure.readmodels.cli",
    "daybook.infrastructure.ledger.cli",
]

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daybook",
        description=(
            "daybook: an event-sourced ledger with CQRS projections. Commands are checked "
            "against the append-only log (strongly consistent); read models follow the log "
            "(eventually consistent, and say how far behind they are)."
        ),
        epilog=(
            "Store URLs: memory://, sqlite:///path/to/file.db, "
            "postgresql://user:password@host:port/dbname. "
            f"Default: $DAYBOOK_URL or {DEFAULT_URL}."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def add_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", help=f"event store URL (default: $DAYBOOK_URL, else {DEFAULT_URL})"
    )


def add_readmodels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--readmodels-url",
        help="read-model database URL (default: $DAYBOOK_READMODELS_URL, else the event "
        "store's database)",
    )


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings for a command: its options, then ``DAYBOOK_*`` variables, then defaults
    (one composition root: every command builds what it runs from these)."""
    return Settings.load(
        url=getattr(args, "url", None),
        readmodels_url=getattr(args, "readmodels_url", None),
        broker_url=getattr(args, "broker", None),
        topic=getattr(args, "topic", None),
        partitions=getattr(args, "partitions", None),
        group=getattr(args, "group", None),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except DomainError as error:
        print(f"daybook: refused ({error.code}): {error}", file=sys.stderr)
        return 1
    except BadURL as error:
        print(f"daybook: {error}", file=sys.stderr)
        return 2
    except PersistenceError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"daybook: the store did not answer ({reason}); check the URL and that the "
            "database is running",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("daybook: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
