"""``daybook relay``, ``daybook worker`` and ``daybook stream status``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from daybook.infrastructure.bootstrap import outbox_relay, stream_worker_config
from daybook.infrastructure.cli import add_readmodels_argument, add_url_argument, settings_of
from daybook.infrastructure.lifecycle import Health, ServiceState
from daybook.infrastructure.settings import (
    DEFAULT_BROKER,
    DEFAULT_GROUP,
    DEFAULT_PARTITIONS,
    DEFAULT_TOPIC,
)
from daybook.infrastructure.streaming.broker import BROKER_ENV


def register(subparsers: Any) -> None:
    relay = subparsers.add_parser(
        "relay",
        help="publish the event log to Kafka (the outbox relay)",
        description=(
            "Publish the event log, in order, to a Kafka topic keyed by aggregate id. The "
            "cursor moves only after the broker acknowledged a batch; one relay per topic is "
            "active (advisory lock), others wait as standbys."
        ),
    )
    _common(relay)
    relay.add_argument("--batch-size", type=int, default=5000)
    relay.add_argument("--poll-interval", type=float, default=0.5)
    relay.add_argument(
        "--rewind",
        action="store_true",
        help="re-publish the whole log (the relay must be stopped), then exit",
    )
    relay.set_defaults(handler=_run_relay)

    worker = subparsers.add_parser(
        "worker",
        help="apply the stream to the read models (a faust-streaming worker)",
        description=(
            "Consume the events topic in a consumer group and apply the projection "
            "definitions to the PostgreSQL read models in batches. Run several: the group "
            "spreads the partitions over them."
        ),
    )
    _common(worker)
    worker.add_argument(
        "--group", help=f"consumer group id (default: $DAYBOOK_GROUP, else {DEFAULT_GROUP})"
    )
    add_readmodels_argument(worker)
    worker.add_argument("--batch-size", type=int, default=2000)
    worker.add_argument("--batch-wait", type=float, default=0.05, help="seconds to fill a batch")
    worker.add_argument("--port", type=int, default=0, help="faust web port (0: none)")
    worker.set_defaults(handler=_run_worker)

    stream = subparsers.add_parser("stream", help="distributed projections: status")
    stream_commands = stream.add_subparsers(dest="stream_command", metavar="COMMAND")
    status = stream_commands.add_parser("status", help="relay cursor and worker partitions")
    _common(status)
    status.add_argument(
        "--group", help=f"consumer group id (default: $DAYBOOK_GROUP, else {DEFAULT_GROUP})"
    )
    status.set_defaults(handler=_status)


def _common(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    parser.add_argument(
        "--broker",
        help=f"Kafka URL, kafka://host:port (default: ${BROKER_ENV}, else {DEFAULT_BROKER})",
    )
    parser.add_argument(
        "--topic", help=f"the events topic (default: $DAYBOOK_TOPIC, else {DEFAULT_TOPIC})"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        help=f"partitions of the topic (default: $DAYBOOK_PARTITIONS, else {DEFAULT_PARTITIONS})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _run_relay(args: argparse.Namespace) -> int:
    from daybook.infrastructure.streaming.relay import rewind

    _logging(args)
    settings = settings_of(args)
    if args.rewind:
        rewind(settings.url, settings.topic)
        print(f"daybook: the relay will re-publish {settings.topic} from the start of the log")
        return 0
    relay = outbox_relay(settings, batch_size=args.batch_size, poll_interval=args.poll_interval)

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
    from daybook.infrastructure.streaming.app import run_worker

    _logging(args)
    config = stream_worker_config(
        settings_of(args),
        batch_size=args.batch_size,
        batch_wait=args.batch_wait,
        web_port=args.port,
    )
    health = run_worker(config)
    code = 0
    if health.state is ServiceState.FAILED:
        print(f"daybook worker: stopped: {health.error}", file=sys.stderr)
        code = 1
    # faust leaves threads behind (its consumer thread, aiokafka's) that can keep a stopped
    # worker's interpreter from exiting, for minutes; everything of ours is closed by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _status(args: argparse.Namespace) -> int:
    from daybook.infrastructure.streaming.progress import read_status
    from daybook.infrastructure.streaming.relay import read_cursor

    settings = settings_of(args)
    cursor = read_cursor(settings.url, settings.topic)
    if cursor is None:
        print(f"relay  {settings.topic}: never ran")
    else:
        print(
            f"relay  {settings.topic}: position {cursor.position}, {cursor.partitions} partitions, "
            f"re-published after broker data loss {cursor.republished} time(s)"
        )
    status = read_status(settings.url, settings.group, settings.topic)
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
    return 1 if any(p.dead_letters or p.state != "live" for p in status) else 0


def main(argv: list[str] | None = None) -> int:
    """Just the streaming commands (``python -m infrastructure.streaming.cli relay ...``)."""
    parser = argparse.ArgumentParser(prog="daybook")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
