"""``daybook demo``: a burst of real work on the embedded default, then a readable summary."""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import Counter
from typing import Any
from uuid import UUID

from daybook.domain.errors import DomainError
from daybook.domain.ids import new_uuid
from daybook.domain.sagas import Saga, SagaState
from daybook.infrastructure.bootstrap import open_ledger, run_projections, saga_processor
from daybook.infrastructure.cli import checked_settings, command, whole_number
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.ledger.facade import Ledger
from daybook.infrastructure.ledger.group_commit import LedgerClosed
from daybook.infrastructure.preflight import where
from daybook.infrastructure.sagas import place_order
from daybook.infrastructure.urls import DEFAULT_URL
from daybook.projections import SAGA_LIST


def register(subparsers: Any) -> None:
    parser = command(
        subparsers,
        "demo",
        help="run a burst of concurrent transfers and reservations and print a summary",
        description=(
            "Opens a handful of accounts and products, then drives concurrent transfers, "
            "withdrawals and stock reservations from several threads, including deliberately "
            "invalid and duplicate requests, and prints balances, stock, refusals by error "
            "code and replayed duplicates. Money and stock are checked to be conserved. It "
            "runs on --url, else on the embedded default, with its read models in that "
            "database: $DAYBOOK_URL and $DAYBOOK_READMODELS_URL, which may name a ledger in "
            "use, are ignored (a line on stderr says so)."
        ),
        examples=[
            "daybook demo",
            "daybook demo --url memory:// --clients 16 --commands 500",
            "daybook demo --url sqlite:///demo.db --seed 42 --orders 0",
        ],
    )
    parser.add_argument(
        "--url", help=f"event store URL (default: {DEFAULT_URL}; $DAYBOOK_URL is ignored)"
    )
    parser.add_argument("--clients", type=whole_number(1), default=8, help="concurrent clients")
    parser.add_argument("--commands", type=whole_number(1), default=200, help="commands per client")
    parser.add_argument("--seed", type=int, default=7, help="random seed")
    parser.add_argument(
        "--orders", type=whole_number(0), default=40, help="orders through the order saga"
    )
    parser.set_defaults(handler=run)


OWNERS = ["alice", "bob", "carol", "dave", "erin", "frank"]
SKUS = {"SKU-KETTLE": 400, "SKU-TEAPOT": 250, "SKU-MUG": 1200}


def run(args: argparse.Namespace) -> int:
    # The demo makes up accounts, money and stock: only a ledger named on its own command
    # line gets them. $DAYBOOK_URL is exported for the other commands, and may name a
    # ledger in use (and $DAYBOOK_READMODELS_URL its read models), so both are ignored.
    url = args.url or DEFAULT_URL
    settings = checked_settings(
        argparse.Namespace(**{**vars(args), "url": url}),
        kinds=("memory", "sqlite", "postgresql"),
        existing=False,
        # Ignored, as said: not even read (a value no command can use would stop the demo).
        env={k: v for k, v in os.environ.items() if k != "DAYBOOK_READMODELS_URL"},
    )
    ignored = []
    if args.url is None and os.environ.get("DAYBOOK_URL"):
        ignored.append("$DAYBOOK_URL")
    if os.environ.get("DAYBOOK_READMODELS_URL"):
        ignored.append("$DAYBOOK_READMODELS_URL")
    if ignored:
        choose = "" if args.url else " (give --url to choose)"
        print(
            f"daybook demo: ignoring {' and '.join(ignored)}; running on {where(url)}{choose}",
            file=sys.stderr,
        )
    ledger = open_ledger(settings=settings.model_copy(update={"readmodels_url": None}))
    try:
        return _demo(ledger, args)
    finally:
        ledger.close()


