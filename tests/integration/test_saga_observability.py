"""Holds, sagas and the circuit breaker seen from outside: gauges and counters after known
work, and saga steps continuing the trace of the order that started them (SQLite, the
fake gateway over real HTTP, an injected clock)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from daybook import Ledger, open_ledger, open_read_models, run_projections
from daybook.domain.orders import PlaceOrder
from daybook.domain.sagas import CancelSaga, Saga, SagaState, Wait
from daybook.infrastructure.expiry import ExpirySweeper
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.readmodels.postgres import PostgresStore
from daybook.infrastructure.readmodels.queries import ReadModels
from daybook.infrastructure.sagas.breaker import CircuitBreaker
from daybook.infrastructure.sagas.processor import SagaProcessor
from daybook.projections import OPEN_HOLDS_PROJECTION, SAGA_LIST
from tests.contract.test_write_observability import delta, scrape


class Clock:
    """Real time plus an offset the test moves: the wall clock and, for what the processor
    times within itself (its breaker's cooldown), the monotonic one."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset.total_seconds()

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


class Shop:
    def __init__(self, url: str) -> None:
        self.clock = Clock()
        self.ledger: Ledger = open_ledger(url, clock=self.clock)
        self.server = FakeGatewayServer(Knobs(seed=5)).start()
        self.views: ReadModels = open_read_models(url)
        gateway = HttpPaymentGateway(self.server.url, timeout=2.0)
        self.processor = SagaProcessor(
            self.ledger, self.views, {"payments": gateway}, monotonic=self.clock.monotonic, seed=1
        )
        customer = self.ledger.open_account("customer", "EUR").account_id
        merchant = self.ledger.open_account("merchant", "EUR").account_id
        assert customer is not None and merchant is not None
        self.customer, self.merchant = customer, merchant
        self.ledger.deposit(customer, 100_000)
        self.ledger.receive_stock("KETTLE", 10)

    def order(self, order_id: str, **options: int) -> UUID:
        command = PlaceOrder(
            order_id, self.customer, self.merchant, [("KETTLE", 1, 3_000)], **options
        )
        saga_id = self.ledger.execute(command).saga_id
        assert saga_id is not None
        return saga_id

    def run(self, saga_id: UUID) -> Saga:
        """Drive the saga; whenever it waits, move time to when it wakes."""
        for _ in range(50):
            saga = self.processor.drive(saga_id)
            if saga.state not in (SagaState.RUNNING, SagaState.COMPENSATING):
                return saga
            now = self.clock()
            move = saga.next_move(now)
            if isinstance(move, Wait) and move.until is not None:
                wait = (move.until - now).total_seconds()
            else:  # it waits for the breaker to let a call through
                wait = self.processor.breakers["payments"].reopens_in() or 0.0
            self.clock.advance(wait + 0.001)
        raise AssertionError(f"saga {saga_id} did not end")

    def close(self) -> None:
        self.processor.stop()
        self.views.close()
        self.server.stop()
        self.ledger.close()


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    shop = Shop(f"sqlite:///{tmp_path / 'shop.db'}")
    yield shop
    shop.close()


def test_deadlines_and_compensations_are_counted_once(shop: Shop) -> None:
    shop.server.gateway.knobs.unavailable_rate = 1.0
    shop.processor.breakers["payments"].cooldown = timedelta(seconds=60)
    before = scrape()
    saga_id = shop.order("o-1", payment_deadline=30)
    assert shop.run(saga_id).state is SagaState.COMPENSATED
    # the deadline fired once; the two steps that completed were compensated, once each,
    # and the charge that never landed was refunded by its key (a compensation too)
    assert delta(before, "daybook_saga_deadlines_fired_total") == 1
    compensations = "daybook_saga_compensations_total"
    assert delta(before, compensations, step="reserve-0") == 1
    assert delta(before, compensations, step="hold") == 1
    assert delta(before, compensations, step="charge") == 1
    # driving it again (a second delivery) counts nothing more
    shop.processor.drive(saga_id)
    assert delta(before, "daybook_saga_deadlines_fired_total") == 1


def test_the_breaker_gauge_follows_its_state() -> None:
    now = [1_000.0]
    breaker = CircuitBreaker("gauge-test", lambda: now[0], threshold=2, cooldown=5)

    def state() -> float:
        return scrape()[
            ("daybook_circuit_breaker_state", frozenset({("dependency", "gauge-test")}))
        ]

    assert state() == 0  # closed
    breaker.failed()
    assert state() == 0
    breaker.failed()
    assert state() == 2  # open
    assert not breaker.allow()
    now[0] += 5
    assert breaker.allow()
    assert state() == 1  # half-open: one trial
    breaker.succeeded()
    assert state() == 0


def test_sagas_by_state_and_holds_open_after_known_work(shop: Shop) -> None:
    completed = shop.order("o-ok")
    assert shop.run(completed).state is SagaState.COMPLETED
    shop.server.gateway.knobs.decline_rate = 1.0
    declined = shop.order("o-declined")
    assert shop.run(declined).state is SagaState.COMPENSATED
    shop.server.gateway.knobs.decline_rate = 0.0
    running = shop.order("o-waiting")  # placed, not driven

    a = shop.customer
    holds = [shop.ledger.hold(a, 100, timeout=timeout).hold_id for timeout in (10, 60, 60)]
    assert all(holds)
    before = scrape()
    with run_projections(shop.ledger) as runner:
        head = shop.ledger.head()
        for projection in (SAGA_LIST, OPEN_HOLDS_PROJECTION):
            runner.views.rows(projection, projection.tables[0].name, min_position=head, limit=1)
        shop.processor.views = runner.views
        counts = shop.processor.observe_states()
        assert counts == {
            "running": 1,
            "compensating": 0,
            "completed": 1,
            "compensated": 1,
            "needs_attention": 0,
        }
        samples = scrape()
        for state, count in counts.items():
            assert samples[("daybook_sagas", frozenset({("state", state)}))] == count

        sweeper = ExpirySweeper(shop.ledger, runner.views, clock=shop.clock)
        # the three placed here (the orders' holds were captured or voided, and the
        # waiting order has not reached its hold step)
        assert sweeper.sweep() == 0
        assert scrape()[("daybook_holds_open", frozenset())] == 3
        shop.clock.advance(11)
        assert sweeper.sweep() >= 1
        assert delta(before, "daybook_holds_expired_total") == 1
        head = shop.ledger.head()
        runner.views.rows(OPEN_HOLDS_PROJECTION, "open_holds", min_position=head, limit=1)
        sweeper.sweep()
        assert scrape()[("daybook_holds_open", frozenset())] == 2
    assert running is not None


def test_saga_steps_continue_the_orders_trace(
    shop: Shop,
    spans: InMemorySpanExporter,
) -> None:
    saga_id = shop.order("o-traced")
    assert shop.run(saga_id).state is SagaState.COMPLETED
    finished = spans.get_finished_spans()
    (placed,) = [s for s in finished if s.name == "command place_order"]
    assert placed.context is not None
    trace_id = placed.context.trace_id
    steps = [s for s in finished if s.name.startswith("saga step ")]
    assert sorted(s.name for s in steps) == [
        "saga step charge",
        "saga step fulfil",
        "saga step hold",
        "saga step reserve-0",
    ]
    for step in steps:
        assert step.context is not None and step.context.trace_id == trace_id
        assert step.parent is not None and step.parent.span_id == placed.context.span_id
    by_id = {s.context.span_id: s for s in finished if s.context is not None}

    def parent_name(span: ReadableSpan) -> str | None:
        # None too for a parent not finished when the spans were taken (still open)
        parent = None if span.parent is None else by_id.get(span.parent.span_id)
        return None if parent is None else parent.name

    (charge,) = [s for s in finished if s.name == "payments charge"]
    assert parent_name(charge) == "saga step charge"
    # a local step's command, and that command's commit, are in the step's subtree
    local = [s for s in finished if parent_name(s) == "saga step reserve-0"]
    assert [s.name for s in local] == ["command run_local_step"]
    assert local[0].context is not None
    commits = [s for s in finished if parent_name(s) == "command run_local_step"]
    commits = [s for s in commits if s.parent and s.parent.span_id == local[0].context.span_id]
    assert [s.name for s in commits] == ["daybook.commit"]
    assert commits[0].context is not None and commits[0].context.trace_id == trace_id


def test_a_saga_s_log_lines_carry_its_id(tmp_path: Path) -> None:
    """A line the processor logs about a saga (here: the store out while driving it) names
    the saga in its JSON."""
    import io
    import logging

    import orjson
    import psycopg

    from daybook.infrastructure.observability.logs import JsonFormatter

    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    views = open_read_models(f"sqlite:///{tmp_path / 'ledger.db'}")
    processor = SagaProcessor(ledger, views, {})
    saga_id = UUID(int=42)

    def store_out(saga: UUID, **options: object) -> Saga:
        raise psycopg.OperationalError("connection refused")

    processor.drive = store_out  # type: ignore[method-assign]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("daybook")
    logger.addHandler(handler)
    try:
        processor._drive_in_worker(saga_id)
    finally:
        logger.removeHandler(handler)
        processor.stop()
        views.close()
        ledger.close()
    (line,) = [orjson.loads(text) for text in stream.getvalue().splitlines()]
    assert line["saga_id"] == str(saga_id) and "retrying" in line["event"]


def _rows_scanned(url: str, sql: str, params: object) -> int:
    """Rows the scans of ``sql``'s plan read (EXPLAIN ANALYZE: counted, not timed)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params).fetchone()
    assert row is not None

    def scanned(node: dict[str, Any]) -> int:
        children = node.get("Plans", [])
        if not children:
            return int(node["Actual Rows"]) * int(node["Actual Loops"])
        return sum(scanned(child) for child in children)

    return scanned(row[0][0]["Plan"])


def test_counting_sagas_by_state_reads_a_row_per_state_not_every_saga_ever(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processor counts sagas by state once a second (``daybook_sagas``), as the
    dashboard does at every poll. Finished sagas keep their row for good, and the count
    read every one of them: work per second that grew with every order ever placed. The
    ``sagas`` read model now keeps a row per state, moved as sagas move."""
    shop = Shop(pg_url)
    try:
        sagas = [shop.order(f"o-{n}") for n in range(12)]
        for saga_id in sagas[:8]:
            shop.ledger.execute(CancelSaga(saga_id, "test", "history"))
            assert shop.processor.drive(saga_id).state is SagaState.COMPENSATED
        for saga_id in sagas[8:10]:
            assert shop.processor.drive(saga_id).state is SagaState.COMPLETED
        # sagas[10:] stay running, never driven.
        with run_projections(shop.ledger, pg_url, projections=[SAGA_LIST]) as runner:
            runner.views.rows(SAGA_LIST, "sagas", min_position=shop.ledger.head(), limit=1)
            statements: list[tuple[str, object]] = []
            execute = PostgresStore.execute

            def recorded(store: PostgresStore, sql: str, params: Any = None) -> Any:
                statements.append((sql, params))
                return execute(store, sql, params)

            monkeypatch.setattr(PostgresStore, "execute", recorded)
            counts = shop.processor.observe_states()
            monkeypatch.undo()
        assert counts == {
            **{state.value: 0 for state in SagaState},
            "compensated": 8,
            "completed": 2,
            "running": 2,
        }
        # The reads of the sagas read model's tables (the catalog's are the same for every
        # read model, whatever its size).
        reads = [(sql, params) for sql, params in statements if "saga" in sql]
        assert reads
        scanned = max(_rows_scanned(pg_url, sql, params) for sql, params in reads)
        assert scanned <= len(SagaState), (scanned, reads)
    finally:
        shop.close()
