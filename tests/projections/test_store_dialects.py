"""Each read-model dialect through the one ``ReadStore`` interface, SQLite and PostgreSQL
alike: rows, transactions, checksums, locks, the log's head, and the version catalog."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from daybook import open_ledger
from daybook.infrastructure.readmodels import checksums
from daybook.infrastructure.readmodels.catalog import (
    IllegalTransition,
    VersionCatalog,
    VersionState,
)
from daybook.infrastructure.readmodels.dead_letters import DeadLetters
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconcile_log import ReconcileLog
from daybook.infrastructure.readmodels.store import ReadStore
from daybook.projections.model import Column, Projection, Row, Table
from tests.pg_locks import wait_for_lock_waits
from tests.together import failures_together

PAIRS = Table(
    "pairs",
    (Column("k"), Column("n", "bigint"), Column("amount", "bigint"), Column("note", nullable=True)),
    ("k", "n"),
    indexes=(("amount",),),
)
NOTES = Table("notes", (Column("seq", "bigint"), Column("text")), ("seq",), append_only=True)
PROBE = Projection("probe", 1, (PAIRS, NOTES))
PROBE_V2 = Projection("probe", 2, (PAIRS, NOTES))


def pair(k: str, n: int, amount: int, note: str | None = None) -> Row:
    return {"k": k, "n": n, "amount": amount, "note": note}


def in_order(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (str(r["k"]), int(r["n"] or 0)))


@pytest.fixture
def url(shared_store_url: str) -> str:
    """A database on each dialect that several connections open at once."""
    return shared_store_url


@pytest.fixture
def store(url: str) -> Iterator[ReadStore]:
    store = open_store(url)
    VersionCatalog(store).ensure()
    VersionCatalog(store).register(PROBE)
    VersionCatalog(store).activate(PROBE)  # built: it serves
    yield store
    store.close()


def test_rows_written_every_way_read_back_alike(store: ReadStore) -> None:
    with store.transaction():
        store.insert(PAIRS, 1, [pair("a", 1, 10), pair("a", 2, 20, "ü")])
        store.insert_values(PAIRS, 1, [("b", 1, 30, None), ("c", 7, 70, "x")])
        store.upsert(PAIRS, 1, [pair("a", 1, 11), pair("d", 1, 40)])
        store.upsert_values(PAIRS, 1, [("b", 1, 31, "changed"), ("e", 5, 50, None)])
        store.delete(PAIRS, 1, [("c", 7), ("nobody", 0)])
        store.insert(NOTES, 1, [{"seq": 1, "text": "first"}])
        store.insert_values(NOTES, 1, [(2, "second")])
    expected = [
        pair("a", 1, 11),
        pair("a", 2, 20, "ü"),
        pair("b", 1, 31, "changed"),
        pair("d", 1, 40),
        pair("e", 5, 50),
    ]
    assert in_order(list(store.all_rows(PAIRS, 1))) == expected
    assert store.count(PAIRS, 1) == 5 and store.count(NOTES, 1) == 2
    assert store.fetch(PAIRS, 1, ("a", 2)) == pair("a", 2, 20, "ü")
    assert store.fetch(PAIRS, 1, ("c", 7)) is None
    assert store.select(PAIRS, 1, "amount >= %s", [31], "amount DESC", 2) == [
        pair("e", 5, 50),
        pair("d", 1, 40),
    ]


#: Totals per day, in shards (one per writer), of any size.
TOTALS = Table(
    "totals",
    (Column("day"), Column("count", "bigint"), Column("volume", "numeric", nullable=True)),
    ("day",),
    summed=True,
)
BIG = 2**63 - 1


def test_numeric_columns_hold_any_integer_and_shards_add_up_exactly(store: ReadStore) -> None:
    """Each shard's total fits 64 bits, their sum does not (nor do some shards): read back
    exact, as ints, whichever way the rows were written, and checksummed like any value."""
    totals = Projection("totals", 1, (TOTALS,))
    VersionCatalog(store).register(totals)
    with store.transaction():
        store.insert_values(TOTALS.stored, 1, [("d1", 1, BIG, 0), ("d2", 1, None, 0)])
        store.upsert_values(TOTALS.stored, 1, [("d1", 2, BIG, 1), ("d3", 1, -(2**70), 0)])
        store.upsert(TOTALS.stored, 1, [{"day": "d1", "count": 4, "volume": 2**64, "shard": 2}])
        store.insert(TOTALS.stored, 1, [{"day": "d3", "count": 1, "volume": 2**70 + 5, "shard": 1}])
    expected = [
        {"day": "d1", "count": 7, "volume": 2 * BIG + 2**64},
        {"day": "d2", "count": 1, "volume": None},
        {"day": "d3", "count": 2, "volume": 5},
    ]
    assert sorted(store.all_rows(TOTALS, 1), key=lambda r: str(r["day"])) == expected
    assert store.fetch(TOTALS, 1, ("d1",)) == expected[0]
    assert store.select(TOTALS, 1, "day >= %s", ["d2"], "day") == expected[1:]
    assert all(type(row["volume"]) is int for row in expected if row["volume"] is not None)
    assert store.range_checksums(TOTALS, 1) == checksums.by_range(TOTALS, expected)
    store.replace_total(TOTALS, 1, ("d1",), {"day": "d1", "count": 1, "volume": 3 * BIG})
    assert store.fetch(TOTALS, 1, ("d1",)) == {"day": "d1", "count": 1, "volume": 3 * BIG}


NUMBERS = Table("numbers", (Column("k"), Column("n", "numeric")), ("k",))


@pytest.mark.parametrize("table", [NUMBERS, replace(NUMBERS, name="summed", summed=True)])
def test_numeric_columns_compare_and_sort_as_numbers(store: ReadStore, table: Table) -> None:
    """On SQLite too, where a value past 64 bits is kept as text: those within 64 bits are
    integers there, compared and ordered as such, alone or summed."""
    VersionCatalog(store).register(Projection(table.name, 1, (table,)))
    shard = (0,) if table.summed else ()
    with store.transaction():
        store.insert_values(table.stored, 1, [("a", 9, *shard), ("b", 10, *shard)])
        store.insert_values(table.stored, 1, [("c", 100, *shard), ("d", 2**64, *shard)])
    assert [r["n"] for r in store.select(table, 1, order="n")] == [9, 10, 100, 2**64]
    assert [r["k"] for r in store.select(table, 1, "n > %s", [50], "k")] == ["c", "d"]
    assert [r["k"] for r in store.select(table, 1, "n = %s", [10])] == ["b"]
    counted = store.count_by(table, 1, "n")
    assert counted == {9: 1, 10: 1, 100: 1, 2**64: 1}
    assert all(type(n) is int for n in counted)


def test_a_new_row_written_twice_fails_and_the_transaction_changes_nothing(
    store: ReadStore,
) -> None:
    with pytest.raises(Exception) as refused, store.transaction():  # the drivers differ
        store.insert(PAIRS, 1, [pair("a", 1, 10)])
        with store.transaction():  # joins the outer one
            store.insert_values(PAIRS, 1, [("a", 1, 99, None)])
    assert store.refused_rows(refused.value), refused.value  # the key twice, not another fault
    assert store.count(PAIRS, 1) == 0
    with store.transaction():  # the connection is usable again
        store.upsert_values(PAIRS, 1, [("a", 1, 10, None)])
    assert store.count(PAIRS, 1) == 1


def test_an_append_only_table_gets_its_key_before_its_version_serves(store: ReadStore) -> None:
    # Built without it (appends only; the index is built once, at the switch), served with it.
    catalog = VersionCatalog(store)
    catalog.register(PROBE_V2)
    with store.transaction():
        store.insert(NOTES, 2, [{"seq": 1, "text": "a"}])
    catalog.activate(PROBE_V2)
    with pytest.raises(Exception) as refused, store.transaction():  # the drivers differ
        store.insert(NOTES, 2, [{"seq": 1, "text": "again"}])
    assert store.refused_rows(refused.value)
    assert store.count(NOTES, 2) == 1


def test_a_version_whose_appended_rows_repeat_a_key_never_serves(store: ReadStore) -> None:
    catalog = VersionCatalog(store)
    catalog.register(PROBE_V2)
    with store.transaction():
        store.insert(NOTES, 2, [{"seq": 1, "text": "a"}, {"seq": 1, "text": "b"}])
    with pytest.raises(Exception) as refused:  # the drivers differ
        catalog.activate(PROBE_V2)
    assert store.refused_rows(refused.value)
    record = catalog.version("probe", 2)
    assert record is not None and record.state is VersionState.REBUILDING
    assert catalog.active_version("probe") == 1


def test_stored_checksums_are_the_reference_ones(store: ReadStore) -> None:
    rows = [pair(f"k{i}", i, i * 7, None if i % 3 else f"nöte {i}") for i in range(300)]
    with store.transaction():
        store.insert(PAIRS, 1, rows)
    reference = checksums.by_range(PAIRS, rows)
    assert store.range_checksums(PAIRS, 1) == reference
    some = set(sorted(reference)[:5])
    wanted = {PAIRS.key_of(r): r for r in rows if checksums.range_of(PAIRS.key_of(r)) in some}
    assert store.rows_in_ranges(PAIRS, 1, some) == wanted
    # One changed value changes exactly its range's checksum.
    with store.transaction():
        store.upsert(PAIRS, 1, [pair("k5", 5, 36)])
    changed = store.range_checksums(PAIRS, 1)
    assert {b for b in reference if changed[b] != reference[b]} == {checksums.range_of(("k5", 5))}


def test_a_missing_table_is_recognised(store: ReadStore) -> None:
    VersionCatalog(store).drop_tables("probe", 1)
    with pytest.raises(Exception) as missing:  # each driver raises its own class
        store.count(PAIRS, 1)
    assert store.is_missing_table(missing.value)
    with pytest.raises(Exception) as wrong:
        store.execute("SELECT no_such_column FROM daybook_read_models")
    assert not store.is_missing_table(wrong.value)


def test_head_position_is_the_logs_when_the_events_live_here(store: ReadStore, url: str) -> None:
    assert store.head_position() is None
    ledger = open_ledger(url)
    try:
        receipt = ledger.deposit(ledger.open_account("ann", "EUR").account_id, 5)
        assert store.head_position() == receipt.position == ledger.head()
    finally:
        ledger.close()


def test_writer_locks_are_exclusive_between_sessions_where_the_dialect_has_them(
    store: ReadStore, url: str
) -> None:
    other_store = open_store(url)
    mine, other = store.open_locks(), other_store.open_locks()
    free = not mine.between_processes  # without such locks, every lock is granted
    try:
        assert mine.try_take(1)
        assert other.try_take(1) is free
        assert other.try_take(1, shared=True) is free
        mine.release(1)
        assert other.try_take(1, shared=True)
        assert mine.try_take(1, shared=True)  # shared holders share
        assert mine.try_take(2) and other.try_take(2) is free
        mine.check()
        mine.close()  # closing the session lets go of what it held (once the server noticed)
        deadline = time.monotonic() + 30
        while not other.try_take(2):
            assert time.monotonic() < deadline, "closing the session did not let go"
            time.sleep(0.01)
        # A transaction's lock conflicts with the same key held by a session, until it ends.
        mine = store.open_locks()
        with other_store.transaction():
            other_store.lock_transaction(3)
            assert mine.try_take(3) is free
        assert mine.try_take(3)
    finally:
        mine.close()
        other.close()
        other_store.close()


def test_a_locking_read_is_valid_sql(store: ReadStore) -> None:
    with store.transaction():
        sql = store.locking("SELECT name FROM daybook_projection_versions WHERE name = %s")
        assert store.execute(sql, ("probe",)) == [("probe",)]


def test_the_catalog_moves_versions_only_by_legal_transitions(store: ReadStore) -> None:
    catalog, letters = VersionCatalog(store), DeadLetters(store)
    v2 = catalog.register(PROBE_V2)
    assert v2 is not None and v2.state is VersionState.REBUILDING
    assert _stored_states(store) == {1: "live", 2: "rebuilding"}

    with store.transaction():
        catalog.stop("probe", 1, "event 7 failed")
        letters.add("probe", 1, 7, "Deposited", "acc-1", "Traceback ...", 3)
    record = catalog.version("probe", 1)
    assert record is not None and record.state is VersionState.STOPPED
    assert record.error == "event 7 failed"
    with pytest.raises(IllegalTransition):
        catalog.stop("probe", 1, "again")

    assert catalog.resume("probe", 1) is VersionState.LIVE  # it serves reads
    (letter,) = letters.entries("probe")
    assert letter.position == 7 and letter.attempts == 3 and letter.resolved_at is not None
    with pytest.raises(IllegalTransition):
        catalog.resume("probe", 1)

    assert catalog.activate(PROBE_V2) == 1
    assert catalog.active_version("probe") == 2
    assert _stored_states(store) == {1: "retired", 2: "live"}
    before = catalog.versions("probe")
    for refused in (
        lambda: catalog.stop("probe", 1, "late"),
        lambda: catalog.resume("probe", 1),
        lambda: catalog.activate(PROBE),
        lambda: catalog.activate(PROBE_V2),
    ):
        with pytest.raises(IllegalTransition):
            refused()
    assert catalog.versions("probe") == before  # a refused move writes nothing
    assert catalog.active_version("probe") == 2
    with pytest.raises(LookupError):
        catalog.resume("probe", 9)
    assert catalog.drop_tables("probe", 1) == ["rm_pairs_v1", "rm_notes_v1"]


def test_repairs_are_logged_with_rows_before_and_after(store: ReadStore) -> None:
    ReconcileLog(store).record("probe", 1, 42, "pairs", ("a", 1), "different",
                               pair("a", 1, 10), pair("a", 1, 11))  # fmt: skip
    rows = store.execute(
        "SELECT name, version, position, table_name, row_key, change, before, after"
        " FROM daybook_reconcile_log"
    )
    assert rows == [
        (
            "probe", 1, 42, "pairs", '["a", 1]', "different",
            '{"amount": 10, "k": "a", "n": 1, "note": null}',
            '{"amount": 11, "k": "a", "n": 1, "note": null}',
        )
    ]  # fmt: skip


def _stored_states(store: ReadStore) -> dict[int, str]:
    """The states as stored: the same text as every earlier release wrote."""
    rows = store.execute(
        "SELECT version, state FROM daybook_projection_versions WHERE name = %s", ("probe",)
    )
    return {int(version): state for version, state in rows}


def test_connecting_does_not_wait_for_a_reader_of_the_catalog(pg_url: str) -> None:
    """Every runner and reader ensures the catalog when it connects. A transaction that has
    read the catalog (any query, for as long as it stays open) must not make that wait:
    asking to add a column that is already there would take the table's exclusive lock and
    queue behind the reader, and every later reader behind it."""
    first = open_store(pg_url)
    VersionCatalog(first).ensure()
    first.close()
    reading = psycopg.connect(pg_url, autocommit=True)
    try:
        reading.execute("BEGIN")
        reading.execute("SELECT count(*) FROM daybook_projection_versions").fetchone()
        done = threading.Event()

        def connect() -> None:
            store = open_store(pg_url)
            try:
                VersionCatalog(store).ensure()
            finally:
                store.close()
            done.set()

        threading.Thread(target=connect, daemon=True).start()
        assert done.wait(60), "connecting waited for the reader of the catalog"
    finally:
        reading.close()


def test_a_table_made_with_its_primary_key_gets_no_second_one(url: str) -> None:
    """Versions made before append-only keys were deferred have a primary key: serving
    them (or repairing them) adds no second unique index, which every append would pay."""
    store = open_store(url)
    name = NOTES.physical_name(7)
    if url.startswith("postgresql"):
        indexes = "SELECT indexname FROM pg_indexes WHERE tablename = %s"
    else:
        indexes = "SELECT name FROM pragma_index_list(%s)"
    try:
        with store.transaction():
            store.execute(
                f"CREATE TABLE {name} (seq BIGINT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (seq))"
            )
        assert store.has_unique_key(name)
        before = store.execute(indexes, (name,))
        with store.transaction():
            store.create_keys(Projection("probe", 7, (NOTES,)))
        assert store.execute(indexes, (name,)) == before and len(before) == 1
    finally:
        with store.transaction():
            store.drop_table(name)
        store.close()


def test_two_writers_switching_one_version_at_once_build_its_key_once(pg_url: str) -> None:
    """Workers of one stream group may reach the switch of a version together. Both find
    its append-only table without a key and build one; PostgreSQL lets both build, then
    fails the second at COMMIT with a unique violation in its own catalog (pg_class), which
    the worker would take for appended rows that repeat a key: it would stop the version
    the first one had just made serve. The second must find the key built and the version
    switched instead."""
    setup = open_store(pg_url)
    catalog = VersionCatalog(setup)
    catalog.ensure()
    catalog.register(PROBE)
    notes = NOTES.physical_name(1)
    with setup.transaction():
        setup.execute(f"INSERT INTO {notes} SELECT g, 'note' FROM generate_series(1, 200000) AS g")
    # A writer of the table holds both switches at the index build until both wait there
    # (or, once serialised, one at the index and one before it): then both go at once.
    blocker = psycopg.connect(pg_url)
    blocker.execute(f"LOCK TABLE {notes} IN ROW EXCLUSIVE MODE")
    outcomes: list[str] = []

    def switch() -> None:
        store = open_store(pg_url)
        try:
            VersionCatalog(store).activate(PROBE)
            outcomes.append("switched")
        except IllegalTransition:
            outcomes.append("already switched")
        except Exception as error:
            outcomes.append(f"{type(error).__name__}: {error}".splitlines()[0])
        finally:
            store.close()

    threads = [threading.Thread(target=switch) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for_lock_waits(pg_url, 2, "the two switches")
    finally:
        blocker.rollback()
        blocker.close()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["already switched", "switched"]
    assert catalog.version("probe", 1).state is VersionState.LIVE  # type: ignore[union-attr]
    assert setup.has_unique_key(notes)
    setup.close()


def test_a_switch_holding_its_catalog_row_and_a_writer_connecting_never_deadlock(
    pg_url: str,
) -> None:
    """The runner's switch holds its version's catalog row when the key is built; a runner
    or worker connecting meanwhile registers its versions, which takes the DDL lock and then
    that row. Building the key must not wait for the DDL lock: each would wait for the
    other, until PostgreSQL broke one of them off."""
    setup = open_store(pg_url)
    VersionCatalog(setup).ensure()
    VersionCatalog(setup).register(PROBE)
    outcomes: dict[str, str] = {}
    row_held, go = threading.Event(), threading.Event()

    def run(name: str, body: Callable[[ReadStore], object]) -> None:
        store = open_store(pg_url)
        try:
            body(store)
            outcomes[name] = "done"
        except Exception as error:
            outcomes[name] = f"{type(error).__name__}: {error}".splitlines()[0]
        finally:
            store.close()

    def switch(store: ReadStore) -> None:
        with store.transaction():
            VersionCatalog(store).version("probe", 1, lock=True)  # as the runner's switch
            row_held.set()
            go.wait(30)
            VersionCatalog(store).activate(PROBE)

    def connect(store: ReadStore) -> None:
        row_held.wait(30)
        VersionCatalog(store).register(PROBE)  # waits for the row, holding the DDL lock

    threads = [
        threading.Thread(target=run, args=("switch", switch)),
        threading.Thread(target=run, args=("connect", connect)),
    ]
    for thread in threads:
        thread.start()
    wait_for_lock_waits(pg_url, 1, "the connecting writer")
    go.set()
    for thread in threads:
        thread.join(60)
    setup.close()
    assert outcomes == {"switch": "done", "connect": "done"}


def test_connections_opening_a_new_sqlite_file_together_all_open(tmp_path: Path) -> None:
    """A process's services open the read-model database at once as it starts. SQLite
    answers "database is locked" at once, not after its busy timeout, to a connection
    switching a new file to WAL while another does: every one of them opens all the same."""

    def connect(attempt: int) -> None:
        open_store(f"sqlite:///{tmp_path}/new-{attempt}.db").close()

    assert failures_together(connect, rounds=200, threads=4) == []
