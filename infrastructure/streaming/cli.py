"""``daybook relay``, ``daybook worker`` and ``daybook stream status``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from daybook.infrastructure import preflight
from daybook.infrastructure.bootstrap import outbox_relay, stream_worker_config
from daybook.infrastructure.cli import (
    Parser,
    add_log_arguments,
    add_metrics_port_argument,
    add_readmodels_argument,
    add_startup_wait_argument,
    add_url_argument,
    broker_seconds,
    checked_settings,
    command,
    group_id,
    guarded,
    metrics_served,
    seconds,
    seconds_or_zero,
    setup_logging,
    startup_wait,
    stopped_at_start,
    topic_name,
    when_usable,
    whole_number,
)
from daybook.infrastructure.lifecycle import Health, ServiceState
from daybook.infrastructure.settings import (
    DEFAULT_BROKER,
    DEFAULT_GROUP,
    DEFAULT_PARTITIONS,
    DEFAULT_RELAY_REQUEST_TIMEOUT,
    DEFAULT_TOPIC,
    MAX_GROUP,
    MAX_TOPIC,
    Settings,
)
from daybook.infrastructure.streaming.broker import BROKER_ENV

_PG = "postgresql://daybook@localhost/daybook"
_KAFKA = "kafka://localhost:9092"
#: Why the streaming commands need PostgreSQL.
_WHY = (
    "the relay and the stream workers keep their cursors and progress in the event store's "
    "PostgreSQL database and wait on LISTEN/NOTIFY and advisory locks"
)


def register(subparsers: Any) -> None:
    relay = command(
        subparsers,
        "relay",
        help="publish the event log to Kafka (the outbox relay)",
        description=(
            "Publish the event log, in order, to a Kafka topic keyed by aggregate id. The "
            "cursor moves only after the broker acknowledged a batch; one relay per topic is "
            "active (advisory lock), others wait as standbys. Needs PostgreSQL."
        ),
        examples=[
            f"daybook relay --url {_PG} --broker {_KAFKA}",
            f"daybook relay --url {_PG} --topic daybook.events --partitions 8 -v",
            f"daybook relay --url {_PG} --batch-size 1000 --poll-interval 1",
            f"daybook relay --url {_PG} --request-timeout 5",
            f"daybook relay --url {_PG} --rewind",
            f"daybook relay --url {_PG} --startup-wait 0",
            f"daybook relay --url {_PG} --metrics-port 9466 --log-format json",
        ],
    )
    _common(relay)
    relay.add_argument(
        "--batch-size", type=whole_number(1), default=5000, help="events per publish, at most"
    )
    relay.add_argument(
        "--poll-interval",
        type=seconds,
        default=0.5,
        help="seconds between looks at the log when no notification wakes the relay",
    )
    relay.add_argument(
        "--request-timeout",
        type=broker_seconds,
        help=(
            "seconds the broker may take to acknowledge a batch before the relay counts it as "
            "down and waits for it, keeping its cursor (default: $DAYBOOK_RELAY_REQUEST_TIMEOUT, "
            f"else {DEFAULT_RELAY_REQUEST_TIMEOUT:g})"
        ),
    )
    relay.add_argument(
        "--rewind",
        action="store_true",
        help=(
            "move the relay's cursor back to the start of the log, then exit: the next "
            "relay started re-publishes the whole log (run it with the relay stopped)"
        ),
    )
    add_metrics_port_argument(relay)
    add_log_arguments(relay, level=False)
    add_startup_wait_argument(relay)
    relay.set_defaults(handler=_run_relay)

    worker = command(
        subparsers,
        "worker",
        help="apply the stream to the read models (a faust-streaming worker)",
        description=(
            "Consume the events topic in a consumer group and apply the projection "
            "definitions to the PostgreSQL read models in batches. Run several: the group "
            "spreads the partitions over them."
        ),
        examples=[
            f"daybook worker --url {_PG} --broker {_KAFKA} --group daybook-projections",
            f"daybook worker --url {_PG} --readmodels-url postgresql://daybook@views/daybook",
            f"daybook worker --url {_PG} --batch-size 5000 --batch-wait 0.1 --port 6066",
            f"daybook worker --url {_PG} --topic daybook.events --partitions 8 -v",
            f"daybook worker --url {_PG} --metrics-port 9467 --log-format json",
            f"daybook worker --url {_PG} --startup-wait 300",
        ],
    )
    _common(worker)
    worker.add_argument(
        "--group",
        type=group_id,
        help=(
            f"consumer group id, 1-{MAX_GROUP} of a-z A-Z 0-9 . _ - "
            f"(default: $DAYBOOK_GROUP, else {DEFAULT_GROUP})"
        ),
    )
    add_readmodels_argument(worker)
    worker.add_argument(
        "--batch-size",
        type=whole_number(1),
        default=2000,
        help="messages a batch takes whole fetches until it holds (so at most twice as many)",
    )
    worker.add_argument(
        "--batch-wait",
        type=seconds_or_zero,
        default=0.0,
        help="seconds a batch holding fewer than --batch-size events waits, from its first, "
        "for more (a stop or a rebalance ends the wait at once; 0, the default: it takes "
        "what has been fetched)",
    )
    worker.add_argument(
        "--port", type=whole_number(0, 65535), default=0, help="faust web port (0: none)"
    )
    add_metrics_port_argument(worker)
    add_log_arguments(worker, level=False)
    add_startup_wait_argument(worker)
    worker.set_defaults(handler=_run_worker)

    stream = command(
        subparsers,
        "stream",
        help="distributed projections: status",
        description="Inspect the relay and the stream workers.",
        examples=[f"daybook stream status --url {_PG}"],
    )
    stream_commands = stream.add_subparsers(dest="stream_command", metavar="COMMAND")
    status = command(
        stream_commands,
        "status",
        help="relay cursor and worker partitions",
        description=(
            "The relay's cursor (position, partitions, re-publications after broker data "
            "loss) and, for one consumer group, each partition's position, applied events, "
            "duplicates skipped and dead letters. Exits 1 when a partition is not live, "
            "while a dead letter is left out of a version that is not retired, or when the "
            "group has applied nothing here while other groups have (a misspelt --group: "
            "those are listed)."
        ),
        examples=[
            f"daybook stream status --url {_PG}",
            f"daybook stream status --url {_PG} --group daybook-projections",
            f"daybook stream status --url {_PG} --readmodels-url postgresql://daybook@views/daybook",
            f"daybook stream status --url {_PG} --topic daybook.events",
        ],
    )
    _common(status, service=False)
    status.add_argument(
        "--group",
        type=group_id,
        help=(
            f"consumer group id, 1-{MAX_GROUP} of a-z A-Z 0-9 . _ - "
            f"(default: $DAYBOOK_GROUP, else {DEFAULT_GROUP})"
        ),
    )
    add_readmodels_argument(status)
    status.set_defaults(handler=_status)
    stream.set_defaults(handler=lambda args: _help(stream))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _common(parser: argparse.ArgumentParser, *, service: bool = True) -> None:
    """The options of the relay and the worker (``service``), or of ``stream status``,
    which reads the databases only: no broker, partitions or log level."""
    add_url_argument(parser, postgres_only=True)
    parser.add_argument(
        "--topic",
        type=topic_name,
        help=(
            f"the events topic, 1-{MAX_TOPIC} of a-z A-Z 0-9 . _ - "
            f"(default: $DAYBOOK_TOPIC, else {DEFAULT_TOPIC})"
        ),
    )
    if not service:
        return
    parser.add_argument(
        "--broker",
        help=f"Kafka URL, kafka://host:port (default: ${BROKER_ENV}, else {DEFAULT_BROKER})",
    )
    parser.add_argument(
        "--partitions",
        type=whole_number(1),
        help=(
            "partitions of the topic, the count the relay's cursor records: the relay and the "
            f"workers refuse another (default: $DAYBOOK_PARTITIONS, else {DEFAULT_PARTITIONS})"
        ),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log at INFO level (default: warnings only, or INFO with --log-format json)",
    )


def _settings(args: argparse.Namespace, *, broker: bool) -> Settings:
    """The settings, checked: PostgreSQL that answers, and (with ``broker``) a broker."""
    settings = checked_settings(args, kinds=("postgresql",), why=_WHY, readmodels=True)
    if settings.readmodels_url is not None:
        preflight.check_store(
            settings.readmodels_url,
            role="read-model database",
            kinds=("postgresql",),
            why="the stream workers write read models to PostgreSQL",
        )
    if broker:
        preflight.check_broker(settings.broker_url)
    return settings


def _logging(args: argparse.Namespace) -> None:
    """Warnings only unless -v (or JSON lines, which a collector filters): the service's
    start, catch-up, reconnect and stop are INFO lines."""
    json_lines = getattr(args, "log_format", "console") == "json"
    setup_logging(args, logging.INFO if args.verbose or json_lines else logging.WARNING)


def _run_relay(args: argparse.Namespace) -> int:
    from daybook.infrastructure.streaming.relay import RewindRefused, rewind

    _logging(args)
    if args.rewind:  # a command a person runs once: refused at once if anything is down
        if args.startup_wait is not None:
            print(
                "daybook relay: --startup-wait is for the running relay (--rewind refuses a "
                "database that does not answer at once); leave it out",
                file=sys.stderr,
            )
            return 2
        settings = _settings(args, broker=False)
        try:
            rewind(settings.url, settings.topic)
        except RewindRefused as refused:  # a relay is running, or none published the topic
            print(f"daybook relay: refused ({refused.code}): {refused}", file=sys.stderr)
            return 1
        print(f"daybook: the relay will re-publish {settings.topic} from the start of the log")
        return 0
    # Metrics from the start: a probe sees the service (waiting, if it waits) at once.
    with metrics_served(args, "relay"):
        settings = when_usable(args, lambda: _settings(args, broker=True))
        with stopped_at_start():
            relay = outbox_relay(
                settings, batch_size=args.batch_size, poll_interval=args.poll_interval
            )

        async def main() -> Health:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, relay.stop)
            return await relay.run()

        try:
            health = asyncio.run(main())
        finally:
            relay.close()
    if health.state is ServiceState.FAILED:
        print(f"daybook relay: stopped: {health.error}", file=sys.stderr)
        return 1
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from daybook.infrastructure.observability.tracing import flush_tracing
    from daybook.infrastructure.streaming.app import run_worker, waited_at_start

    _logging(args)
    # Metrics from the start: a probe sees the service (waiting, if it waits) at once.
    with metrics_served(args, "worker"):
        settings = when_usable(args, lambda: _settings(args, broker=True), waited=waited_at_start())
        config = stream_worker_config(
            settings,
            batch_size=args.batch_size,
            batch_wait=args.batch_wait,
            web_port=args.port,
        )
        health = run_worker(
            config, banner=args.log_format != "json", startup_wait=startup_wait(args)
        )
    code = 0
    if health.state is ServiceState.FAILED:
        print(f"daybook worker: stopped: {health.error}", file=sys.stderr)
        code = 1
    # faust leaves threads behind (its consumer thread, aiokafka's) that can keep a stopped
    # worker's interpreter from exiting, for minutes; everything of ours is closed by now.
    # No atexit runs after os._exit: the spans still batched for export are sent first.
    flush_tracing()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _status(args: argparse.Namespace) -> int:
    from daybook.infrastructure.streaming.progress import (
        LIVE,
        PARKED,
        letter_summary,
        read_groups,
        read_status,
    )
    from daybook.infrastructure.streaming.relay import read_cursor

    settings = _settings(args, broker=False)
    # The workers keep their progress and dead letters beside the read models they write.
    readmodels = settings.readmodels
    status = read_status(readmodels, settings.group, settings.topic)
    unknown = None if status else _unknown_group(settings, read_groups(readmodels, settings.topic))
    if unknown is not None:
        print(f"daybook: {unknown}", file=sys.stderr)
        return 1
    cursor = read_cursor(settings.url, settings.topic)
    if cursor is None:
        print(f"relay  {settings.topic}: never ran")
    else:
        print(
            f"relay  {settings.topic}: position {cursor.position}, {cursor.partitions} partitions, "
            f"re-published after broker data loss {cursor.republished} time(s)"
        )
    if not status:
        print(f"worker {settings.group}: no partition applied yet")
    for part in status:
        print(
            f"worker {settings.group} partition {part.partition}: position {part.position} "
            f"(complete to {part.bound}), "
            f"{part.applied} applied, {part.duplicates} duplicates, state {part.state}"
            + (
                f", {part.dead_letters} dead letter(s): {part.last_error}"
                if part.dead_letters
                else ""
            )
        )
    letters = letter_summary(readmodels, settings.group, settings.topic)
    if letters.letters:
        print(
            f"worker {settings.group}: {letters.letters} dead letter(s), {letters.open} left "
            "out of versions not retired"
            + (f" ({', '.join(letters.versions)})" if letters.open else "")
        )
    open_letters = letters.open > 0
    if open_letters:
        print(
            "  to bring them in: give each version named a new version (fixed), build it "
            "with 'daybook projections rebuild NAME' and hand it to the group with "
            f"'daybook projections handover NAME --to stream:{settings.group}'",
            file=sys.stderr,
        )
    # A partition that parked events is healthy again once none of them is open.
    stuck = any(p.state not in (LIVE, PARKED) for p in status)
    return 1 if open_letters or stuck else 0


def _unknown_group(settings: Settings, groups: list[str]) -> str | None:
    """Why a group that applied nothing here is a mistake (a misspelt --group, another
    database), given the groups that did; None before any group applied anything from the
    topic (a new deployment), where nothing applied yet is the answer, whatever the name."""
    if not groups:
        return None
    return (
        f"no stream group {settings.group!r} has applied anything from topic "
        f"{settings.topic!r} here (groups that have: {', '.join(groups)})"
    )


def main(argv: list[str] | None = None) -> int:
    """Just the streaming commands (``python -m infrastructure.streaming.cli relay ...``)."""
    parser = Parser(prog="daybook")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))

    def run() -> int:
        args = parser.parse_args(argv)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help()
            return 2
        return int(handler(args))

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
