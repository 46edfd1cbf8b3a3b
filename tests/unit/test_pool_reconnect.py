"""A ledger's PostgreSQL pool tries to replace a lost connection at least every second.

psycopg_pool doubles the delay between its attempts (1, 2, 4, 8, 16 s...): after an outage of
a quarter of a minute its next attempt could be 16 s away while the server was back, and every
command meanwhile was answered ``unavailable``. The attempts here fail at once (nothing listens
on port 9), and the delays the pool schedules them after are read, not waited.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from eventsourcing.postgres import PostgresDatastore

from daybook.infrastructure.compat.eventsourcing import RECONNECT_DELAY, reconnect_promptly


@pytest.fixture
def datastore() -> Iterator[PostgresDatastore]:
    store = PostgresDatastore("x", "127.0.0.1", 9, "nobody", "", connect_timeout=2)
    yield store
    store.close()


def delays(pool: Any, attempts: int) -> list[float]:
    """The delays ``attempts`` failed attempts in a row are rescheduled after: each attempt
    runs at once, as the pool's scheduler would run it once its delay has passed."""
    scheduled: list[tuple[Any, float]] = []
    pool.schedule_task = lambda task, delay: scheduled.append((task, delay))
    pool._add_connection(None)
    for _ in range(attempts - 1):
        task, _delay = scheduled[-1]
        pool._add_connection(task.attempt, growing=task.growing)
    return [delay for _task, delay in scheduled]


def test_psycopg_pool_alone_backs_off_for_many_seconds(datastore: PostgresDatastore) -> None:
    """What ``reconnect_promptly`` is for: without it, the sixth attempt is 16 s away."""
    assert max(delays(datastore.pool, 6)) > 10 * RECONNECT_DELAY


def test_a_ledger_pool_tries_again_at_least_every_reconnect_delay(
    datastore: PostgresDatastore,
) -> None:
    reconnect_promptly(datastore)
    waits = delays(datastore.pool, 12)
    assert len(waits) == 12
    assert max(waits) <= RECONNECT_DELAY
    assert min(waits) > 0  # still a pause between attempts, not a busy loop


def test_the_pool_does_not_keep_itself_alive(datastore: PostgresDatastore) -> None:
    """The function set on the pool holds it weakly: no cycle through the pool."""
    import gc
    import weakref

    reconnect_promptly(datastore)
    pool = weakref.ref(datastore.pool)
    gc.disable()
    try:
        datastore.pool = None  # type: ignore[assignment]
        assert pool() is None
    finally:
        gc.enable()
