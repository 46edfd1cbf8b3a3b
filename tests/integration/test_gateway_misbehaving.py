"""Answers of a misbehaving gateway (or a proxy before it) that the port or the processor
took for what they are not (see each test)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from daybook.domain.sagas import Saga, SagaState
from daybook.infrastructure.gateway import GatewayError, OutcomeUnknown, Unavailable
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from tests.integration.test_gateway_answers import (  # noqa: F401  (fixtures)
    Answer,
    _Patient,
    answering,
)
from tests.integration.test_sagas import Shop, shop  # noqa: F401  (a fixture)

_CHARGE = {"amount": 100, "currency": "EUR", "customer": "c", "reference": "r"}


def _charging_with(
    shop: Shop,  # noqa: F811
    gateway: HttpPaymentGateway,
) -> None:
    """The processor's charges go to ``gateway``; look-ups and refunds to the real fake."""
    real = shop.processor.ports["payments"]
    gateway.lookup = real.lookup  # type: ignore[method-assign]
    gateway.refund = real.refund  # type: ignore[method-assign]
    shop.processor.ports["payments"] = gateway
    shop.processor.backoff = _Patient()


def test_a_charge_answered_under_another_key_does_not_complete_the_order(
    shop: Shop,  # noqa: F811
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],  # noqa: F811
) -> None:
    """The gateway answers the charge with another order's charge (a cache or proxy mixing
    answers up): it is not the charge asked for, and says nothing of this one."""
    gateway, server = answering
    other = b'{"key": "someone-else:charge", "status": "succeeded", "amount": 100,'
    server.answer = Answer(200, other + b' "currency": "EUR", "charge_id": "ch_other"}')  # type: ignore[attr-defined]
    _charging_with(shop, gateway)
    saga_id = shop.order("o-other-key", [("KETTLE", 1, 100)])
    saga = shop.processor.drive(saga_id)
    assert saga.state is not SagaState.COMPLETED, saga.view()
    assert shop.charged() == {}  # nothing was charged under this order's key


def test_the_adapter_refuses_a_charge_under_another_key(
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],  # noqa: F811
) -> None:
    gateway, server = answering
    body = b'{"key": "other", "status": "succeeded", "amount": 100, "currency": "EUR"}'
    server.answer = Answer(200, body)  # type: ignore[attr-defined]
    with pytest.raises(OutcomeUnknown):
        gateway.charge("k", **_CHARGE)  # type: ignore[arg-type]
    with pytest.raises(OutcomeUnknown):
        gateway.lookup("k")


@pytest.mark.parametrize("amount", [b"100.9", b'"100"', b"true"])
def test_an_amount_that_is_not_an_integer_is_not_read_as_one(
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],  # noqa: F811
    amount: bytes,
) -> None:
    """Amounts are integers of the currency's minor unit: 100.9 was read as 100 (the
    order completed on it), "100" and true (1) read as numbers."""
    gateway, server = answering
    body = b'{"key": "k", "status": "succeeded", "amount": ' + amount + b', "currency": "EUR"}'
    server.answer = Answer(200, body)  # type: ignore[attr-defined]
    with pytest.raises(OutcomeUnknown):
        gateway.charge("k", **_CHARGE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field",
    [
        b'"charge_id": {"id": "ch_1"}',
        b'"charge_id": 12345',
        b'"charge_id": "' + b"c" * 100_000 + b'"',
        b'"decline_code": ["do_not_honor"]',
        b'"decline_code": "' + b"d" * 100_000 + b'"',
    ],
    ids=["id-object", "id-number", "id-huge", "code-list", "code-huge"],
)
def test_a_charge_id_or_decline_code_that_is_not_short_text_is_not_taken(
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],  # noqa: F811
    field: bytes,
) -> None:
    """The charge id goes into the order's saga (its step's event, its state, every view
    of it) and the decline code into its failure: an answer's object, number or 100,000
    characters went there as they came, kept for as long as the log is."""
    gateway, server = answering
    body = b'{"key": "k", "status": "succeeded", "amount": 100, "currency": "EUR", '
    server.answer = Answer(200, body + field + b"}")  # type: ignore[attr-defined]
    with pytest.raises(OutcomeUnknown, match="at most 255 characters"):
        gateway.charge("k", **_CHARGE)  # type: ignore[arg-type]


