"""The httpx adapter against the fake gateway server: what each failure tells the caller."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from daybook.infrastructure.gateway import ChargeStatus, OutcomeUnknown, Unavailable
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway


@pytest.fixture
def server() -> Iterator[FakeGatewayServer]:
    with FakeGatewayServer(Knobs(seed=1)) as server:
        yield server


def charge(gateway: HttpPaymentGateway, key: str, amount: int = 500) -> ChargeStatus:
    return gateway.charge(key, amount=amount, currency="EUR", customer="c", reference="r").status


def test_a_repeated_key_gets_the_original_answer_and_is_charged_once(
    server: FakeGatewayServer,
) -> None:
    gateway = HttpPaymentGateway(server.url)
    assert charge(gateway, "k-1") is ChargeStatus.SUCCEEDED
    assert charge(gateway, "k-1", amount=999) is ChargeStatus.SUCCEEDED
    found = gateway.lookup("k-1")
    assert found is not None and found.amount == 500
    assert gateway.lookup("k-2") is None
    server.gateway.knobs.decline_rate = 1.0
    assert charge(gateway, "k-3") is ChargeStatus.DECLINED
    server.gateway.knobs.decline_rate = 0.0
    assert charge(gateway, "k-3") is ChargeStatus.DECLINED  # the original answer
    assert server.gateway.charged == {"k-1": 1}
    assert server.gateway.requests == {"k-1": 2, "k-3": 2}
    assert [c.key for c in gateway.charges()] == ["k-1", "k-3"]


def test_failures_say_whether_the_request_may_have_been_processed(
    server: FakeGatewayServer,
) -> None:
    # A timeout no loaded machine reaches by accident; only the hang below uses a short one
    # (0.3 s against a 3 s hang: a slow machine makes it fire later, not keep it from firing).
    gateway = HttpPaymentGateway(server.url, timeout=10.0)
    knobs = server.gateway.knobs
    knobs.unavailable_rate = 1.0
    with pytest.raises(Unavailable):
        charge(gateway, "k-1")
    knobs.unavailable_rate, knobs.drop_rate = 0.0, 1.0
    with pytest.raises(OutcomeUnknown):
        charge(gateway, "k-1")
    assert gateway.lookup("k-1") is None  # dropped before processing: nothing charged
    knobs.drop_rate, knobs.lost_reply_rate = 0.0, 1.0
    with pytest.raises(OutcomeUnknown):
        charge(gateway, "k-2")
    assert gateway.lookup("k-2") is not None  # charged; the reply was lost
    knobs.lost_reply_rate, knobs.hang_rate, knobs.hang_seconds = 0.0, 1.0, 3.0
    with pytest.raises(OutcomeUnknown):  # a read timeout
        charge(HttpPaymentGateway(server.url, timeout=0.3), "k-3")
    assert server.gateway.charged == {"k-2": 1} or server.gateway.charged == {
        "k-2": 1,
        "k-3": 1,
    }


def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(Unavailable):
        charge(HttpPaymentGateway(f"http://127.0.0.1:{port}"), "k-1")


def test_a_refund_closes_a_key_that_was_never_charged(server: FakeGatewayServer) -> None:
    gateway = HttpPaymentGateway(server.url)
    assert gateway.refund("late").status == "nothing_to_refund"
    assert charge(gateway, "late") is ChargeStatus.DECLINED  # a late request cannot charge
    assert charge(gateway, "paid") is ChargeStatus.SUCCEEDED
    refund = gateway.refund("paid")
    assert (refund.status, refund.amount) == ("refunded", 500)
    assert gateway.refund("paid").status == "refunded"
    assert server.gateway.refunds == {"paid": 1}
