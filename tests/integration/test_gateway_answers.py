"""Every answer a payment gateway can give is one the saga processor decides about: the
HTTP adapter sorts each into ``Unavailable`` (not processed: try later), ``OutcomeUnknown``
(perhaps processed: look the key up) or ``Refused`` (not processed, and never will be as
asked: the processor stops, visibly). Before, a 429 or an answer that could not be read
raised a ``ValueError`` out of the adapter, which ended the processor (every saga stopped
moving) for what a retry cures, and any error but a ``GatewayError`` left the breaker's trial
call unanswered, so the breaker never let a call through again."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from daybook.domain.sagas import Saga, SagaState
from daybook.infrastructure.gateway import (
    Charge,
    ChargeStatus,
    GatewayError,
    OutcomeUnknown,
    Refused,
    Unavailable,
)
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.sagas.breaker import BreakerState
from daybook.infrastructure.sagas.processor import Backoff
from tests.integration.test_sagas import Shop, shop  # noqa: F401  (a fixture)
from tests.stack import collector_short_of_stack


@dataclass
class Answer:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class _Answering(BaseHTTPRequestHandler):
    """Answers every request with the server's ``answer``."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        answer: Answer = self.server.answer  # type: ignore[attr-defined]
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[tuple[HttpPaymentGateway, ThreadingHTTPServer]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answering)
    server.answer = Answer(429, b'{"error": "too many requests"}')  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    gateway = HttpPaymentGateway(f"http://127.0.0.1:{server.server_address[1]}")
    yield gateway, server
    gateway.close()
    server.shutdown()
    server.server_close()


class _Patient(Backoff):
    """A retry a minute later, so a test's first ``drive`` stops at the retry it
    recorded, however slow the machine: the shop's clock is the real one, and the default
    backoff's first wait (a few milliseconds) may pass before ``drive`` looks again."""

    def delay(self, attempt: int, draw: Callable[[float, float], float]) -> float:
        return 60.0


_CHARGE = {"amount": 100, "currency": "EUR", "customer": "c", "reference": "r"}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, b'{"error": "slow down"}', Unavailable),
        (408, b"", Unavailable),
        (409, b'{"error": "a request with this key is in progress"}', Unavailable),
        (503, b"", Unavailable),
        (400, b'{"error": "bad currency"}', Refused),
        (401, b'{"error": "bad credentials"}', Refused),
        (422, b"{}", Refused),
        (500, b"oops", OutcomeUnknown),
        (302, b"", OutcomeUnknown),
        (200, b"<html>maintenance</html>", OutcomeUnknown),
        (200, b'{"key": "k", "status": "pending", "amount": 1, "currency": "EUR"}', OutcomeUnknown),
        (200, b'{"key": "k"}', OutcomeUnknown),
        (200, b"[1, 2]", OutcomeUnknown),
        # An amount no integer can be (JSON's 1e999 reads as infinity), a body nested
        # deeper than the JSON reader goes, and a body that says it is compressed and is
        # not (a proxy's, or cut short): an answer that cannot be read, not a bug.
        (
            200,
            b'{"key": "k", "status": "succeeded", "amount": 1e999, "currency": "EUR"}',
            OutcomeUnknown,
        ),
        (200, b"[" * 100_000 + b"]" * 100_000, OutcomeUnknown),
        (200, b"gzip:this is not gzip", OutcomeUnknown),
    ],
)
def test_every_answer_is_sorted_into_what_is_known_about_the_request(
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],
    status: int,
    body: bytes,
    expected: type[GatewayError],
) -> None:
    gateway, server = answering
    headers: tuple[tuple[str, str], ...] = ()
    if body.startswith(b"gzip:"):
        body, headers = body.removeprefix(b"gzip:"), (("Content-Encoding", "gzip"),)
    server.answer = Answer(status, body, headers)  # type: ignore[attr-defined]
    calls = {
        "charge": lambda: gateway.charge("k", **_CHARGE),  # type: ignore[arg-type]
        "lookup": lambda: gateway.lookup("k"),
        "refund": lambda: gateway.refund("k"),
        "charges": lambda: gateway.charges(),
    }
    for name, call in calls.items():
        with pytest.raises(GatewayError) as raised:
            call()
        assert type(raised.value) is expected, (name, raised.value)
        assert str(status) in str(raised.value) or status == 200, (name, raised.value)


