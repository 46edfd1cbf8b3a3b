"""Answers that must say what they reflect: a stream-owned version's answer may include
events after its position (``includes_later``), at every face; a bad query argument is refused."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daybook import DomainError, Ledger, open_ledger, projections, run_projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.expiry import open_holds
from daybook.infrastructure.readmodels.queries import ReadModels
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.worker import StreamApplier
from tests.projections.helpers import expected_rows, workload
from tests.streaming.messages import Stream, of_partitions

GROUP, TOPIC = "g", "events"


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


def uneven_stream_versions(ledger: Ledger, pg_url: str) -> list[object]:
    """Every projection owned by a stream group, one partition run ahead to the head."""
    ids = workload(ledger, 60)
    stream = Stream(4)
    worker = StreamApplier(
        pg_url, projections.ALL, group=GROUP, topic=TOPIC, partitions=4, writer="test"
    )
    try:
        worker.apply(stream.publish(ledger))
        workload(ledger, 60, seed=2, accounts=ids)
        later = stream.publish(ledger)
        events = [m for m in later if not envelope.decode(m.value).is_mark]
        worker.apply(of_partitions(later, events[-1].partition))
    finally:
        worker.close()
    return ids


@pytest.mark.postgres
def test_open_holds_says_when_its_answer_may_include_later_events(
    ledger: Ledger, pg_url: str
) -> None:
    """README: every answer carries ``includes_later``. ``expiry.open_holds`` (the README's
    query for open holds) rebuilt its ``Answer`` without it, so a stream-owned version's
    answer always said False."""
    uneven_stream_versions(ledger, pg_url)
    with ReadModels(pg_url, log=event_log_of(ledger)) as views:
        generic = views.rows(projections.OPEN_HOLDS_PROJECTION, "open_holds")
        assert generic.includes_later  # what the generic query says of the same version
        answer = open_holds(views)
        assert answer.as_of_position == generic.as_of_position
        assert answer.includes_later, answer


@pytest.mark.postgres
def test_the_cli_says_when_its_answer_may_include_later_events(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``daybook balance`` / ``stock`` / ``statement`` print "as of log position P": for a
    stream-owned version the answer may hold events after P (``includes_later``, which
    ``--json`` and HTTP carry and ``projections status`` marks with ``+``); the text said
    nothing of it, so a person reads a balance that includes later events as one at P."""
    ids = uneven_stream_versions(ledger, pg_url)
    with ReadModels(pg_url, log=event_log_of(ledger)) as views:
        shown = {a: views.balance(a) for a in ids}
    position = next(iter(shown.values())).as_of_position
    at_p = expected_rows(ledger, projections.ACCOUNT_BALANCES, upto=position)
    ahead = [
        a
        for a, b in shown.items()
        if b.balance != at_p.tables["account_balances"][(str(a),)]["balance"]
    ]
    assert ahead, "no account's balance holds events after P"
    account = ahead[0]
    capsys.readouterr()
    assert main(["balance", str(account), "--url", pg_url]) == 0
    out = capsys.readouterr().out
    # The balance printed is not the balance at the position printed beside it ...
    assert f"as of log position {position}" in out
    assert f"balance {at_p.tables['account_balances'][(str(account),)]['balance']:,} " not in out
    # ... which the text must say.
    assert "later" in out, out
    # `daybook sagas list` prints its position too.
    assert main(["sagas", "list", "--url", pg_url]) == 0
    assert "may include some later events" in capsys.readouterr().out


@pytest.mark.parametrize("at_most", ["5", -5, 1.5, True])
def test_a_bad_at_most_is_refused_invalid_request(shared_store_url: str, at_most: object) -> None:
    """README: an argument that makes no sense raises ``InvalidRequest`` naming it, before
    anything is read. ``balances(at_most=...)`` was not checked: a text is a TypeError, a
    negative number a LIMIT the database refuses (PostgreSQL) or an odd refusal (SQLite),
    1.5 and True are taken as numbers."""
    with open_ledger(shared_store_url) as ledger, run_projections(ledger) as runner:
        account = ledger.open_account("ann", "EUR").account_id
        receipt = ledger.deposit(account, 100)
        runner.views.balance(account, min_position=receipt.position, timeout=30)
        with pytest.raises(DomainError) as refused:
            runner.views.balances(at_most=at_most)  # type: ignore[arg-type]
    assert refused.value.code == "invalid_request"
    assert "at_most" in str(refused.value), refused.value
