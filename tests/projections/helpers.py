"""Shared helpers: a deterministic workload, comparing stored tables with a replay, and a
version's catalog record."""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Iterator, Sequence
from uuid import UUID

from daybook import Ledger
from daybook.domain.errors import DomainError
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionRecord
from daybook.infrastructure.readmodels.location import open_store
from daybook.projections.model import MemoryRows, Projection, Row, replay


def workload(
    ledger: Ledger, steps: int, seed: int = 1, accounts: Sequence[UUID] = ()
) -> list[UUID]:
    """Open a few accounts and SKUs, then run ``steps`` mixed commands (some refused)."""
    rng = random.Random(seed)
    ids = list(accounts)
    if not ids:
        ids = [
            ledger.open_account(f"owner{i}", "EUR" if i % 3 else "USD").account_id for i in range(6)
        ]
        for sku in ("SKU-1", "SKU-2"):
            ledger.receive_stock(sku, 1000)
    reservations: list[tuple[str, str]] = []
    for _ in range(steps):
        choice = rng.random()
        try:
            if choice < 0.35:
                ledger.deposit(rng.choice(ids), rng.randint(1, 500))
            elif choice < 0.5:
                ledger.withdraw(rng.choice(ids), rng.randint(1, 300))
            elif choice < 0.75:
                a, b = rng.sample(ids, 2)
                ledger.transfer(a, b, rng.randint(1, 200))
            elif choice < 0.88:
                sku = rng.choice(["SKU-1", "SKU-2"])
                receipt = ledger.reserve_stock(sku, rng.randint(1, 5))
                assert receipt.reservation_id is not None
                reservations.append((sku, receipt.reservation_id))
            elif reservations:
                sku, rid = reservations.pop(rng.randrange(len(reservations)))
                if rng.random() < 0.6:
                    ledger.commit_reservation(sku, rid)
                else:
                    ledger.release_reservation(sku, rid)
        except DomainError:
            pass
    return ids


def expected_rows(ledger: Ledger, projection: Projection, upto: int | None = None) -> MemoryRows:
    reader = event_log_of(ledger)
    events = []
    position = 0
    while True:
        batch = reader.read(position, 10_000)
        if not batch:
            break
        events.extend(e for e in batch if upto is None or e.position <= upto)
        position = batch[-1].position
    return replay(projection, events)


def stored_rows(url: str, projection: Projection) -> dict[str, list[Row]]:
    store = open_store(url)
    try:
        result = {}
        for table in projection.tables:
            rows = list(store.all_rows(table, projection.version))
            result[table.name] = sorted(rows, key=lambda r: [str(r[k]) for k in table.key])
        return result
    finally:
        store.close()


def assert_tables_match(ledger: Ledger, url: str, projection: Projection) -> None:
    """The stored tables equal a from-scratch in-memory replay of the whole log."""
    expected = expected_rows(ledger, projection)
    stored = stored_rows(url, projection)
    for table in projection.tables:
        want = sorted(
            expected.tables[table.name].values(), key=lambda r: [str(r[k]) for k in table.key]
        )
        assert stored[table.name] == want, f"{projection.name}.{table.name} differs from replay"


def switch_to_v2_without_a_column(log: EventLog, url: str) -> None:
    """Build version 2 of account_balances and switch reads to it, then drop a column of
    its table that version 1's code reads: a version the old code cannot read."""
    from daybook.infrastructure.readmodels.rebuild import rebuild
    from daybook.projections.accounts import BALANCES
    from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2

    rebuild(log, url, ACCOUNT_BALANCES_V2, progress=False)
    store = open_store(url)
    try:
        with store.transaction(write=True):
            table = BALANCES.physical_name(ACCOUNT_BALANCES_V2.version)
            store.execute(f"ALTER TABLE {table} DROP COLUMN overdraft_limit")
    finally:
        store.close()


def version_record(url: str, name: str, version: int) -> VersionRecord | None:
    """The catalog's record of ``name`` version ``version`` in the read models at ``url``."""
    store = open_store(url)
    try:
        return VersionCatalog(store).version(name, version)
    finally:
        store.close()


@contextlib.contextmanager
def ctrl_c_handled() -> Iterator[None]:
    """Ctrl-C raising KeyboardInterrupt in this process, and so acted on by the programs it
    starts meanwhile, as at a terminal: a process started with SIGINT ignored (in the
    background of a non-interactive shell, as CI may start the suite) ignores it, and so
    does every program it starts, daybook included, as every program does."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
