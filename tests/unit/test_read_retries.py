"""A ledger's PostgreSQL reads are tried again when they fail at once, not when they waited.

eventsourcing retries each read ten times, and each attempt may wait the pool's whole
``connect_timeout`` for a server that refuses connections: a command on an account not in
the cache was held ten times that (100 s by default), twice over, far past the ledger's
``outage_budget``. The attempts are counted (nothing listens on port 9), not timed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from eventsourcing.persistence import OperationalError
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

from daybook.infrastructure.eventstore.postgres import PostgresRecorder, SnapshotRecorder


@pytest.fixture
def datastore() -> Iterator[PostgresDatastore]:
    store = PostgresDatastore("x", "127.0.0.1", 9, "nobody", "", connect_timeout=2)
    # A recorder asks the server for its types as it is built: not here, so that only the
    # reads below ask for connections.
    store.register_type_adapters = lambda: None  # type: ignore[method-assign]
    yield store
    store.close()


def counting(pool: Any, fail_at_once: bool) -> list[int]:
    """Count the pool's connection requests; with ``fail_at_once``, each fails at once (a
    dead pooled connection, say), else each waits the pool's timeout as it would."""
    asked: list[int] = []
    getconn = pool.getconn

    def counted(timeout: float | None = None) -> Any:
        asked.append(1)
        if fail_at_once:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return getconn(timeout)

    pool.getconn = counted
    return asked


def reads(datastore: PostgresDatastore) -> list[Any]:
    """Each read daybook's recorders make, on eventsourcing's recorder of the same kind
    (daybook's own connects as it is built; the reads are eventsourcing's, wrapped)."""
    plain = PostgresApplicationRecorder(datastore)
    return [
        lambda: PostgresRecorder.select_events(plain, uuid4()),
        lambda: PostgresRecorder.select_notifications(plain, 0, 10),
        lambda: PostgresRecorder.max_notification_id(plain),
        lambda: SnapshotRecorder(datastore).select_events(uuid4()),
    ]


@pytest.mark.parametrize("read", range(4), ids=["events", "notifications", "head", "snapshots"])
def test_a_read_that_waited_for_the_pool_is_not_tried_again(
    datastore: PostgresDatastore, read: int
) -> None:
    asked = counting(datastore.pool, fail_at_once=False)
    with pytest.raises(OperationalError, match="couldn't get a connection"):
        reads(datastore)[read]()
    assert len(asked) == 1


def test_a_read_that_failed_at_once_is_tried_again(datastore: PostgresDatastore) -> None:
    asked = counting(datastore.pool, fail_at_once=True)
    with pytest.raises(OperationalError, match="closed the connection"):
        reads(datastore)[0]()
    assert len(asked) == 10