def _demo(ledger: Ledger, args: argparse.Namespace) -> int:
    run_id = f"demo-{int(time.time() * 1000)}"
    print(f"daybook demo on {where(ledger.settings.url)} (run {run_id})")
    # The demo chooses its account ids (a caller may; otherwise the receipt names them).
    accounts = {owner: new_uuid() for owner in OWNERS}
    for owner, account_id in accounts.items():
        limit = 500 if owner == "frank" else 0
        ledger.open_account(owner, "EUR", overdraft_limit=limit, account_id=account_id)
    for index, account in enumerate(accounts.values()):
        ledger.deposit(account, 10_000 * (index + 1), request_id=f"{run_id}-seed-{index}")
    for sku, quantity in SKUS.items():
        ledger.receive_stock(sku, quantity, request_id=f"{run_id}-stock-{sku}")
    money_before = sum(ledger.account(a).balance for a in accounts.values())

    refusals: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    lock = threading.Lock()
    ids = list(accounts.values())

    interrupted = threading.Event()

    def client(number: int) -> None:
        rnd = random.Random(args.seed * 1000 + number)
        sent: list[tuple[str, UUID, UUID, int]] = []
        for step in range(args.commands):
            if interrupted.is_set():
                return
            roll = rnd.random()
            try:
                if roll < 0.45:
                    source, destination = rnd.sample(ids, 2)
                    amount = rnd.randint(1, 8_000)
                    request_id = f"{run_id}-{number}-{step}"
                    ledger.transfer(source, destination, amount, request_id=request_id)
                    sent.append((request_id, source, destination, amount))
                    outcome = "transfers"
                elif roll < 0.55 and sent:
                    # A client retrying a request it already sent: replayed, not re-applied.
                    request_id, source, destination, amount = rnd.choice(sent)
                    receipt = ledger.transfer(source, destination, amount, request_id=request_id)
                    outcome = "replayed duplicates" if receipt.replayed else "transfers"
                elif roll < 0.75:
                    sku = rnd.choice(list(SKUS))
                    receipt = ledger.reserve_stock(sku, rnd.randint(1, 6))
                    assert receipt.reservation_id is not None
                    if rnd.random() < 0.7:
                        ledger.commit_reservation(sku, receipt.reservation_id)
                        outcome = "reservations shipped"
                    else:
                        ledger.release_reservation(sku, receipt.reservation_id)
                        outcome = "reservations released"
                elif roll < 0.85:
                    amount = rnd.randint(1, 3_000)
                    ledger.withdraw(rnd.choice(ids), amount)
                    outcome = "withdrawals"
                    with lock:
                        stats["withdrawn"] += amount
                else:
                    _invalid(ledger, rnd, ids)
                    outcome = "unexpected success"
                with lock:
                    stats[outcome] += 1
            except DomainError as error:
                with lock:
                    refusals[error.code] += 1
            except LedgerClosed:
                return

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        # Ctrl-C: let each client finish the command in hand (its answer is on its way)
        # before the ledger closes, then stop with one line (the command line says it).
        interrupted.set()
        for thread in threads:
            thread.join()
        raise
    elapsed = time.perf_counter() - started
    total = args.clients * args.commands

    print(
        f"\n{total} requests from {args.clients} clients in {elapsed:.2f} s "
        f"({total / elapsed:,.0f} requests/s), log head at position {ledger.head()}"
    )
    print("\nBalances (EUR, minor units)")
    for owner, account in accounts.items():
        view = ledger.account(account)
        print(f"  {owner:<8} balance {view.balance:>9,}  available {view.available:>9,}")
    print("\nStock")
    for sku in SKUS:
        stock = ledger.inventory(sku)
        print(
            f"  {sku:<11} on hand {stock.on_hand:>4}  reserved {stock.reserved:>3}  "
            f"available {stock.available:>4}"
        )
    print("\nAccepted")
    for name, count in sorted(stats.items()):
        if name == "withdrawn":
            continue
        print(f"  {name:<24} {count:>6}")
    print("\nRefused, by error code")
    for code, count in sorted(refusals.items()):
        print(f"  {code:<24} {count:>6}")

    withdrawn = stats["withdrawn"]
    money_after = sum(ledger.account(a).balance for a in accounts.values())
    conserved = money_after == money_before - withdrawn
    print(
        f"\nMoney conserved (transfers move it, only withdrawals remove it): "
        f"{'yes' if conserved else 'NO'}"
    )
    overdrawn = [o for o, a in accounts.items() if ledger.account(a).available < 0]
    print(f"Every balance within its overdraft limit: {'yes' if not overdrawn else 'NO'}")
    orders_ok = _orders(ledger, args, run_id) if args.orders > 0 else True
    ok = conserved and not overdrawn and not stats["unexpected success"] and orders_ok
    return 0 if ok else 1


ORDER_STOCK = {"SKU-LAMP": 120, "SKU-DESK": 70}


