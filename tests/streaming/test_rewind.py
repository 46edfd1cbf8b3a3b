"""``daybook relay --rewind``: the relay re-publishes the whole log on its next start; a
rewind that cannot do that says why and changes nothing."""

from __future__ import annotations

import psycopg
import pytest

from daybook import open_ledger
from daybook.infrastructure.cli import main
from daybook.infrastructure.streaming import relay
from daybook.infrastructure.streaming.relay import read_cursor

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