def test_a_fractional_amount_does_not_complete_the_order(
    shop: Shop,  # noqa: F811
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],  # noqa: F811
) -> None:
    gateway, server = answering
    saga_id = shop.order("o-float", [("KETTLE", 1, 100)])
    body = f'{{"key": "{saga_id}:charge", "status": "succeeded", "amount": 100.9,'
    server.answer = Answer(200, body.encode() + b' "currency": "EUR"}')  # type: ignore[attr-defined]
    _charging_with(shop, gateway)
    saga = shop.processor.drive(saga_id)
    assert saga.state is not SagaState.COMPLETED, saga.view()


def test_a_refunded_flag_that_is_not_a_boolean_is_not_read_as_true(
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],  # noqa: F811
) -> None:
    """``"refunded": "false"`` was read as refunded (``bool("false")``): reconciliation then
    skipped a charge taken for nothing, and flagged a paid order as not paid."""
    gateway, server = answering
    body = (
        b'{"charges": [{"key": "k", "status": "succeeded", "amount": 5, "currency": "EUR",'
        b' "refunded": "false"}]}'
    )
    server.answer = Answer(200, body)  # type: ignore[attr-defined]
    (charge,) = gateway.charges()
    assert not charge.refunded, charge


class _Trickling(BaseHTTPRequestHandler):
    """Answers 200 with a body sent a byte at a time, each before the client's read timeout,
    for ``server.seconds`` in all."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"key": "k", "status": "succeeded", "amount": 100, "currency": "EUR"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) + 1000))
        self.end_headers()
        end = time.monotonic() + self.server.seconds  # type: ignore[attr-defined]
        try:
            while time.monotonic() < end:
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            return

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def trickling() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickling)
    server.seconds = 120.0  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_call_ends_however_long_the_body_trickles(trickling: ThreadingHTTPServer) -> None:
    """``timeout=1`` bounds each read, not the call: a gateway (or a proxy) sending a byte
    every 0.2 s held the call, and the processor's worker and its saga, for as long as it
    went on (a saga's deadline cannot fire while its drive is out). The call now ends
    within its deadline, twice the timeout; the server here trickles for two minutes, and
    the test gives the call one (a guard against a hang, not a measure of speed)."""
    gateway = HttpPaymentGateway(f"http://127.0.0.1:{trickling.server_address[1]}", timeout=1.0)
    ended: list[BaseException | None] = []

    def call() -> None:
        try:
            gateway.charge("k", **_CHARGE)  # type: ignore[arg-type]
            ended.append(None)
        except BaseException as error:  # asserted below
            ended.append(error)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(60)
    gateway.close()
    assert ended, "the call was still reading a trickled answer after a minute"
    assert isinstance(ended[0], OutcomeUnknown), ended


class _Huge(BaseHTTPRequestHandler):
    """Answers 200 with a body of ``server.size`` bytes (a JSON string's padding)."""

    def do_GET(self) -> None:
        size = self.server.size  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = b" " * 65536
        try:
            sent = 0
            while sent < size:
                part = chunk[: min(len(chunk), size - sent)]
                self.wfile.write(part)
                sent += len(part)
        except OSError:
            return

    def log_message(self, *args: object) -> None:
        pass


def test_a_huge_answer_is_not_read_into_memory_whole() -> None:
    """A gateway's answer is read whole into memory, however large: a listing or a look-up
    answered with 100 MB took 400 MB."""
    import tracemalloc

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Huge)
    server.size = 100 * 1024 * 1024  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    gateway = HttpPaymentGateway(f"http://127.0.0.1:{server.server_address[1]}", timeout=5.0)
    tracemalloc.start()
    try:
        with pytest.raises(GatewayError):
            gateway.lookup("k")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gateway.close()
        server.shutdown()
        server.server_close()
    assert peak < 64 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB for one answer"


def test_a_rate_limited_order_is_not_given_up_before_the_gateway_said_to_come_back(
    shop: Shop,  # noqa: F811
    answering: tuple[HttpPaymentGateway, ThreadingHTTPServer],  # noqa: F811
) -> None:
    """429 with ``Retry-After: 30``: the gateway says when it takes requests again. The
    processor retried after its own backoff (50 ms, doubling) and failed the order, its
    attempts spent, a few seconds later, long before the gateway said it would answer."""
    gateway, server = answering
    server.answer = Answer(429, b'{"error": "slow down"}', (("Retry-After", "30"),))  # type: ignore[attr-defined]
    real = shop.processor.ports["payments"]
    gateway.refund = real.refund  # type: ignore[method-assign]
    shop.processor.ports["payments"] = gateway
    saga_id = shop.order("o-429-after", [("KETTLE", 1, 100)], payment_deadline=3600)
    started = shop.clock()
    saga = shop.run(saga_id, rounds=200)
    gave_up = (shop.clock() - started).total_seconds()
    assert saga.state is SagaState.COMPENSATED
    assert gave_up >= 30, f"the order was failed {gave_up:.1f}s in: {saga.view().last_error}"


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _reply(handler: BaseHTTPRequestHandler, status: int, answer: object, *header: str) -> None:
    """``answer`` as JSON, with ``header`` (a name and a value) if given."""
    data = json.dumps(answer).encode()
    handler.send_response(status)
    if header:
        handler.send_header(*header)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class _RefundsRateLimited(BaseHTTPRequestHandler):
    """Charges answered 99 EUR (a partial approval: the saga compensates); refunds 429 with
    Retry-After: 600."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if self.path == "/charges":
            answer = {"key": body["key"], "status": "succeeded", "amount": 99, "currency": "EUR"}
            _reply(self, 200, answer)
        else:
            self.server.refunds += 1  # type: ignore[attr-defined]
            _reply(self, 429, {"error": "slow down"}, "Retry-After", "600")

    def log_message(self, *args: object) -> None:
        pass


def test_a_refund_answered_429_with_retry_after_is_not_retried_before_it(
    shop: Shop,  # noqa: F811
) -> None:
    """README: a 429 is retried, and not before the answer's Retry-After says. Charges
    waited for it; a refund (a compensation) was retried on backoff alone, hitting a
    throttled gateway again within the same drive."""
    server = _serve(_RefundsRateLimited)
    server.refunds = 0  # type: ignore[attr-defined]
    gateway = HttpPaymentGateway(f"http://127.0.0.1:{server.server_address[1]}")
    shop.processor.ports["payments"] = gateway
    try:
        saga_id = shop.order("o-refund-429", [("KETTLE", 1, 100)], payment_deadline=3600)
        saga = shop.processor.drive(saga_id)
        assert saga.state is SagaState.COMPENSATING, saga.view()
        refunds = server.refunds  # type: ignore[attr-defined]
        assert refunds == 1, f"{refunds} refunds in one drive after a 429 with Retry-After: 600"
        saga = shop.ledger.read(Saga, saga_id)
        now = shop.clock()
        wait = (saga.retry_at - now).total_seconds() if saga.retry_at else None
        assert wait is not None and wait >= 590, (
            f"the refund is retried {wait}s after a 429 that said Retry-After: 600"
        )
    finally:
        gateway.close()
        server.shutdown()
        server.server_close()


class _Listing(BaseHTTPRequestHandler):
    """Lists the server's one charge (``server.charge``) on the first page, nothing after."""

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)
        charges = [] if query.get("after", [""])[0] else [self.server.charge]  # type: ignore[attr-defined]
        _reply(self, 200, {"charges": charges})

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("refunded", ["false", None, 0])
def test_a_paid_order_listed_with_a_non_boolean_refunded_is_not_flagged_as_not_paid(
    shop: Shop,  # noqa: F811
    refunded: object,
) -> None:
    """A listed charge whose ``refunded`` is not a boolean is unreadable (``OTHER``, flagged
    as in an unknown state): the completed order's pass took it for no charge, and flagged
    a paid order "completed, not paid" (for null and 0 too, which meant not refunded)."""
    from daybook.infrastructure.sagas.reconcile import reconcile_payments

    saga_id = shop.order("o-paid", [("KETTLE", 1, 100)])
    assert shop.run(saga_id).state is SagaState.COMPLETED
    server = _serve(_Listing)
    server.charge = {  # type: ignore[attr-defined]
        "key": f"{saga_id}:charge",
        "status": "succeeded",
        "amount": 100,
        "currency": "EUR",
        "refunded": refunded,
    }
    gateway = HttpPaymentGateway(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        report = reconcile_payments(shop.ledger, gateway, completed=[saga_id])
    finally:
        gateway.close()
        server.shutdown()
        server.server_close()
    found = [(f.kind, f.detail) for f in report.findings]
    assert ("order_without_charge", "completed, not paid") not in found, found


class _SlowListing(BaseHTTPRequestHandler):
    """A page of 1000 charges, its headers at once and its body in ten parts 0.5 s apart
    (each read well within the 2 s timeout; 5 s in all)."""

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)
        charges = (
            []
            if query.get("after", [""])[0]
            else [
                {
                    "key": f"other-system:{n:06}",
                    "status": "succeeded",
                    "amount": 5,
                    "currency": "EUR",
                }
                for n in range(1000)
            ]
        )
        data = json.dumps({"charges": charges}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        part = len(data) // 10 + 1
        for start in range(0, len(data), part):
            self.wfile.write(data[start : start + part])
            self.wfile.flush()
            time.sleep(0.5)

    def log_message(self, *args: object) -> None:
        pass


def test_a_slowly_sent_listing_page_is_still_read() -> None:
    """Each read within the timeout, the page whole in 5 s: a listing has no look-up behind
    it, so a page cut at the call's deadline (4 s) stopped every reconciliation there."""
    server = _serve(_SlowListing)
    gateway = HttpPaymentGateway(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        assert len(gateway.charges()) == 1000
    finally:
        gateway.close()
        server.shutdown()
        server.server_close()


class _TricklingHead:
    """A server that answers every request with a good charge, its status line and headers
    sent a byte every ``pause`` seconds: ``finished`` says whether it got the whole head out
    (the client gone first: not)."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.finished = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            connection, _ = self.listener.accept()
            with connection:
                connection.recv(65536)  # the request (small, in one piece on loopback)
                body = b'{"key": "k", "status": "succeeded", "amount": 100, "currency": "EUR"}'
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                )
                for byte in head:
                    connection.sendall(bytes([byte]))
                    time.sleep(self.pause)
                self.finished.set()
                connection.sendall(body)

    def close(self) -> None:
        self.listener.close()


def test_a_call_ends_however_long_the_status_line_and_headers_trickle() -> None:
    """The deadline bounded the body only: a server (or a proxy) sending its status line and
    headers a byte every 0.3 s, each within the 1 s read timeout, held the call (and the
    saga's drive) until its last header, 25 s here, as long as it liked anywhere. Every
    connect, read and write of a call now waits at most what is left of its deadline."""
    server = _TricklingHead(pause=0.3)
    gateway = HttpPaymentGateway(f"http://127.0.0.1:{server.port}", timeout=1.0)
    try:
        with pytest.raises(OutcomeUnknown):
            gateway.charge("k", **_CHARGE)  # type: ignore[arg-type]
        assert not server.finished.is_set(), "the call waited for the whole trickled head"
    finally:
        gateway.close()
        server.close()


def test_a_name_looked_up_past_the_deadline_ends_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connect resolved the gateway's name without a limit (getaddrinfo has none): a
    resolver that hangs held the call past its deadline. The call ends while the look-up
    still hangs (it never gets an address: the request was never sent)."""
    released, done = threading.Event(), threading.Event()

    def hanging(*args: object, **kwargs: object) -> list[object]:
        released.wait(30)
        done.set()
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 9))]

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    gateway = HttpPaymentGateway("http://gateway.test:18777", timeout=2.0, deadline=1.0)
    try:
        with pytest.raises(Unavailable):
            gateway.lookup("k")
        assert not done.is_set(), "the call waited for the whole look-up"
    finally:
        released.set()
        gateway.close()


class _AnsweringProxy(BaseHTTPRequestHandler):
    """An HTTP proxy that answers itself: a good charge, whatever the absolute URL asked."""

    def do_POST(self) -> None:
        self.server.asked.append(self.path)  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"key": "k", "status": "succeeded", "amount": 100, "currency": "EUR"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_gateway_is_reached_through_the_environments_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deployment whose only way out is an egress proxy (HTTP_PROXY): giving httpx a
    transport of daybook's made it ignore the environment's proxies, and every call to a
    gateway reached only through one failed. Its proxies get the deadlines too."""
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _AnsweringProxy)
    proxy.asked = []  # type: ignore[attr-defined]
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
    gateway = HttpPaymentGateway("http://gateway.invalid", timeout=2.0)
    try:
        charge = gateway.charge("k", **_CHARGE)  # type: ignore[arg-type]
    finally:
        gateway.close()
        proxy.shutdown()
        proxy.server_close()
    assert charge.amount == 100
    assert proxy.asked == ["http://gateway.invalid/charges"]
