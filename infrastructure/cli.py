"""The ``daybook`` command line. Each area registers its own subcommands.

A person's mistake (a bad number, a URL no command can use, a store that does not answer, a
refused command, a closed pipe, Ctrl-C) ends as one line on stderr saying what was wrong and
what to do, with a non-zero exit; only a bug in daybook shows a traceback. Every command and
option has help with its default shown, and every command's help ends with examples that use
each of its options (tests/unit/test_cli_help.py holds all of them to it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import signal
import sqlite3
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, TypeVar
from uuid import UUID

import psycopg
from eventsourcing.persistence import PersistenceError

from daybook.domain.errors import DomainError
from daybook.domain.values import MAX_BIGINT, check_uuid
from daybook.infrastructure import preflight
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.observability.logs import configure_logging
from daybook.infrastructure.observability.metrics import MetricsServer
from daybook.infrastructure.observability.tracing import configure_tracing
from daybook.infrastructure.settings import (
    MAX_WAIT,
    MIN_BROKER_TIMEOUT,
    Settings,
    check_group,
    check_topic,
)
from daybook.infrastructure.transient import causes, first_line
from daybook.infrastructure.urls import DEFAULT_URL, BadURL

#: Modules that add subcommands; each has ``register(subparsers) -> None`` and sets
#: ``handler`` (a function of the parsed args returning an exit code) on its parsers.
COMMAND_MODULES = [
    "daybook.infrastructure.demo",
    "daybook.infrastructure.lookup",
    "daybook.infrastructure.http.cli",
    "daybook.infrastructure.streaming.cli",
    "daybook.infrastructure.readmodels.cli",
    "daybook.infrastructure.sagas.cli",
    "daybook.infrastructure.ledger.cli",
]

Handler = Callable[[argparse.Namespace], int]

#: Exit status of a process whose output pipe closed (128 + SIGPIPE), as shells report it.
EXIT_BROKEN_PIPE = 141
#: Exit status of a read whose read model had not reached the position asked for within its
#: timeout: not an error, "not yet" (sysexits' EX_TEMPFAIL: try again later).
EXIT_NOT_YET = 75


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped, examples as written; every option's default shown, unless it
    has none (options that fall back to a ``DAYBOOK_*`` variable say so in their own
    words)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:  # laid out by hand: examples, lists
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == argparse.SUPPRESS
        shown = not nothing and not isinstance(
            action, argparse._HelpAction | argparse._VersionAction
        )
        if shown and "%(default)" not in text and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command and its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Kept for ``error`` (a subcommand's parser gets the arguments after its name).
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}{self._dash_hint(message)} (see {self.prog} --help)\n")

    def _dash_hint(self, message: str) -> str:
        """A value that starts with '-' (a SKU such as ``-KETTLE``) is taken for an option,
        and argparse then says the argument is missing: say how to give it."""
        if not message.startswith("the following arguments are required"):
            return ""
        for given in getattr(self, "_given", ()):
            if given == "--":
                return ""
            name = given.partition("=")[0]
            known = name in self._option_string_actions or (
                # argparse takes an option's prefix for it (--ur for --url)
                name.startswith("--")
                and any(o.startswith(name) for o in self._option_string_actions)
            )
            if (
                given.startswith("-")
                and not known
                and not self._negative_number_matcher.match(given)
            ):
                return (
                    f"; {given} was taken for an option: a value that starts with '-' goes "
                    f"after '--' ({self.prog} [options] -- {given})"
                )
        return ""


def command(
    subparsers: Any,
    name: str,
    *,
    help: str,
    description: str,
    examples: Sequence[str],
) -> Parser:
    """A subcommand with its help, a description and examples (``daybook ...`` lines)."""
    lines = "\n".join(f"  {example}" for example in examples)
    parser: Parser = subparsers.add_parser(
        name, help=help, description=description, epilog=f"examples:\n{lines}"
    )
    return parser


#: Numbers as a person writes them, in ASCII digits: ``int()`` and ``float()`` also read
#: "1_000", "+5", " 3", other scripts' digits, "1e3", "inf" and "nan".
_WHOLE = re.compile(r"-?[0-9]{1,20}")
_DECIMAL = re.compile(r"-?([0-9]{1,15}(\.[0-9]{0,15})?|\.[0-9]{1,15})")


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``minimum`` .. ``maximum``, or a one-line refusal."""

    def parse(text: str) -> int:
        if not _WHOLE.fullmatch(text):
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        top = MAX_BIGINT if maximum is None else maximum
        if value > top:
            raise argparse.ArgumentTypeError(f"must be at most {top}, got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def uuid_argument(what: str) -> Callable[[str], UUID]:
    """An argparse type: ``what`` (an id) as a UUID, refused in the domain's words."""

    def parse(text: str) -> UUID:
        try:
            return check_uuid(text, what)
        except DomainError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = what
    return parse


#: The most any option in seconds takes: each is a wait, an interval or a timeout.
MAX_SECONDS = int(MAX_WAIT.total_seconds())


def seconds(text: str) -> float:
    """An argparse type: a positive number of seconds, at most ``MAX_SECONDS`` (30 days)."""
    if not _DECIMAL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_SECONDS} seconds (30 days), got {text}"
        )
    return value


