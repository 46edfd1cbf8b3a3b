"""Snapshots: a cache miss loads the latest snapshot and the events after it, not the whole
history. A snapshot is a validated contract with a schema version, like an event."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID

import orjson
import psycopg
import pytest

from daybook import Ledger, Receipt, Settings, open_ledger
from daybook.domain.accounts import Account, Deposit
from daybook.domain.events import LedgerAggregate
from daybook.domain.inventory import Inventory, ReservationExists
from daybook.domain.snapshots import (
    AccountSnapshot,
    InventorySnapshot,
    LedgerSnapshot,
    SnapshotMismatch,
)
from daybook.infrastructure.codec import ContractMapper, OrjsonTranscoder
from daybook.infrastructure.urls import postgres_params

INTERVAL = 50
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ledger-v0.1.db"


def counting_reads(ledger: Ledger) -> dict[str, int]:
    """Count the stored events and snapshots the ledger reads per aggregate load."""
    counts = {"events": 0, "snapshots": 0}
    service = ledger.service
    for name, store in (("events", service.events), ("snapshots", service.snapshots)):
        assert store is not None
        recorder: Any = store.recorder
        select = recorder.select_events

        def counting(*args: Any, _select: Any = select, _name: str = name, **kw: Any) -> Any:
            found = _select(*args, **kw)
            counts[_name] += len(found)
            return found

        recorder.select_events = counting
    return counts


def settings(url: str, interval: int = INTERVAL) -> Settings:
    return Settings.load(url=url, snapshot_interval=interval)


def test_a_cold_load_reads_a_snapshot_and_the_tail(shared_store_url: str) -> None:
    with open_ledger(settings=settings(shared_store_url)) as writer:
        account = writer.open_account("a", "EUR").account_id
        writer.submit([Deposit(account, 1) for _ in range(1_000)])
        writer.receive_stock("SKU-1", 500)
        for number in range(130):
            writer.reserve_stock("SKU-1", 1, reservation_id=f"r-{number}")
            if number % 3:
                writer.commit_reservation("SKU-1", f"r-{number}")
    with open_ledger(settings=settings(shared_store_url)) as reader:  # nothing cached
        reads = counting_reads(reader)
        view = reader.account(account)
        assert (view.balance, view.version) == (1_000, 1_001)
        assert reads["snapshots"] == 1
        assert reads["events"] < INTERVAL, reads
        stock = reader.inventory("SKU-1")
        assert stock.reserved == len(stock.reservations) == 130 // 3 + 1
        assert reads["snapshots"] == 2
        assert reads["events"] < 2 * INTERVAL, reads
        # and a command on the loaded state goes on from there
        assert reader.deposit(account, 1).position == reader.head()
        assert reader.account(account).balance == 1_001


def test_only_the_latest_snapshot_is_kept(store_url: str) -> None:
    with open_ledger(settings=settings(store_url)) as ledger:
        account = ledger.open_account("a", "EUR").account_id
        ledger.submit([Deposit(account, 1) for _ in range(10 * INTERVAL)])
        snapshots = ledger.service.snapshots
        assert snapshots is not None
        kept = list(snapshots.get(account))
        # taken with the batch that passed the last multiple of the interval
        assert len(kept) == 1 and 10 * INTERVAL <= kept[0].originator_version <= 10 * INTERVAL + 1


def test_no_snapshots_when_turned_off(store_url: str) -> None:
    with open_ledger(settings=settings(store_url, interval=0)) as ledger:
        account = ledger.open_account("a", "EUR").account_id
        ledger.submit([Deposit(account, 1) for _ in range(3 * INTERVAL)])
        assert ledger.service.snapshots is not None
        assert list(ledger.service.snapshots.get(account)) == []


def loaded(ledger: Ledger, kind: type[Any], key: Any) -> Any:
    """The aggregate as a cache miss builds it (snapshot and tail)."""
    cache = ledger.service.repository.cache
    assert cache is not None
    cache.get(kind.id_for(key), evict=True)
    return ledger.read(kind, key)


def state(aggregate: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if k not in ("_pending_events", "as_of")}


def test_a_snapshot_restores_exactly_the_state_it_took(store_url: str) -> None:
    with open_ledger(settings=settings(store_url, interval=3)) as ledger:
        account = ledger.open_account("a", "EUR", overdraft_limit=70).account_id
        ledger.deposit(account, 5)
        ledger.hold(account, 10, timeout=600)  # open holds and timeouts are state too
        ledger.withdraw(account, 50)
        ledger.receive_stock("SKU-1", 9)
        ledger.reserve_stock("SKU-1", 2, reservation_id="open-1", timeout=600)
        ledger.reserve_stock("SKU-1", 1, reservation_id="open-2")
        for kind, key in ((Account, account), (Inventory, "SKU-1")):
            current = ledger.read(kind, key)
            (snapshot,) = ledger.service.snapshots.get(current.id)  # type: ignore[union-attr]
            assert snapshot.originator_version >= 3
            assert state(loaded(ledger, kind, key)) == state(current)


def test_a_snapshot_refuses_state_its_contract_does_not_carry() -> None:
    """An aggregate that gained state its snapshot contract lacks would lose it on load:
    taking the snapshot fails instead, naming what is missing."""
    account = Account.open(UUID(int=1), "a", "EUR", 0)
    account.collect_events()
    AccountSnapshot.take(account)
    account.nickname = "Zo"  # type: ignore[attr-defined]
    with pytest.raises(SnapshotMismatch, match="nickname"):
        AccountSnapshot.take(account)


def test_snapshot_contracts_are_validated() -> None:
    with pytest.raises(ValueError, match="balance"):
        AccountSnapshot.model_validate(
            {
                "originator_id": UUID(int=1),
                "originator_version": 3,
                "timestamp": "2026-01-01T00:00:00+00:00",
                "created_on": "2026-01-01T00:00:00+00:00",
                "modified_on": "2026-01-01T00:00:00+00:00",
                "owner": "a",
                "currency": "EUR",
                "overdraft_limit": 0,
                "balance": "a lot",
                "status": "open",
            }
        )
    assert InventorySnapshot.class_version >= 1


class Tally(LedgerAggregate):
    """A test aggregate whose snapshot contract gained a field in version 2."""

    flat_state = True

    class Started(LedgerAggregate.Created):
        def apply(self, tally: Any) -> None:
            tally.count, tally.label = 0, "tally"

    class Counted(LedgerAggregate.Event):
        def apply(self, tally: Any) -> None:
            tally.count += 1


class TallySnapshot(LedgerSnapshot):
    of: ClassVar[type[LedgerAggregate]] = Tally
    class_version = 2

    count: int
    label: str

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        """Version 1 had no label."""
        state["label"] = "tally"


def test_an_older_snapshot_is_upcast_like_an_event() -> None:
    mapper = ContractMapper(transcoder=OrjsonTranscoder())
    tally = Tally._create(Tally.Started, id=UUID(int=5))
    tally.trigger_event(Tally.Counted)
    tally.collect_events()
    stored = mapper.to_stored_event(TallySnapshot.take(tally))
    old = orjson.loads(stored.state)
    del old["label"], old["class_version"]  # as version 1 wrote it
    restored = mapper.to_domain_event(replace(stored, state=orjson.dumps(old)))
    assert isinstance(restored, TallySnapshot)
    again = restored.mutate(None)
    assert (again.count, again.label, again.version) == (1, "tally", 2)  # type: ignore[attr-defined]


def test_a_sku_snapshot_of_version_1_is_not_read_the_sku_is_replayed(tmp_path: Path) -> None:
    """``InventorySnapshot`` version 1 was taken by code that read a ``StockReserved`` of
    version 2 stored without ``claimed`` as claimed: such a snapshot forgot that the
    reservation had no claim, which no upcast can restore. The SKU is replayed instead."""
    copy = tmp_path / "ledger-v0.1.db"
    shutil.copy(FIXTURE, copy)
    db = sqlite3.connect(copy)
    for rowid, stored in db.execute(
        "SELECT rowid, state FROM stored_events WHERE topic LIKE '%StockReserved'"
    ).fetchall():
        written = orjson.loads(stored)
        written.update(expires_at=None, class_version=2)  # no claimed: as daybook wrote it
        db.execute(
            "UPDATE stored_events SET state = ? WHERE rowid = ?", (orjson.dumps(written), rowid)
        )
    db.commit()
    db.close()
    url = f"sqlite:///{copy}"
    with open_ledger(url) as ledger:
        inventory = ledger.read(Inventory, "SKU-1")
        assert inventory.unclaimed == {"order-1", "order-2"}
        inventory.unclaimed = set()  # as that code read the history
        stored = ledger.service.mapper.to_stored_event(InventorySnapshot.take(inventory))
        old = orjson.loads(stored.state)
        old.pop("class_version", None)  # as version 1 wrote it
        snapshots = ledger.service.snapshots
        assert snapshots is not None
        snapshots.recorder.insert_events([replace(stored, state=orjson.dumps(old))])
        # It still decodes, as every contract's older versions do (a tool may read it).
        decoded = ledger.service.mapper.to_domain_event(replace(stored, state=orjson.dumps(old)))
        assert isinstance(decoded, InventorySnapshot) and decoded.unclaimed == set()
    with open_ledger(url) as ledger:  # nothing cached
        with pytest.raises(ReservationExists):
            ledger.reserve_stock("SKU-1", 1, reservation_id="order-1")
        assert ledger.read(Inventory, "SKU-1").unclaimed == {"order-1", "order-2"}


@pytest.mark.postgres
def test_two_writers_crossing_a_snapshot_boundary_at_once_meet_a_version_conflict(
    pg_url: str,
) -> None:
    """Two processes' batches take one account across a snapshot boundary from the same
    version, both in flight: the second waits for the first's snapshot row, and when the
    first commits, meets a unique violation on the snapshots table. That is a version
    conflict like any other (the account moved): the second deposit is applied again on the
    new state and succeeds, rather than answering its caller with a database error."""
    from tests.pg_locks import wait_for_lock_waits

    conninfo = postgres_params(pg_url).conninfo()
    chosen = Settings.load(url=pg_url, snapshot_interval=2, group_commit=False)
    with open_ledger(settings=chosen) as first, open_ledger(settings=chosen) as second:
        account = first.open_account("a", "EUR").account_id
        first.deposit(account, 1)
        first.deposit(account, 1)  # version 3: the next change writes a snapshot
        assert second.service.repository.cache is not None
        second.service.repository.cache.put(account, second.service.repository.get(account))
        results: dict[str, Any] = {}

        def deposit(name: str, ledger: Any) -> None:
            try:
                results[name] = ledger.deposit(account, 10)
            except Exception as error:  # what the caller would be answered
                results[name] = error

        with psycopg.connect(conninfo) as blocker:
            # Holds the events table: the first batch stops at its table lock, after
            # writing its snapshot row.
            blocker.execute("LOCK TABLE daybook_events IN SHARE MODE")
            one = threading.Thread(target=deposit, args=("first", first))
            one.start()
            wait_for_lock_waits(conninfo, 1, "the first batch")
            two = threading.Thread(target=deposit, args=("second", second))
            two.start()
            wait_for_lock_waits(conninfo, 2, "the second batch")  # on the first's snapshot
        one.join(30)
        two.join(30)
        assert isinstance(results["first"], Receipt), results
        assert isinstance(results["second"], Receipt), results
        assert first.account(account).balance == 22


@pytest.mark.parametrize(
    "damage",
    [b'{"garbage": 1}', b"\x00not json"],
    ids=["fails-its-contract", "not-json"],
)
def test_a_snapshot_that_cannot_be_read_is_skipped_and_the_aggregate_replayed(
    tmp_path: Path, damage: bytes
) -> None:
    """A snapshot is only a saving on replay: every event it was taken from is still in
    the log. One that cannot be read back (a damaged row, a contract it no longer meets)
    must not make its account unusable for good: the account is replayed from its events,
    as for a snapshot its contract no longer trusts, and its next snapshot replaces it."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(settings=settings(url, interval=5)) as ledger:
        account = ledger.open_account("a", "EUR").account_id
        ledger.submit([Deposit(account, 1) for _ in range(12)])
    db = sqlite3.connect(tmp_path / "daybook.db")
    assert db.execute("SELECT count(*) FROM stored_snapshots").fetchone() == (1,)
    db.execute("UPDATE stored_snapshots SET state = ?", (damage,))
    db.commit()
    db.close()
    with open_ledger(settings=settings(url, interval=5)) as ledger:  # nothing cached
        assert ledger.account(account).balance == 12
        assert ledger.deposit(account, 1).position == ledger.head()
        assert ledger.account(account).balance == 13