def test_an_answer_nested_too_deep_is_read_without_using_up_the_stack(
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],
) -> None:
    """An answer nested 100,000 deep was read by a JSON reader that went down with it, to
    the interpreter's recursion limit: whatever Python code the collector ran meanwhile
    (a finalizer, another test's garbage) found no stack left, and failed ("Exception
    ignored", a full run failing now and then)."""
    gateway, server = answering
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, b"[1e999, " + deep + b"]"):  # orjson refuses 1e999 before the depth
        server.answer = Answer(200, body)  # type: ignore[attr-defined]
        with collector_short_of_stack() as short, pytest.raises(OutcomeUnknown):
            gateway.lookup("k")
        assert not short


_GOOD = b'{"key": "b", "status": "succeeded", "amount": 5, "currency": "EUR"}'


def test_answers_the_standard_library_reads_are_read(
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],
) -> None:
    """A gateway may answer with a byte order mark, in UTF-16, or with an amount past 64
    bits: read as JSON's reader reads them (orjson, tried for its depth limit, refused the
    first two, and rounded the third through a float)."""
    gateway, server = answering
    exact = _GOOD.replace(b": 5,", b": 18446744073709551617,")
    for body, amount in (
        (b"\xef\xbb\xbf" + _GOOD, 5),
        (_GOOD.decode().encode("utf-16"), 5),
        (exact, 2**64 + 1),
    ):
        server.answer = Answer(200, body)  # type: ignore[attr-defined]
        charge = gateway.lookup("b")
        assert charge is not None and charge.amount == amount, (body[:12], charge)


def test_a_listed_charge_with_a_nan_amount_is_other(
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],
) -> None:
    gateway, server = answering
    bad = b'{"key": "a", "status": "succeeded", "amount": NaN, "currency": "EUR"}'
    server.answer = Answer(200, b'{"charges": [' + bad + b", " + _GOOD + b"]}")  # type: ignore[attr-defined]
    first, second = gateway.charges()
    assert (first.status, second.status, second.amount) == (
        ChargeStatus.OTHER, ChargeStatus.SUCCEEDED, 5
    )  # fmt: skip


def test_a_listed_charge_with_an_amount_no_integer_can_be_is_other(
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],
) -> None:
    """One unreadable charge does not make the rest of a listing unreadable."""
    gateway, server = answering
    listing = (
        b'{"charges": [{"key": "a", "status": "succeeded", "amount": 1e999, "currency": "EUR"},'
        b' {"key": "b", "status": "succeeded", "amount": 5, "currency": "EUR"}]}'
    )
    deep = b'{"key": "c", "status": "succeeded", "amount": ' + b"[" * 300 + b"]" * 300 + b"}"
    listing = listing.replace(b"]}", b", " + deep + b"]}")
    server.answer = Answer(200, listing)  # type: ignore[attr-defined]
    first, second, third = gateway.charges()
    assert (third.key, third.status) == ("c", ChargeStatus.OTHER)
    assert "nested too deep" in (third.detail or ""), third.detail
    assert (first.key, first.status) == ("a", ChargeStatus.OTHER)
    assert (second.key, second.status, second.amount) == ("b", ChargeStatus.SUCCEEDED, 5)


def test_a_rate_limited_gateway_is_retried_and_the_saga_compensates_in_the_end(
    shop: Shop,  # noqa: F811
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],
) -> None:
    gateway, _ = answering  # answers 429 to everything...
    gateway.refund = shop.processor.ports["payments"].refund  # type: ignore[method-assign]
    shop.processor.ports["payments"] = gateway  # ...but refunds, which the real one answers
    shop.processor.backoff = _Patient()
    saga_id = shop.order("o-429", [("KETTLE", 1, 100)])
    saga = shop.processor.drive(saga_id)  # raised ValueError before
    assert saga.state is SagaState.RUNNING and saga.attempts == 1, saga.view()
    assert "429" in (saga.last_error or "")
    saga = shop.run(saga_id, rounds=200)
    assert saga.state is SagaState.COMPENSATED, saga.view()
    assert shop.ledger.inventory("KETTLE").available == 10