def seconds_or_zero(text: str) -> float:
    """An argparse type: 0, or a number of seconds as ``seconds`` takes them."""
    if _DECIMAL.fullmatch(text) and float(text) == 0:
        return 0.0
    return seconds(text)


def broker_seconds(text: str) -> float:
    """An argparse type: seconds to wait for a broker, 0.1 or more (less would count a
    healthy broker as down on every batch, and wait for it for ever)."""
    value = seconds(text)
    if value < MIN_BROKER_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_BROKER_TIMEOUT} seconds, got {text}"
        )
    return value


def rate(text: str) -> float:
    """An argparse type: requests per second, 0 or more."""
    if not _DECIMAL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected requests per second, got {text!r}")
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more requests per second, got {text}")
    return value


def positive_rate(text: str) -> float:
    """An argparse type: requests per second, above 0 (a token's own limit)."""
    if _DECIMAL.fullmatch(text) and not float(text) > 0:
        raise argparse.ArgumentTypeError(f"must be above 0 requests per second, got {text}")
    return rate(text)


def topic_name(text: str) -> str:
    """An argparse type: a Kafka topic name daybook can publish events to (``check_topic``),
    or a one-line refusal."""
    try:
        return check_topic(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def group_id(text: str) -> str:
    """An argparse type: a consumer group id a worker can run as (``check_group``), or a
    one-line refusal."""
    try:
        return check_group(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> Parser:
    from daybook import __version__

    parser = Parser(
        prog="daybook",
        description=(
            "daybook: an event-sourced ledger with CQRS projections. Commands are checked "
            "against the append-only log (strongly consistent); read models follow the log "
            "(eventually consistent, and say how far behind they are)."
        ),
        epilog=(
            "Store URLs: memory:// (the demo only: it lives inside one process),\n"
            "sqlite:///path/to/file.db, postgresql://user:password@host:port/dbname.\n"
            f"Default: $DAYBOOK_URL (which the demo ignores), else {DEFAULT_URL}.\n\n"
            "examples:\n  daybook demo\n"
            "  daybook serve --url postgresql://daybook@localhost/daybook\n"
            "  daybook balance 0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b\n  daybook --version\n"
        ),
    )
    parser.add_argument("--version", action="version", version=f"daybook {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def add_url_argument(parser: argparse.ArgumentParser, *, postgres_only: bool = False) -> None:
    if postgres_only:
        text = "event store URL, postgresql://... (default: $DAYBOOK_URL; required otherwise)"
    else:
        text = f"event store URL (default: $DAYBOOK_URL, else {DEFAULT_URL})"
    parser.add_argument("--url", help=text)


def add_readmodels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--readmodels-url",
        help="read-model database URL (default: $DAYBOOK_READMODELS_URL, else the event "
        "store's database)",
    )


def add_log_arguments(parser: argparse.ArgumentParser, *, level: bool = True) -> None:
    """``--log-format`` of a long-running command (``setup_logging``), and ``--log-level``
    unless ``level`` is False (the streaming services have ``-v`` instead)."""
    if level:
        parser.add_argument(
            "--log-level",
            choices=["critical", "error", "warning", "info", "debug"],
            default="info",
            help="the least severe lines logged (default: %(default)s; debug adds, among "
            "others, a line for each request daybook's HTTP clients send, as to the payment "
            "gateway)",
        )
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=os.environ.get("DAYBOOK_LOG_FORMAT") or "console",  # empty: unset
        help="log lines as text for a console, or one JSON object each (default: "
        "$DAYBOOK_LOG_FORMAT, else console)",
    )


def setup_logging(args: argparse.Namespace, level: int | str | None = None) -> None:
    """Logging for a long-running command (its entry point owns the process): JSON or
    console lines on stderr, rate-limited, secrets redacted; at ``level``, else the
    command's ``--log-level``, else info."""
    if level is None:
        level = getattr(args, "log_level", None) or logging.INFO
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    log_format = getattr(args, "log_format", "console")
    if log_format not in ("console", "json"):  # argparse checks choices, not defaults
        raise preflight.Unusable(
            f"unknown log format {log_format!r} (from $DAYBOOK_LOG_FORMAT): use json or console"
        )
    configure_logging(log_format, int(level))
    setup_tracing()


#: The standard OpenTelemetry variables that ask for traces to be exported.
TRACE_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def setup_tracing() -> None:
    """Export traces over OTLP when an endpoint is set (the standard ``OTEL_*`` variables;
    ``OTEL_SERVICE_NAME`` names the service); without one, daybook makes no spans. Needs the
    ``daybook[otel]`` extra: asking for traces without it is refused in one line."""
    if not any(os.environ.get(name) for name in TRACE_ENDPOINTS):
        return
    try:
        configure_tracing(service_name=os.environ.get("OTEL_SERVICE_NAME", "daybook"))
    except ImportError:
        raise preflight.Unusable(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed: "
            "pip install 'daybook[otel]' (or unset the variable)"
        ) from None


def add_metrics_port_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=whole_number(0, 65535),
        metavar="PORT",
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (0: any free port, "
        "logged at start; default: no metrics endpoint)",
    )


#: The variable a service's ``--startup-wait`` defaults to.
STARTUP_WAIT_VARIABLE = "DAYBOOK_STARTUP_WAIT"

_T = TypeVar("_T")


def add_startup_wait_argument(parser: argparse.ArgumentParser, only: str = "") -> None:
    parser.add_argument(
        "--startup-wait",
        type=startup_seconds,
        metavar="SECONDS",
        help=f"{only}at start, wait at most this long for a database, broker or gateway that "
        "is down, starting up or out of reach (0: fail at once; default: "
        "$DAYBOOK_STARTUP_WAIT, else until it answers, as the running service waits out an "
        "outage)",
    )


def startup_seconds(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more."""
    if not _DECIMAL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, got {text}")
    return value


def when_usable(args: argparse.Namespace, check: Callable[[], _T], *, waited: float = 0.0) -> _T:
    """``check()`` (a service's preflight checks) once it passes: a server that is down,
    starting up or out of reach is waited for, for ``--startup-wait`` seconds (or
    ``$DAYBOOK_STARTUP_WAIT``; by default until it answers). Call after ``setup_logging``:
    the wait is logged. SIGTERM ends the wait at once, with status 0 (``stopped_at_start``).
    ``waited``: seconds of the startup wait already spent (by a worker started again in
    place)."""
    limit = startup_wait(args)
    log = logging.getLogger("daybook.startup")
    with stopped_at_start("while waiting at start"):
        metrics.WAITING_AT_START.set(1)
        try:
            return preflight.wait_until_usable(check, limit=limit, log=log, waited=waited)
        finally:
            metrics.WAITING_AT_START.set(0)


@contextlib.contextmanager
def stopped_at_start(what: str = "while starting") -> Iterator[None]:
    """SIGTERM ends the process at once, with status 0, while the block runs: a service
    waiting at start, or building its parts before it installs its own stop (opening the log
    waits its turn while another process creates the tables). Nothing has started, so there
    is nothing to drain. The handler found is put back after, for the service's own."""

    def stop(signum: int, frame: Any) -> None:
        logging.getLogger("daybook.startup").warning("stopped %s (signal %d)", what, signum)
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def startup_wait(args: argparse.Namespace) -> float | None:
    """A service's startup wait: ``--startup-wait``, else ``$DAYBOOK_STARTUP_WAIT``, else
    None (until it answers)."""
    limit: float | None = getattr(args, "startup_wait", None)
    if limit is None and (text := os.environ.get(STARTUP_WAIT_VARIABLE, "").strip()):
        try:
            limit = startup_seconds(text)
        except argparse.ArgumentTypeError as error:
            raise preflight.Unusable(f"${STARTUP_WAIT_VARIABLE}: {error}") from None
    return limit


class OptionRefused(Exception):
    """An option's value the command cannot use (a port another process holds): one line
    on stderr and exit 2, as for a bad option."""


@contextlib.contextmanager
def metrics_served(args: argparse.Namespace, what: str) -> Iterator[MetricsServer | None]:
    """``/metrics`` on ``--metrics-port`` while the block runs (nothing without it)."""
    port = getattr(args, "metrics_port", None)
    if port is None:
        yield None
        return
    server = MetricsServer(port)
    try:
        server.start()
    except OSError as error:  # the port taken, or not this machine's to listen on
        reason = error.strerror or str(error)
        msg = f"cannot serve metrics on port {port}: {reason}; choose another --metrics-port"
        raise OptionRefused(msg) from None
    logging.getLogger("daybook.metrics").info(
        "%s: metrics at http://%s:%d/metrics", what, server.address, server.port,
        extra={"fields": {"metrics_port": server.port}},
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def settings_of(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """The settings for a command: its options, then ``DAYBOOK_*`` variables (of ``env``,
    default the process's), then defaults (one composition root: every command builds what
    it runs from these)."""
    return Settings.load(
        env,
        url=getattr(args, "url", None),
        readmodels_url=getattr(args, "readmodels_url", None),
        broker_url=getattr(args, "broker", None),
        topic=getattr(args, "topic", None),
        partitions=getattr(args, "partitions", None),
        group=getattr(args, "group", None),
        relay_request_timeout=getattr(args, "request_timeout", None),
        gateway_url=getattr(args, "gateway", None),
    )


def checked_settings(
    args: argparse.Namespace,
    *,
    kinds: Sequence[str] = ("sqlite", "postgresql"),
    why: str = "",
    existing: bool = True,
    readmodels: bool = False,
    new_readmodels: bool = False,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """``settings_of(args)``, having checked that the event store is of ``kinds`` (``why``
    says why no other will do), answers, and (with ``existing``) already holds a ledger; with
    ``readmodels``, that the read-model database answers too (and, with ``existing`` and
    unless ``new_readmodels``, is already there: a mistyped path is refused rather than made
    into an empty database). Raises ``Unusable``."""
    env = os.environ if env is None else env
    settings = settings_of(args, env)
    given = getattr(args, "url", None) is not None or env.get("DAYBOOK_URL")
    if not given and "sqlite" not in kinds:
        raise preflight.Unusable(f"this command needs --url ({why}) or $DAYBOOK_URL")
    preflight.check_store(settings.url, kinds=kinds, why=why, existing=existing)
    if readmodels and settings.readmodels_url is not None:
        preflight.check_store(
            settings.readmodels_url,
            role="read-model database",
            kinds=("sqlite", "postgresql"),
            why="read models are tables in a database",
            existing=existing and not new_readmodels,
        )
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    return guarded(lambda: _dispatch(build_parser(), argv))


def _dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return handler(args)


def guarded(run: Callable[[], int]) -> int:
    """Run a command line; a person's mistake becomes one line on stderr and an exit code."""
    try:
        code = run()
        # Written out here, not at exit: a reader that has gone is then still a
        # BrokenPipeError this function handles, not a message from the interpreter.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # `daybook demo | head`: the reader has gone. Point stdout at nothing, so the
        # interpreter's final flush does not raise again, and say it once.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        _say("the output was closed before everything was written (broken pipe)")
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except DomainError as error:
        _say(f"refused ({error.code}): {error}")
        return 1
    except (BadURL, OptionRefused) as error:
        _say(str(error))
        return 2
    except Exception as error:
        if _not_yet(error):
            _say(str(error))
            return EXIT_NOT_YET
        message = _user_error(error)
        if message is None:
            raise
        _say(message)
        return 2


def _not_yet(error: Exception) -> bool:
    """Whether ``error`` says "not yet": a read model behind the position asked for."""
    from daybook.infrastructure.readmodels import StaleRead

    return isinstance(error, StaleRead)


def _user_error(error: Exception) -> str | None:
    """One line for a failure a person can fix (None: a bug, to be shown in full)."""
    from daybook.infrastructure.gateway import GatewayError
    from daybook.infrastructure.readmodels.store import ReadStoreError

    if isinstance(error, ReadStoreError):
        return str(error)
    if isinstance(error, GatewayError):
        return f"the payment gateway did not answer: {error} (check --gateway and that it runs)"
    for cause in causes(error):  # eventsourcing wraps the driver's error
        if isinstance(cause, psycopg.errors.ReadOnlySqlTransaction):
            return (
                f"the database refused this command's writes ({first_line(cause)}): it needs a "
                "server (and a role) that is not read-only"
            )
        if isinstance(cause, psycopg.errors.InsufficientPrivilege):
            return (
                f"the database refused this role ({first_line(cause)}): a command that reads "
                "needs SELECT on daybook's tables, and one that writes a role that may create "
                "and change them"
            )
        if isinstance(cause, psycopg.OperationalError):
            return f"the database did not answer: {preflight.explain(cause)}"
        if isinstance(cause, sqlite3.DatabaseError):
            return f"the SQLite database cannot be used: {cause} (check the path)"
    if isinstance(error, PersistenceError):
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "no answer"
        return (
            f"the store did not answer ({reason}); check the URL and that the database is running"
        )
    return None


def _say(line: str) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):
        print(f"daybook: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
