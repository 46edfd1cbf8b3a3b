"""A network partition between daybook and PostgreSQL: nothing answers, nothing refuses.

Without TCP liveness settings on its connections (``urls.TCP_LIVENESS``), a command sent into
the partition held its caller for about 15 minutes (the kernel retransmitting the commit),
and a read for as long, whatever ``timeout`` it asked for. With them, each ends with an
outage error (``503 unavailable`` over HTTP) soon after the URL's ``tcp_user_timeout``; once
the link is back, the same request id applies the command exactly once, and reads answer.

The tests shorten the settings through the URL, as a user may. ``_within`` only guards
against a hang: its bound is minutes, ten times what the settings take.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from daybook import open_event_log, open_ledger, open_read_models, run_projections
from daybook.infrastructure.http.problems import is_outage
from daybook.infrastructure.readmodels.postgres import PostgresStore
from tests.integration.partition import partitionable

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: Give up on a silent server after 2 s unacknowledged, probe an idle connection after 1 s,
#: and wait at most 2 s for a connection.
QUICK = "?tcp_user_timeout=2000&keepalives_idle=1&keepalives_interval=1&connect_timeout=2"

HANG = 180.0


def _within(seconds: float, call: Callable[[], Any]) -> BaseException:
    """The error ``call`` ends with; fails the test if it is still running after ``seconds``
    (a daemon thread: a hung call does not hold the test run)."""
    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            ended.append(None)
        except BaseException as error:  # what is asserted below
            ended.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting on a silent server after {seconds:.0f}s", pytrace=False)
    (error,) = ended
    assert error is not None, "the call succeeded through a cut link"
    return error


def test_a_command_sent_into_a_partition_ends_as_an_outage_and_its_retry_applies_once(
    pg_url: str,
) -> None:
    with partitionable(pg_url) as path, open_ledger(path.url + QUICK) as ledger, path.healed():
        account = ledger.open_account("ann", "EUR").account_id
        ledger.deposit(account, 100)
        path.cut()
        error = _within(HANG, lambda: ledger.deposit(account, 5, request_id="cut-1"))
        assert is_outage(error), repr(error)
        path.heal()
        # The commit may or may not have reached the server: the same request id decides.
        # The pool may still be reconnecting (an attempt of its own that went into the cut
        # waits its connect_timeout): a retry meanwhile is told ``unavailable`` again, as
        # a caller would be, and applies nothing.
        outages = retry_through_outage(lambda: ledger.deposit(account, 5, request_id="cut-1"))
        assert outages < RETRIES, "the ledger never answered after the link healed"
        ledger.deposit(account, 5, request_id="cut-1")
        assert ledger.account(account).balance == 105


#: Retries after healing before a test gives up: each waits at most the pool's 2 s, and the
#: pool tries to connect at least every second (compat.eventsourcing.reconnect_promptly).
RETRIES = 30


def retry_through_outage(call: Callable[[], Any]) -> int:
    """Calls ``call`` until it ends otherwise than in an outage error; how many did."""
    for outages in range(RETRIES):
        try:
            call()
        except Exception as error:
            if not is_outage(error):
                raise
        else:
            return outages
    return RETRIES


def test_a_read_during_a_partition_ends_as_an_outage_and_reads_again_once_healed(
    pg_url: str,
) -> None:
    with partitionable(pg_url) as path, open_ledger(path.url + QUICK) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        receipt = ledger.deposit(account, 100)
        with run_projections(ledger, poll_interval=0.05) as runner:
            runner.views.balance(account, min_position=receipt.position, timeout=30)
        log = open_event_log(path.url + QUICK)
        views = open_read_models(path.url + QUICK, log=log)
        try:
            views.balance(account)  # its connection is open, and goes silent
            with path.healed():
                path.cut()
                error = _within(HANG, lambda: views.balance(account, timeout=3))
                assert is_outage(error), repr(error)
            row = views.balance(account, timeout=30)
            assert row is not None and row.balance == 100
        finally:
            views.close()
            log.close()


def _tcp(connection: Any) -> tuple[int, int, int]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_USER_TIMEOUT) of a psycopg connection's socket."""
    fd = os.dup(connection.pgconn.socket)
    with socket.socket(fileno=fd) as sock:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )


def test_every_kind_of_connection_carries_the_settings_to_its_socket(pg_url: str) -> None:
    """The event store's pool, the log's LISTEN session and a read store: the defaults, and
    a URL's own value where it gives one."""
    url = pg_url + "?tcp_user_timeout=12345"
    with open_ledger(url) as ledger:
        with ledger.service.recorder.datastore.get_connection() as pooled:
            assert _tcp(pooled) == (1, 10, 12345)
        log = open_event_log(url)
        store = PostgresStore(url)
        try:
            log.wait(0)  # opens the listening session
            assert log._listen is not None
            assert _tcp(log._listen) == (1, 10, 12345)
            assert _tcp(store.conn) == (1, 10, 12345)
        finally:
            store.close()
            log.close()


def test_every_session_that_may_hold_what_others_wait_for_asks_the_server_to_probe_it(
    pg_url: str,
) -> None:
    """A host that vanishes (a partition, a host that died) tells the server nothing: its
    sessions, and what they hold (a runner's or a relay's advisory lock, the events table's
    lock in a commit under way, a LISTEN), stayed until the server's own keepalive ended
    them, with the kernel's defaults after about two hours and a quarter, the standby
    runner of another server waiting all that while (its /health ok). Each such session now
    asks the server to probe it after 10 idle seconds (3 probes, 5 s apart)."""
    wanted = ("10", "5", "3")

    def probes(conn: Any) -> tuple[str, ...]:
        shown = []
        for name in ("idle", "interval", "count"):
            row = conn.execute(f"SHOW tcp_keepalives_{name}").fetchone()
            shown.append(str(next(iter(row.values())) if isinstance(row, dict) else row[0]))
        return tuple(shown)

    with open_ledger(pg_url) as ledger:
        ledger.open_account("ann", "EUR")
        with ledger.service.recorder.datastore.get_connection() as conn:
            assert probes(conn) == wanted, "the ledger's sessions (the events table's lock)"
        with run_projections(ledger, start=False) as runner:
            runner.step()
            assert runner.store is not None and runner._locks is not None
            assert probes(runner.store.conn) == wanted, "the runner's read-model session"
            assert probes(runner._locks.conn) == wanted, "the runner's advisory locks"
        log = open_event_log(pg_url)
        try:
            log.wait(0)  # listens from here
            assert log._listen is not None
            assert probes(log._listen) == wanted, "a LISTEN session"
        finally:
            log.close()
