"""``daybook sagas list|show|cancel|retry|reconcile`` on a SQLite store, with the fake gateway."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from daybook import Receipt, open_ledger, run_projections
from daybook.domain.orders import PlaceOrder
from daybook.domain.reconciliation import RemoteRecord
from daybook.domain.sagas import Saga, SagaState
from daybook.infrastructure.cli import main
from daybook.infrastructure.eventstore import REQUESTS_TABLE
from daybook.infrastructure.gateway.fake import FakeGatewayServer
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.sagas import cli as sagas_cli
from daybook.infrastructure.sagas.processor import SagaProcessor, idempotency_key
from daybook.projections import SAGA_LIST


def test_the_sagas_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/shop.db"
    assert main(["sagas", "list", "--url", url]) == 2  # no ledger there: said, not raised
    assert "there is no database at" in capsys.readouterr().err
    open_ledger(url).close()
    assert main(["sagas", "list", "--url", url]) == 1  # nothing built: said, as balance says it
    assert "the sagas read model has not been built" in capsys.readouterr().err
    with FakeGatewayServer() as server, open_ledger(url) as ledger:
        customer = ledger.open_account("customer", "EUR").account_id
        merchant = ledger.open_account("merchant", "EUR").account_id
        assert customer is not None and merchant is not None
        ledger.deposit(customer, 10_000)
        ledger.receive_stock("KETTLE", 5)
        done = ledger.execute(PlaceOrder("o-1", customer, merchant, [("KETTLE", 1, 900)]))
        waiting = ledger.execute(PlaceOrder("o-2", customer, merchant, [("KETTLE", 1, 900)]))
        assert done.saga_id is not None and waiting.saga_id is not None
        with run_projections(ledger, projections=[SAGA_LIST]) as runner:
            gateway = HttpPaymentGateway(server.url)
            processor = SagaProcessor(ledger, runner.views, {"payments": gateway})
            assert processor.drive(done.saga_id).state is SagaState.COMPLETED
            processor.stop()
            runner.views.rows(SAGA_LIST, "sagas", min_position=ledger.head())

        assert main(["sagas", "list", "--url", url]) == 0
        out = capsys.readouterr().out
        assert str(done.saga_id) in out and "completed" in out and "o-2" in out
        assert main(["sagas", "list", "--url", url, "--state", "completed"]) == 0
        assert str(waiting.saga_id) not in capsys.readouterr().out

        code = main(
            [
                "sagas",
                "cancel",
                str(waiting.saga_id),
                "--url",
                url,
                "--by",
                "ann",
                "--reason",
                "customer called",
            ]
        )
        assert code == 0
        assert ledger.read(Saga, waiting.saga_id).state is SagaState.COMPENSATED
        assert main(["sagas", "show", str(waiting.saga_id), "--url", url]) == 0
        out = capsys.readouterr().out
        assert "Cancelled" in out and "decided by ann" in out and "customer called" in out
        # Fields as a person reads them, not Python's reprs.
        assert "datetime.datetime(" not in out and "UUID(" not in out and "<SagaState" not in out
        assert '"saga_id": "' in out or '"order_id": "' in out

        # Refused decisions say why, with their code, and change nothing.
        head = ledger.head()
        assert main(["sagas", "retry", str(done.saga_id), "--url", url, "--reason", "x"]) == 1
        assert "saga_finished" in capsys.readouterr().err
        assert ledger.head() == head

        # A charge no completed order explains: flagged, then refunded with --repair.
        stray = idempotency_key(uuid.UUID(int=1, version=4), "charge")  # of no saga here
        gateway.charge(stray, amount=500, currency="EUR", customer="c", reference="r")
        args = ["sagas", "reconcile", "--url", url, "--gateway", server.url]
        assert main(args) == 1
        assert "charge_without_order" in capsys.readouterr().out
        assert main([*args, "--repair"]) == 0
        assert "refunded" in capsys.readouterr().out
        assert server.gateway.refunds[stray] == 1
        assert server.gateway.refunds.get(idempotency_key(done.saga_id, "charge")) is None
        assert ledger.read(RemoteRecord, stray).findings == 3  # flagged, refunding, refunded
        events = list(ledger.service.events.get(RemoteRecord.id_for(stray)))
        decision = events[-1].meta.decision  # type: ignore[attr-defined]
        assert decision.by == "payment reconciler" and "charge_without_order" in decision.why
        # Completed orders are read a page at a time (one here): the paid one is found paid,
        # and once its charge is refunded, flagged.
        monkeypatch.setattr(sagas_cli, "PAGE", 1)
        assert main(args) == 0
        assert "order_without_charge" not in capsys.readouterr().out
        gateway.refund(idempotency_key(done.saga_id, "charge"))
        assert main(args) == 1
        assert f"order_without_charge         {done.saga_id}:charge" in capsys.readouterr().out


def _counted(command: str, outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "daybook_commands_total", {"command": command, "outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("decision", "command"), [("retry", "retry_saga"), ("cancel", "cancel_saga")]
)
def test_a_decision_refused_as_it_is_built_is_counted_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], decision: str, command: str
) -> None:
    """A blank --reason is refused before the ledger has the command: counted in
    daybook_commands_total by command and code, as the ledger's own refusal of the same
    decision (no such saga) is, and each once."""
    url = f"sqlite:///{tmp_path}/shop.db"
    open_ledger(url).close()
    saga = str(uuid.uuid4())
    refusals = [(command, "invalid_request"), (command, "saga_not_found")]
    before = {refusal: _counted(*refusal) for refusal in refusals}
    assert main(["sagas", decision, saga, "--url", url, "--reason", " "]) == 1
    assert "refused (invalid_request)" in capsys.readouterr().err
    assert main(["sagas", decision, saga, "--url", url, "--reason", "x"]) == 1
    assert "refused (saga_not_found)" in capsys.readouterr().err
    assert {refusal: _counted(*refusal) - before[refusal] for refusal in refusals} == {
        refusal: 1 for refusal in refusals
    }


def test_daybook_sagas_run_drives_orders_and_stops_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shop.db"
    with FakeGatewayServer() as server, open_ledger(url) as ledger:
        customer = ledger.open_account("customer", "EUR").account_id
        merchant = ledger.open_account("merchant", "EUR").account_id
        assert customer is not None and merchant is not None
        ledger.deposit(customer, 10_000)
        ledger.receive_stock("KETTLE", 5)
        expiring = ledger.hold(customer, 100, timeout=1).hold_id  # the sweeper records it
        assert expiring is not None
        command = [sys.executable, "-m", "daybook.infrastructure.cli", "sagas", "run"]
        process = subprocess.Popen(
            [*command, "--url", url, "--gateway", server.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            sagas = [
                ledger.execute(PlaceOrder(f"o-{n}", customer, merchant, [("KETTLE", 1, 900)]))
                for n in range(3)
            ]
            for _ in range(3000):
                states = {ledger.read(Saga, r.saga_id).state for r in sagas}  # type: ignore[arg-type]
                hold = ledger.hold_status(expiring)
                recorded = hold.status == "expired" and hold.recorded
                if states == {SagaState.COMPLETED} and recorded:
                    break
                assert process.poll() is None, process.communicate()
                time.sleep(0.01)
            assert states == {SagaState.COMPLETED}
            assert recorded
            assert server.gateway.charged == {
                idempotency_key(r.saga_id, "charge"): 1 for r in sagas
            }  # type: ignore[arg-type]
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "driving sagas" in out


@pytest.mark.parametrize(
    ("command", "gateway", "said"),
    [
        ("reconcile", "http://127.0.0.1:1", "the payment gateway at http://127.0.0.1:1 did not"),
        ("run", "notaurl", "the payment gateway URL 'notaurl': write http://host:port"),
        ("reconcile", "ftp://pay", "the payment gateway URL 'ftp://pay'"),
    ],
)
def test_a_gateway_that_cannot_be_used_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, gateway: str, said: str
) -> None:
    import logging

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    open_ledger(url).close()
    handlers = list(logging.root.handlers)  # `sagas run` sets up the process's logging
    try:
        assert main(["sagas", command, "--url", url, "--gateway", gateway]) == 2
    finally:
        logging.root.handlers[:] = handlers
    err = capsys.readouterr().err
    assert err.startswith(f"daybook: {said}") and "Traceback" not in err, err


def _kettle_order(url: str) -> Receipt:
    """A new ledger at ``url`` with one order placed (its saga running), and its receipt."""
    with open_ledger(url) as ledger:
        customer = ledger.open_account("customer", "EUR").account_id
        merchant = ledger.open_account("merchant", "EUR").account_id
        assert customer is not None and merchant is not None
        ledger.deposit(customer, 1_000)
        ledger.receive_stock("KETTLE", 5)
        placed = ledger.execute(PlaceOrder("o-1", customer, merchant, [("KETTLE", 1, 100)]))
        assert placed.saga_id is not None
    return placed


@pytest.mark.parametrize(
    "nameless",
    [
        KeyError("getpwuid(): uid not found: 54321"),  # what getpass raised up to Python 3.12
        OSError("No username set in the environment"),  # what it raises from 3.13
    ],
)
def test_a_decision_without_by_under_a_user_with_no_name_is_recorded_by_uid(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    nameless: Exception,
) -> None:
    """A container may run as a UID with no passwd entry and no USER or LOGNAME: the system
    user that ``--by`` defaults to has no name there, and ``sagas cancel`` died with a
    traceback. The decision is recorded by the UID instead."""

    def no_user() -> str:
        raise nameless

    url = f"sqlite:///{tmp_path}/shop.db"
    placed = _kettle_order(url)
    monkeypatch.setattr(sagas_cli.getpass, "getuser", no_user)
    args = ["sagas", "cancel", str(placed.saga_id), "--url", url, "--reason", "customer asked"]
    assert main(args) == 0, capsys.readouterr().err
    with open_ledger(url) as ledger:
        cancelled = list(ledger.service.events.get(placed.saga_id))[1]
    assert type(cancelled).__name__ == "Cancelled"
    assert cancelled.meta.decision.by == f"uid {os.getuid()}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("decision", ["cancel", "retry"])
@pytest.mark.parametrize("by", ["", " "])
def test_a_decision_by_no_one_is_a_bad_option_and_decides_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], decision: str, by: str
) -> None:
    """Only an absent ``--by`` falls back to the system user: an empty one (``--by
    "$OPERATOR"`` with the variable unset) cancelled the saga, for good, as decided by
    whoever ran the command."""
    url = f"sqlite:///{tmp_path}/shop.db"
    placed = _kettle_order(url)
    with open_ledger(url) as ledger:
        head = ledger.head()
    argv = ["sagas", decision, str(placed.saga_id), "--url", url, "--reason", "x", "--by", by]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "--by: must name who decides" in err, err
    with open_ledger(url) as ledger:
        assert ledger.head() == head
        assert ledger.read(Saga, placed.saga_id).state is SagaState.RUNNING


def test_daybook_sagas_run_exits_when_its_request_purge_has_failed(tmp_path: Path) -> None:
    # The purge runs in `sagas run`'s process too: when it stops for good (its table is
    # gone, which no retry cures), the command says so and exits 1, as for its other parts.
    path = tmp_path / "shop.db"
    url = f"sqlite:///{path}"
    open_ledger(url).close()
    with FakeGatewayServer() as server:
        command = [sys.executable, "-m", "daybook.infrastructure.cli", "sagas", "run"]
        process = subprocess.Popen(
            [*command, "--url", url, "--gateway", server.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "DAYBOOK_REQUEST_PURGE_INTERVAL": "0.05"},
        )
        try:
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                # Dropped again should the process (re)create it as it opens the ledger.
                with contextlib.suppress(sqlite3.OperationalError), sqlite3.connect(path) as db:
                    db.execute(f"DROP TABLE IF EXISTS {REQUESTS_TABLE}")
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=60)
        assert process.returncode == 1, (out, err[-3000:])
        assert "daybook-request-purge failed" in err, err[-3000:]
