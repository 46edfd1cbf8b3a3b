"""The relay's LISTEN session, while the broker is down."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from daybook import open_ledger
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.streaming.relay import Relay, RelayConfig
from tests.pg_locks import listening_sessions

pytestmark = pytest.mark.postgres


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_relay_does_not_listen_while_the_broker_is_down(pg_url: str) -> None:
    """A session that listens and is never read holds back PostgreSQL's notification
    queue, shared by the whole server: every commit adds to it (once the session's socket
    is full, after some 100,000), up to its 8 GB, and then every commit fails. While the
    broker is down the relay reads nothing, for as long as the outage lasts."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    config = RelayConfig(
        pg_url, f"kafka://127.0.0.1:{_closed_port()}", topic="t", backoff_max=0.2,
        request_timeout=1.0,
    )  # fmt: skip
    relay = Relay(config, event_log_of(ledger))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(relay.run(),))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while relay.stats.state != "waiting for broker" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.stats.state == "waiting for broker"
        for _ in range(20):
            ledger.deposit(account, 5)  # the ledger goes on writing
            time.sleep(0.05)
        assert relay.stats.state == "waiting for broker"
        assert listening_sessions(pg_url) == 0
    finally:
        loop.call_soon_threadsafe(relay.stop)
        thread.join(30)
        loop.close()
        relay.close()
        ledger.close()