def _orders(ledger: Ledger, args: argparse.Namespace, run_id: str) -> bool:
    """The order workflow (``place_order``): sagas driven by the saga processor against a
    fake payment gateway on a loopback port that declines a fifth of the charges and loses
    some replies; prints how the orders ended and checks money, stock and charges."""
    print(
        f"\nOrders: {args.orders} through the order saga (fake gateway: 20% declined, "
        "5% replies lost, 5% requests dropped)"
    )
    rnd = random.Random(args.seed)
    customer = ledger.open_account("customer", "EUR").account_id
    merchant = ledger.open_account("merchant", "EUR").account_id
    assert customer is not None and merchant is not None
    ledger.deposit(customer, 1_000_000, request_id=f"{run_id}-orders-funds")
    skus = {f"{sku}-{run_id}": quantity for sku, quantity in ORDER_STOCK.items()}
    for sku, quantity in skus.items():
        ledger.receive_stock(sku, quantity)
    knobs = Knobs(decline_rate=0.2, lost_reply_rate=0.05, drop_rate=0.05, seed=args.seed)
    started = time.perf_counter()
    with (
        FakeGatewayServer(knobs) as server,
        run_projections(ledger, projections=[SAGA_LIST], poll_interval=0.01) as runner,
    ):
        gateway = HttpPaymentGateway(server.url)
        processor = saga_processor(ledger, runner.views, gateway, poll=0.01)
        processor.start()
        sagas = []
        for number in range(args.orders):
            lines = [(sku, rnd.randint(1, 3), rnd.randint(500, 5_000)) for sku in skus]
            receipt = place_order(ledger, f"{run_id}-order-{number}", customer, merchant, lines)
            assert receipt.saga_id is not None
            sagas.append(receipt.saga_id)
        for _ in range(6000):
            ended = [ledger.read(Saga, s) for s in sagas]
            if all(s.state.finished or s.state is SagaState.NEEDS_ATTENTION for s in ended):
                break
            time.sleep(0.01)
        processor.stop()
        gateway.close()
        charged = dict(server.gateway.charged)
    elapsed = time.perf_counter() - started
    states = Counter(s.state.value for s in ended)
    causes = Counter(
        (s.last_error or "").split(":")[0] for s in ended if s.state is SagaState.COMPENSATED
    )
    print(
        f"  ended in {elapsed:.2f} s: " + ", ".join(f"{n} {k}" for k, n in sorted(states.items()))
    )
    for cause, count in sorted(causes.items()):
        print(f"    compensated because of {cause:<20} {count:>4}")
    completed = [s for s in ended if s.state is SagaState.COMPLETED]
    paid = sum(int(s.data["total"]) for s in completed)
    money = (
        ledger.account(merchant).balance == paid
        and ledger.account(customer).balance == 1_000_000 - paid
        and ledger.account(customer).held == 0
    )
    shipped: Counter[str] = Counter()
    for saga in completed:
        for line in saga.data["lines"]:
            shipped[line["sku"]] += line["quantity"]
    stock = all(
        ledger.inventory(sku).on_hand == quantity - shipped[sku]
        and not ledger.inventory(sku).reservations
        for sku, quantity in skus.items()
    )
    once = all(count == 1 for count in charged.values())
    print(
        f"  merchant paid {paid:,} for {len(completed)} completed orders; "
        f"money conserved and nothing left held: {'yes' if money else 'NO'}"
    )
    print(
        f"  stock shipped for completed orders only, nothing left reserved: "
        f"{'yes' if stock else 'NO'}"
    )
    print(f"  no charge made twice ({len(charged)} charged keys): {'yes' if once else 'NO'}")
    return money and stock and once and set(states) <= {"completed", "compensated"}


def _invalid(ledger: Ledger, rnd: random.Random, ids: list[UUID]) -> None:
    """One deliberately bad request; each must be refused with its own code."""
    choice = rnd.randrange(6)
    if choice == 0:
        ledger.transfer(ids[0], ids[1], 10**12)  # insufficient_funds
    elif choice == 1:
        ledger.deposit(ids[0], 12.5)  # type: ignore[arg-type]  # invalid_amount (no floats)
    elif choice == 2:
        ledger.reserve_stock("SKU-KETTLE", 10_000)  # out_of_stock
    elif choice == 3:
        ledger.reserve_stock("SKU-UNKNOWN", 1)  # sku_not_found
    elif choice == 4:
        ledger.open_account("mallory", "EURO")  # invalid_currency
    else:
        ledger.withdraw(ids[0], 0)  # invalid_amount
