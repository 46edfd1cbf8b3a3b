"""Many concurrent orders through a running saga processor on PostgreSQL, with declines and
lost replies: every order ends, and the reconcilers find nothing: what each saga posted
(the events tagged with its id) nets to zero unless it completed, and every gateway charge
is explained by a completed order. (The 1,000-order run is scripts/bench_sagas.py.)"""

from __future__ import annotations

import threading
import time
from uuid import UUID

import pytest

from daybook import open_ledger, place_order, run_projections
from daybook.domain.sagas import Saga, SagaState
from daybook.infrastructure.bootstrap import event_log_of, saga_processor
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.sagas.processor import Backoff
from daybook.infrastructure.sagas.reconcile import check_saga_postings, reconcile_payments
from daybook.projections import SAGA_LIST

ORDERS = 150


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_orders_all_end_and_reconcile(pg_url: str) -> None:
    knobs = Knobs(decline_rate=0.2, lost_reply_rate=0.05, seed=2)
    with FakeGatewayServer(knobs) as server, open_ledger(pg_url) as ledger:
        customers = []
        for number in range(10):
            account = ledger.open_account(f"customer-{number}", "EUR").account_id
            assert account is not None
            ledger.deposit(account, 1_000_000)
            customers.append(account)
        merchant = ledger.open_account("merchant", "EUR").account_id
        assert merchant is not None
        ledger.receive_stock("LAMP", 10_000)
        ledger.receive_stock("DESK", 150)  # some orders find it out of stock
        with run_projections(ledger, projections=[SAGA_LIST], poll_interval=0.02) as runner:
            # The processor finds its work in the sagas read model: until its first version
            # serves, the processor waits, retrying (healthy, but not yet running).
            runner.views.rows(SAGA_LIST, "sagas", limit=1, timeout=60)
            gateway = HttpPaymentGateway(server.url)
            processor = saga_processor(
                ledger, runner.views, gateway, workers=8, poll=0.02, backoff=Backoff(0.01, 0.2)
            )
            processor.start()
            sagas: list[UUID] = []
            lock = threading.Lock()

            def client(number: int) -> None:
                for n in range(number, ORDERS, 5):
                    lines = [("LAMP", 1 + n % 3, 700), ("DESK", 1 + n % 2, 2_000)]
                    receipt = place_order(ledger, f"o-{n}", customers[n % 10], merchant, lines)
                    assert receipt.saga_id is not None
                    with lock:
                        sagas.append(receipt.saga_id)

            threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for _ in range(3000):
                if all(ledger.read(Saga, s).state.finished for s in sagas):
                    break
                assert processor.health().ok, processor.health()
                time.sleep(0.02)
            processor.stop()
        states = [ledger.read(Saga, s).state for s in sagas]
        assert len(sagas) == ORDERS
        assert set(states) <= {SagaState.COMPLETED, SagaState.COMPENSATED}
        assert states.count(SagaState.COMPLETED) > 0 and states.count(SagaState.COMPENSATED) > 0
        assert check_saga_postings(ledger, event_log_of(ledger), sagas) == []
        assert all(count == 1 for count in server.gateway.charged.values())
        completed = [
            s for s, state in zip(sagas, states, strict=True) if state.value == "completed"
        ]
        report = reconcile_payments(ledger, gateway, completed=completed)
        assert report.findings == [] and report.checked > 0
        gateway.close()