def test_a_refusal_stops_the_processor_visibly_and_leaves_the_breaker_answered(
    shop: Shop,  # noqa: F811
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],
) -> None:
    """A 4xx other than those that say "try later" is the gateway refusing this
    processor's requests (credentials, a wrong URL): nothing is guessed, the processor
    stops (``test_a_failure_no_retry_can_cure_stops_the_processor_visibly``), and the
    breaker, whose trial call it was, lets the next call through once things are fixed."""
    gateway, server = answering
    server.answer = Answer(401, b'{"error": "bad credentials"}')  # type: ignore[attr-defined]
    shop.processor.ports["payments"] = gateway
    breaker = shop.processor.breakers["payments"]
    for _ in range(breaker.threshold):
        breaker.failed()  # an outage opened it...
    shop.clock.advance(breaker.cooldown.total_seconds() + 0.001)  # ...and one trial call may now go
    saga_id = shop.order("o-401", [("KETTLE", 1, 100)])
    with pytest.raises(Refused, match="401"):
        shop.processor.drive(saga_id)
    assert shop.ledger.read(Saga, saga_id).state is SagaState.RUNNING  # nothing guessed
    assert breaker.state is BreakerState.CLOSED and breaker.allow()


def test_a_port_that_raises_something_else_still_answers_the_breakers_trial(
    shop: Shop,  # noqa: F811
) -> None:
    port = shop.processor.ports["payments"]
    real_charge = port.charge
    failures = [RuntimeError("the provider's SDK broke")]

    def broken(key: str, **request: object) -> Charge:
        if failures:
            raise failures.pop()
        return real_charge(key, **request)  # type: ignore[arg-type]

    port.charge = broken  # type: ignore[method-assign]
    breaker = shop.processor.breakers["payments"]
    for _ in range(breaker.threshold):
        breaker.failed()
    shop.clock.advance(breaker.cooldown.total_seconds() + 0.001)
    saga_id = shop.order("o-bug", [("KETTLE", 1, 100)])
    with pytest.raises(RuntimeError):
        shop.processor.drive(saga_id)
    # The trial failed: open again, and a later trial (the port fixed) goes through.
    assert breaker.state is BreakerState.OPEN
    shop.clock.advance(breaker.cooldown.total_seconds() + 0.001)
    assert shop.run(saga_id).state is SagaState.COMPLETED
    assert breaker.state is BreakerState.CLOSED
    assert shop.charged() == {f"{saga_id}:charge": 1}


def test_a_refused_lookup_after_an_unknown_outcome_stops_the_processor_too(
    shop: Shop,  # noqa: F811
) -> None:
    """The charge's outcome is unknown (a read timeout), and the look-up that follows is
    refused (401): as for a refused charge, the processor stops and nothing is guessed (it
    was taken for a failed look-up: an attempt spent, and the last one failed the order
    for the processor's own credentials)."""
    port = shop.processor.ports["payments"]

    def unknown(key: str, **request: object) -> Charge:
        raise OutcomeUnknown("POST /charges: ReadTimeout")

    def refused(key: str) -> Charge | None:
        raise Refused("the gateway refused the request (401): bad credentials")

    port.charge = unknown  # type: ignore[method-assign]
    port.lookup = refused  # type: ignore[method-assign]
    saga_id = shop.order("o-refused-lookup", [("KETTLE", 1, 100)])
    with pytest.raises(Refused):
        shop.processor.drive(saga_id)
    saga = shop.ledger.read(Saga, saga_id)
    assert saga.state is SagaState.RUNNING and saga.attempts == 0, saga.view()


def test_a_charge_in_a_state_the_processor_cannot_judge_is_asked_again_not_declined(
    shop: Shop,  # noqa: F811
) -> None:
    """A port of the deployment's own may answer a status a listing gives (``OTHER``):
    taken for a decline before, which failed the order for a charge that may go through."""
    port = shop.processor.ports["payments"]
    real_charge = port.charge
    answers = [Charge("k", ChargeStatus.OTHER, 0, "", detail="pending")]

    def pending_first(key: str, **request: object) -> Charge:
        return answers.pop() if answers else real_charge(key, **request)  # type: ignore[arg-type]

    port.charge = pending_first  # type: ignore[method-assign]
    shop.processor.backoff = _Patient()
    saga_id = shop.order("o-pending", [("KETTLE", 1, 100)])
    saga = shop.processor.drive(saga_id)
    assert saga.state is SagaState.RUNNING and saga.attempts == 1, saga.view()
    assert "pending" in (saga.last_error or "")
    assert shop.run(saga_id).state is SagaState.COMPLETED
