"""The relay's LISTEN session, while the broker is down: from the start, or after the relay
has published."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daybook import Ledger, open_ledger
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.streaming.relay import Relay, RelayConfig, read_cursor
from scripts import services
from tests.pg_locks import listening_sessions

pytestmark = pytest.mark.postgres


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def relay_running(url: str, ledger: Ledger, broker: str) -> Iterator[Relay]:
    """A relay of ``ledger``'s log (at ``url``) to topic ``t`` on ``broker``, in a thread of
    its own; stopped, and its connections closed, on the way out."""
    config = RelayConfig(url, broker, topic="t", partitions=1, backoff_max=0.2, request_timeout=1.0)
    relay = Relay(config, event_log_of(ledger))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(relay.run(),))
    thread.start()
    try:
        yield relay
    finally:
        loop.call_soon_threadsafe(relay.stop)
        thread.join(30)
        loop.close()
        relay.close()


def _until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.05)


def test_the_relay_does_not_listen_while_the_broker_is_down(pg_url: str) -> None:
    """A session that listens and is never read holds back PostgreSQL's notification
    queue, shared by the whole server: every commit adds to it (once the session's socket
    is full, after some 100,000), up to its 8 GB, and then every commit fails. While the
    broker is down the relay reads nothing, for as long as the outage lasts. Its health
    says it retries, with the reason."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    try:
        with relay_running(pg_url, ledger, f"kafka://127.0.0.1:{_closed_port()}") as relay:
            _until(lambda: relay.stats.state == "waiting for broker", "the relay to wait")
            for _ in range(20):
                ledger.deposit(account, 5)  # the ledger goes on writing
                time.sleep(0.05)
            assert relay.stats.state == "waiting for broker"
            assert relay.health().state is ServiceState.RETRYING
            assert listening_sessions(pg_url) == 0
    finally:
        ledger.close()


@pytest.fixture
def own_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[services.KafkaHandle]:
    """A broker of this test's own (it is stopped and started again), even when the session
    uses an external one."""
    monkeypatch.delenv(services.KAFKA_BOOTSTRAP_ENV, raising=False)
    handle = services.start_kafka(tmp_path / "broker")
    yield handle
    handle.stop()


def test_the_relay_stops_listening_when_the_broker_goes_down_and_listens_again_after(
    pg_url: str, own_broker: services.KafkaHandle
) -> None:
    """The relay publishes, listens while it waits for more, then the broker goes down: it
    closes its LISTEN session for the outage (nobody would read it), and opens it again once
    it publishes again, missing nothing committed meanwhile."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id

    def published() -> int:
        cursor = read_cursor(pg_url, "t")
        return cursor.position if cursor else 0

    try:
        with relay_running(pg_url, ledger, f"kafka://{own_broker.bootstrap}") as relay:
            ledger.deposit(account, 5)
            _until(lambda: published() == ledger.head(), "the relay to publish")
            _until(lambda: listening_sessions(pg_url) == 1, "the relay to listen")
            own_broker.stop()
            for _ in range(5):
                ledger.deposit(account, 5)  # committed during the outage
            _until(lambda: relay.stats.state == "waiting for broker", "the relay to see it")
            for _ in range(20):
                assert listening_sessions(pg_url) == 0
                # Its health said it ran, through the whole outage: it retries.
                health = relay.health()
                assert health.state is ServiceState.RETRYING and not health.ok, health
                assert (health.error or "").startswith("broker unavailable: "), health
                time.sleep(0.05)
            own_broker.start()
            _until(lambda: published() == ledger.head(), "the relay to publish after it")
            _until(lambda: listening_sessions(pg_url) == 1, "the relay to listen again")
            health = relay.health()
            assert (health.state, health.restarts) == (ServiceState.RUNNING, 1), health
    finally:
        ledger.close()


def test_a_busy_relay_reads_its_notifications_as_it_goes(
    pg_url: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every commit NOTIFYs the relay's LISTEN session, and the relay reads that session
    only when a read of the log found nothing (it waits then), and then one notification
    per wait. Under steady load nearly every read finds events: the notifications pile up
    unread and, once the session's socket is full, hold back PostgreSQL's notification
    queue (shared by the whole server, 8 GB, then every commit fails) for as long as the
    load lasts. N busy batches must not leave N notifications waiting."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    busy = 100
    reads = 0
    backlog: list[int] = []
    config = RelayConfig(
        pg_url, f"kafka://{kafka_bootstrap}", topic=f"busy-{time.monotonic_ns()}",
        partitions=1, backoff_max=0.2, request_timeout=5.0,
    )  # fmt: skip
    relay = Relay(config, event_log_of(ledger))
    real_read = relay._log.notifications
    real_wait = relay._wait_for_events

    def read_under_load(after: int, limit: int) -> list[Any]:
        nonlocal reads
        if reads < busy:
            reads += 1
            ledger.deposit(account, 1)  # a command commits during every read: load
        return real_read(after, limit)

    async def wait_counting(listen: Any) -> None:
        if reads >= busy and not backlog:
            # The load is over: what is waiting unread on the relay's LISTEN session now.
            backlog.append(len([n async for n in listen.notifies(timeout=0)]))
        await real_wait(listen)

    monkeypatch.setattr(relay._log, "notifications", read_under_load)
    monkeypatch.setattr(relay, "_wait_for_events", wait_counting)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(relay.run(),))
    thread.start()
    try:
        _until(lambda: bool(backlog), "the relay to get through the load", 120)
    finally:
        loop.call_soon_threadsafe(relay.stop)
        thread.join(30)
        loop.close()
        relay.close()
        ledger.close()
    assert backlog[0] <= 1, (
        f"{backlog[0]} notifications left unread on the relay's LISTEN session after "
        f"{busy} busy reads"
    )
