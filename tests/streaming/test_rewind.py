"""``daybook relay --rewind``: the relay re-publishes the whole log on its next start; a
rewind that cannot do that says why and changes nothing. And the cursor's partition count,
which no restart of the relay changes."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from daybook import open_event_log, open_ledger
from daybook.infrastructure.cli import main
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.streaming import relay
from daybook.infrastructure.streaming.relay import Relay, RelayConfig, read_cursor

pytestmark = pytest.mark.postgres


def test_a_rewind_refuses_a_topic_no_relay_published_and_changes_nothing(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = open_ledger(pg_url)
    ledger.open_account("ann", "EUR")
    ledger.close()
    rewind = ["relay", "--url", pg_url, "--rewind"]

    # No relay has run yet: its first run publishes the whole log anyway.
    assert main(rewind) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "no relay has published" in err
    assert read_cursor(pg_url) is None

    with psycopg.connect(pg_url, autocommit=True) as conn:  # a relay published two topics
        conn.execute(relay._CREATE)
        for topic in ("daybook.events", "orders.events"):
            conn.execute(
                f"INSERT INTO {relay.CURSOR_TABLE} (topic, position, partitions, chain,"
                " next_offsets) VALUES (%s, 42, 2, '{40,42}', '{3,4}')",
                (topic,),
            )

    assert main([*rewind, "--topic", "daybook.event"]) == 1  # mistyped
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "'daybook.event'" in err and "daybook.events, orders.events" in err
    for topic in ("daybook.events", "orders.events"):
        cursor = read_cursor(pg_url, topic)
        assert cursor is not None and cursor.position == 42

    assert main([*rewind, "--topic", "orders.events"]) == 0
    assert "re-publish orders.events" in capsys.readouterr().out
    rewound, kept = read_cursor(pg_url, "orders.events"), read_cursor(pg_url, "daybook.events")
    assert rewound is not None and rewound.position == 0 and rewound.chain == (0, 0)
    assert kept is not None and kept.position == 42


def test_a_relay_started_with_another_partition_count_than_its_cursor_is_refused(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The cursor was made for 2 partitions (its chain has an entry per partition); the
    relay restarted with --partitions 4 (or without it, for a topic made with 2) is an
    operator's mistake: refused with a code and one line, not a failure with a traceback,
    and before the broker is asked anything (this one does not answer)."""
    open_ledger(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(relay._CREATE)
        conn.execute(
            f"INSERT INTO {relay.CURSOR_TABLE} (topic, position, partitions, chain,"
            " next_offsets) VALUES ('t', 42, 2, '{40,42}', '{3,4}')"
        )
    config = RelayConfig(pg_url, "kafka://127.0.0.1:9", topic="t", partitions=4)
    publisher = Relay(config, open_event_log(pg_url), owns_log=True)
    caplog.set_level(logging.INFO)
    try:
        health = asyncio.run(publisher.run())
    finally:
        publisher.close()
    assert health.state is ServiceState.FAILED
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert health.error is not None
    assert health.error.startswith("refused (partitioning_mismatch): "), health.error
    assert "2 partitions" in health.error and "--partitions 2" in health.error
    cursor = read_cursor(pg_url, "t")
    assert cursor is not None and (cursor.position, cursor.partitions) == (42, 2)
