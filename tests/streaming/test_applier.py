"""The stream applier fed the relay's messages directly (no broker): what it logs."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest

from daybook import open_ledger, projections
from daybook.domain.accounts import Account
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.readmodels.catalog import DROP_RETRY, VersionCatalog, VersionState
from daybook.infrastructure.readmodels.checkpoints import CodeLacksVersion, PartitioningMismatch
from daybook.infrastructure.readmodels.handover import HandoverRefused, handover
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.queries import ReadModels, StaleRead
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.readmodels.store import ReadStore
from daybook.infrastructure.streaming import relay as relay_module
from daybook.infrastructure.streaming import worker as worker_module
from daybook.infrastructure.streaming.progress import (
    DEAD_LETTER_TABLE,
    PURGE_INDEX,
    purge_closed_letters,
    read_status,
)
from daybook.infrastructure.streaming.worker import Message, StreamApplier
from daybook.infrastructure.transient import is_transient
from daybook.projections.accounts import ACCOUNT_BALANCES, ACCOUNT_STATEMENT, STATEMENT
from daybook.projections.model import Column, LogEvent, Projection, Rows, Table, event_type
from scripts import services
from scripts.streams import unique
from tests.projections.helpers import workload
from tests.streaming.messages import Stream, of_partitions

pytestmark = pytest.mark.postgres


def test_a_partition_waiting_for_a_gap_logs_when_it_starts_not_per_event(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = open_ledger(pg_url)
    workload(ledger, 400)
    messages = of_partitions(Stream(1).publish(ledger), 0)
    ledger.close()
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    now = [1000.0]
    worker.states.clock = lambda: now[0]
    caplog.set_level(logging.INFO, logger="daybook.worker")
    try:
        worker.apply(messages[:10])
        for start in range(11, len(messages), 50):  # the eleventh never arrives
            worker.apply(messages[start : start + 50])
        gap_lines = [r.getMessage() for r in caplog.records if "re-publish" in r.getMessage()]
        assert len(messages) > 300
        assert len(gap_lines) == 1, gap_lines[:5]  # one line when the wait starts
        caplog.clear()
        now[0] += worker.states.summary_every  # the wait outlasts the summary interval
        worker.apply(messages[-50:])
        worker.apply(messages[-50:])
        summaries = [r.getMessage() for r in caplog.records if "re-publish" in r.getMessage()]
        assert len(summaries) == 1 and "still, for 30s" in summaries[0], summaries
        caplog.clear()
        worker.apply(messages[10:])  # re-published: the wait ends
    finally:
        worker.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "re-publish" in line] == []
    assert len([line for line in lines if "goes on past its gap" in line]) == 1, lines


def test_a_batch_says_where_the_gap_its_partition_waits_for_began(pg_url: str) -> None:
    """``BatchResult.waiting``: the offset of the first message held back by a gap that
    began in the batch (the worker's lag counts from there), None for one that began in an
    earlier batch, and nothing once the gap ends; a gap that ends and another that begins in
    one batch count from the second."""
    ledger = open_ledger(pg_url)
    workload(ledger, 40)
    messages = of_partitions(Stream(1).publish(ledger), 0)
    ledger.close()
    worker = StreamApplier(
        pg_url, projections.ALL, group=unique("g"), topic="t", partitions=1, writer="test"
    )
    m = messages
    try:
        assert worker.apply(m[:10]).waiting == {}
        assert worker.apply([m[11]]).waiting == {0: m[11].offset}  # the tenth never came
        assert worker.apply([m[12]]).waiting == {0: None}  # the same gap, still
        # the tenth comes (the gap ends), then the thirteenth is missing: a new gap
        result = worker.apply([m[10], m[11], m[12], m[14]])
        assert result.waiting == {0: m[14].offset}
        assert worker.apply(m[13:20]).waiting == {}
    finally:
        worker.close()


def _fail_deposit(event: LogEvent, rows: Rows) -> None:
    raise KeyError("new_field")


def _add_withdrawal(event: LogEvent, rows: Rows) -> None:
    key = (event.originator_id,)
    row = rows.get("withdrawal_totals", key) or {"account_id": event.originator_id, "total": 0}
    rows.put("withdrawal_totals", {**row, "total": row["total"] + event.data["amount"]})


def _deposits(ledger: Any, owners: int, amounts: Sequence[int]) -> list[Any]:
    """``owners`` new accounts, each given a deposit of each of ``amounts`` in turn."""
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(owners)]
    for amount in amounts:
        for account in accounts:
            ledger.deposit(account, amount)
    return accounts


#: A projection bug: every deposit fails (withdrawals, between them, apply).
FAILS_DEPOSITS = Projection(
    name="withdrawal_totals",
    version=1,
    tables=(
        Table(
            "withdrawal_totals",
            (Column("account_id"), Column("total", "bigint")),
            key=("account_id",),
        ),
    ),
    handlers={
        event_type(Account.Deposited): _fail_deposit,
        event_type(Account.Withdrawn): _add_withdrawal,
    },
)


def test_a_partition_parking_event_after_event_logs_when_it_starts_not_per_event(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each parked event is a dead letter; the log says when the partition starts parking,
    sums up while it goes on, and says when it has gone a while without parking."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    for _ in range(150):
        ledger.deposit(account, 2)
        ledger.withdraw(account, 1)
    stream = Stream(1)
    messages = stream.publish(ledger)
    worker = StreamApplier(
        pg_url, [FAILS_DEPOSITS], group="g", topic="t", partitions=1, writer="test"
    )
    now = [1000.0]
    worker.states.clock = lambda: now[0]
    caplog.set_level(logging.INFO, logger="daybook.worker")
    try:
        for start in range(0, len(messages), 50):
            worker.apply(messages[start : start + 50])
        parked = [r for r in caplog.records if "parked event" in r.getMessage()]
        assert [r.levelno for r in parked] == [logging.ERROR], [r.getMessage() for r in parked]
        assert "new_field" in parked[0].getMessage()
        assert worker.store is not None
        letters = worker.store.execute("SELECT count(*) FROM daybook_stream_dead_letters")
        assert letters[0][0] == 150  # every one recorded all the same
        caplog.clear()
        now[0] += worker.states.summary_every  # a while without parking, then one applies
        ledger.withdraw(account, 1)
        worker.apply(stream.publish(ledger))
    finally:
        worker.close()
        ledger.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any("partition 0 applies events again" in line for line in lines), lines


def test_messages_that_are_no_envelope_at_the_same_offset_of_two_partitions_are_both_parked(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every partition's offsets start at 0: a message that is no envelope (a tombstone, a
    foreign producer's record, a newer envelope version) at offset 0 of partition 0 and one
    at offset 0 of partition 1 are two dead letters, each with its row (what `stream
    status`, the re-send and the purge work from), and each names where it was."""
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=2, writer="test"
    )
    try:
        result = worker.apply([Message(0, 0, b"not an envelope"), Message(1, 0, b"")])
        assert worker.store is not None
        rows = worker.store.execute(
            "SELECT partition, kafka_offset FROM daybook_stream_dead_letters"
            " WHERE group_id = 'g' ORDER BY partition"
        )
    finally:
        worker.close()
    assert [tuple(r) for r in rows] == [(0, 0), (1, 0)]
    assert sorted((p.partition, p.offset) for p in result.parked) == [(0, 0), (1, 0)]
    assert len({p.position for p in result.parked}) == 2
    assert main(["stream", "status", "--url", pg_url, "--group", "g", "--topic", "t"]) == 1
    out = capsys.readouterr().out
    assert "partition 1: " in out and "1 dead letter(s): offset 0 (no envelope): " in out, out


def _envelope_like(**override: object) -> bytes:
    """A message with the envelope's keys and version but a field of the wrong kind
    (another producer's record, a hand-made message, a corrupted re-send)."""
    fields: dict[str, object] = {
        "v": 1,
        "type": "Account.Deposited",
        "schema": 1,
        "payload_schema": 1,
        "aggregate_id": "0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b",
        "aggregate_version": 2,
        "position": 1,
        "prev": 0,
        "occurred_at": "2026-01-01T00:00:00+00:00",
        "metadata": {},
        "payload": {"amount": 1},
    }
    fields.update(override)
    return orjson.dumps(fields)


@pytest.mark.parametrize(
    "override",
    [
        {"occurred_at": "yesterday"},
        {"aggregate_version": "two"},
        {"type": 7},
        {"position": "1"},
        {"prev": "0"},
        {"payload": [1]},
        {"type": "daybook.mark", "prev": None},
        # Numbers no bigint holds: the batch's progress update failed, "bigint out of range".
        {"position": 2**63},
        {"prev": 2**63, "position": 2**63 + 1},
        {"type": "daybook.mark", "position": 2**63, "prev": 0},
    ],
    ids=repr,
)
def test_a_message_with_a_field_of_the_wrong_kind_or_size_is_parked_not_fatal(
    pg_url: str, override: dict[str, object]
) -> None:
    """It got past the envelope check and failed later, outside the parking path: the
    worker stopped, and stopped again at every start (the offset never committed), and the
    group applied nothing."""
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    try:
        result = worker.apply([Message(0, 0, _envelope_like(**override))])
    finally:
        worker.close()
    assert len(result.parked) == 1
    (status,) = read_status(pg_url, "g", "t")
    assert status.dead_letters == 1


def test_a_message_that_is_no_envelope_delivered_again_is_not_parked_again(pg_url: str) -> None:
    """Kafka redelivers what was applied but not yet committed (a worker killed, a
    rebalance). A redelivered event is recognised by its position; a redelivered message
    that is no envelope, by its partition and offset: a duplicate, neither counted again
    nor published again. (A letter parked before such letters were keyed by partition
    too, at ``-offset - 1``, stays readable.)"""
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    bad = Message(0, 7, b"not an envelope")
    try:
        assert len(worker.apply([bad]).parked) == 1
        again = worker.apply([bad])  # the same message, delivered again
    finally:
        worker.close()
    (status,) = read_status(pg_url, "g", "t")
    assert (len(again.parked), again.duplicates) == (0, 1)
    assert (status.dead_letters, status.duplicates) == (1, 1)


def test_two_workers_of_a_group_publish_each_dead_letter_once(pg_url: str) -> None:
    """Unpublished dead letters (those a batch just parked, or left by a crash) are
    published by a worker of the group after its batches and at its start. Two workers
    parking events at the same time (a handler bug failing every event of a kind, on every
    partition), or starting together after a crash, each sent the other's letters too:
    each letter went to the dead-letter topic once per worker. A worker claims the letters
    it publishes (others skip them) until it has marked them published. This replays the
    two workers' steps interleaved as they run concurrently."""
    ledger = open_ledger(pg_url)
    for n in range(20):  # both partitions get deposits (all but certainly)
        ledger.deposit(ledger.open_account(f"owner-{n}", "EUR").account_id, 5)
    messages = Stream(2).publish(ledger)
    ledger.close()
    a = StreamApplier(pg_url, [FAILS_DEPOSITS], group="g", topic="t", partitions=2, writer="a")
    b = StreamApplier(pg_url, [FAILS_DEPOSITS], group="g", topic="t", partitions=2, writer="b")
    sent: Counter[int] = Counter()
    try:
        parked_a = a.apply(of_partitions(messages, 0)).parked  # worker a owns partition 0
        parked_b = b.apply(of_partitions(messages, 1)).parked  # worker b owns partition 1
        assert parked_a and parked_b
        pending_a = a.claim_dead_letters()  # a's publishing begins
        pending_b = b.claim_dead_letters()  # b's, meanwhile
        for letter in [*pending_a, *pending_b]:
            sent[letter.position] += 1  # on the dead-letter topic
        a.mark_published(pending_a)
        b.mark_published(pending_b)
        assert b.claim_dead_letters() == []  # all published
        b.mark_published([])
    finally:
        a.close()
        b.close()
    assert sorted(sent) == sorted(p.position for p in [*parked_a, *parked_b])
    assert [p for p, n in sent.items() if n > 1] == []


def test_a_claim_of_dead_letters_that_fails_ends_and_the_next_batch_applies(
    pg_url: str,
) -> None:
    """A claim whose own query fails for a reason a retry cures (here its statement
    cancelled, waiting for a table another session locked) ends there: the next batch, on
    the same connection, applies rather than fail in the aborted claim (which no retry
    cures: the worker would stop), and the letters are claimed again later."""
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    try:
        worker.apply([Message(0, 3, b"not an envelope")])
        assert worker.store is not None
        worker.store.execute("SET statement_timeout = '2s'")
        with psycopg.connect(pg_url) as other:
            other.execute(f"LOCK TABLE {DEAD_LETTER_TABLE} IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(psycopg.errors.QueryCanceled) as failed:
                worker.claim_dead_letters()
        assert is_transient(failed.value)
        worker.apply([Message(0, 4, b"not an envelope either")])
        claimed = worker.claim_dead_letters()
        assert sorted(letter.offset for letter in claimed) == [3, 4]
        worker.mark_published(claimed)
    finally:
        worker.close()


def test_dead_letters_a_worker_failed_to_publish_are_claimed_again(pg_url: str) -> None:
    """A publish that fails (the broker away) leaves the letters claimed by nobody and
    unpublished: the next attempt, this worker's or another's, sends them."""
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    other = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="other"
    )
    try:
        worker.apply([Message(0, 3, b"not an envelope")])
        claimed = worker.claim_dead_letters()
        assert len(claimed) == 1 and other.claim_dead_letters() == []
        other.mark_published([])  # its claim of nothing ends
        worker.close()  # the send failed: as the worker does, its claim's connection closed
        assert other.claim_dead_letters() == claimed
        other.mark_published(claimed)
        assert worker.claim_dead_letters() == []
    finally:
        worker.close()
        other.close()


def test_a_claim_of_dead_letters_a_worker_stops_tending_ends_on_the_server(pg_url: str) -> None:
    """A worker frozen or cut off mid-claim kept the letters' rows locked, and the group's
    other workers skipped them, until TCP gave the connection up, hours later: the claim's
    transaction ends on the server once idle past ``CLAIM_IDLE_LIMIT_SECONDS``."""
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    try:
        worker.apply([Message(0, 3, b"not an envelope")])
        assert len(worker.claim_dead_letters()) == 1
        assert worker.store is not None
        ((limit,),) = worker.store.execute("SHOW idle_in_transaction_session_timeout")
        assert limit == f"{worker_module.CLAIM_IDLE_LIMIT_SECONDS // 60}min", limit
        worker.mark_published([])  # the claim ends, on the same connection
        ((after,),) = worker.store.execute("SHOW idle_in_transaction_session_timeout")
        assert after != limit  # for the claim's transaction only
    finally:
        worker.close()


def _note_each_deposit(event: LogEvent, rows: Rows) -> None:
    """A projection bug: every deposit appends a row under the account's key alone."""
    rows.put("deposit_notes", {"account_id": event.originator_id, "amount": event.data["amount"]})


NOTES = Table(
    "deposit_notes",
    (Column("account_id"), Column("amount", "bigint")),
    key=("account_id",),
    append_only=True,
)
REPEATS_KEYS = Projection(
    name="deposit_notes",
    version=1,
    tables=(NOTES,),
    handlers={event_type(Account.Deposited): _note_each_deposit},
)


def test_a_version_built_by_workers_whose_rows_repeat_a_key_stops_and_never_serves(
    pg_url: str,
) -> None:
    """Append-only rows get their key's index when the version is about to serve; rows that
    repeat a key stop the version there, with that reason, as the runner's would: the
    workers go on (the other projections serve), and the broken version never does."""
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(3)]
    for account in accounts * 2:
        ledger.deposit(account, 10)
    messages = of_partitions(Stream(1).publish(ledger), 0)
    ledger.close()
    worker = StreamApplier(
        pg_url,
        [*projections.ALL, REPEATS_KEYS],
        group="g",
        topic="t",
        partitions=1,
        writer="test",
    )
    try:
        worker.apply(messages)
        assert worker.store is not None
        catalog = VersionCatalog(worker.store)
        broken = catalog.version("deposit_notes", 1)
        assert broken is not None and broken.state is VersionState.STOPPED
        assert broken.error is not None and "writing its rows failed" in broken.error
        assert "bump its version" in broken.error  # resuming would stop it again
        assert catalog.active_version("deposit_notes") is None
        assert catalog.active_version("account_balances") == 1
    finally:
        worker.close()


def test_a_worker_drops_what_a_switch_left_behind_and_builds_keys_a_switch_left_out(
    pg_url: str,
) -> None:
    """A switch marks the replaced version's tables to drop and drops them after it
    commits; tables still being read stay, for the next writer to drop. A worker is such a
    writer: it drops what is left when it connects and, while some stay, after a batch when
    the retry is due. A serving version whose append-only tables have no key (switched by
    code that did not build keys) gets them when a worker connects."""
    ledger = open_ledger(pg_url)
    workload(ledger, 60)
    messages = of_partitions(Stream(1).publish(ledger), 0)
    ledger.close()
    old, new = ACCOUNT_STATEMENT, replace(ACCOUNT_STATEMENT, version=2)
    setup = open_store(pg_url)
    catalog = VersionCatalog(setup)
    catalog.ensure()
    catalog.register(old, owner="stream:g", topic="t", partitions=1)
    catalog.activate(old)
    catalog.register(new, owner="stream:g", topic="t", partitions=1)
    with setup.transaction():  # the switch as code that built no deferred keys left it
        setup.execute("UPDATE daybook_projection_versions SET state = 'live'"
                      " WHERE name = %s AND version = 2", (new.name,))  # fmt: skip
        setup.execute("UPDATE daybook_projection_versions SET state = 'retired', drop_pending = 1"
                      " WHERE name = %s AND version = 1", (new.name,))  # fmt: skip
    statement = STATEMENT.physical_name(1)
    assert not setup.has_unique_key(STATEMENT.physical_name(2))
    slow = psycopg.connect(pg_url, autocommit=True)
    slow.execute("BEGIN")
    slow.execute(f"SELECT count(*) FROM {statement}").fetchone()
    worker = StreamApplier(pg_url, [new], group="g", topic="t", partitions=1, writer="test")
    try:
        worker.apply(messages[:20])
        assert setup.has_unique_key(STATEMENT.physical_name(2))
        assert exists(setup, statement)  # still being read: left for later
        slow.close()
        worker.apply(messages[20:40])
        assert exists(setup, statement)  # not due yet
        worker.drops.clock = lambda: time.monotonic() + DROP_RETRY  # the retry is due
        worker.apply(messages[40:])
        assert not exists(setup, statement)
    finally:
        worker.close()
        slow.close()
        setup.close()


def test_a_version_the_group_built_serves_only_once_not_behind_the_runners_it_replaces(
    pg_url: str,
) -> None:
    """The runner follows version 1, which serves reads; the group builds version 2. The
    log moved on after a worker read its head, and the runner applied the new deposit: once
    the group's vector reached the head it had read, the switch served version 2 behind
    version 1, and reads went back (105 as of one position, then 100 as of an earlier
    one). Version 2 serves once the group has caught up with version 1."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 100)
    log = event_log_of(ledger)
    stream = Stream(1)
    first = stream.publish(ledger)
    heads = [stream.position]  # the head as a worker read it
    old, new = ACCOUNT_BALANCES, replace(ACCOUNT_BALANCES, version=2)
    runner = ProjectionRunner(log, pg_url, [old])
    worker = StreamApplier(
        pg_url, [new], group="g", topic="t", partitions=1, writer="test", head=lambda: heads[-1]
    )
    try:
        runner.run_until_caught_up()  # version 1 serves
        ledger.deposit(account, 5)  # the log moves on past the head the worker read
        runner.run_until_caught_up()
        with ReadModels(pg_url) as reads:
            served = reads.balance(account)
        assert served is not None and served.balance == 105
        worker.apply(first)  # every event up to the head it read is in
        with ReadModels(pg_url) as reads:
            after = reads.balance(account)
        assert after is not None and after.as_of_position >= served.as_of_position, (
            f"reads went back from {served.balance} as of {served.as_of_position}"
            f" to {after.balance} as of {after.as_of_position}"
        )
        assert worker.store is not None
        catalog = VersionCatalog(worker.store)
        assert catalog.active_version(old.name) == 1
        rest = stream.publish(ledger)
        heads.append(stream.position)
        worker.apply(rest)  # caught up with version 1: now it serves
        with ReadModels(pg_url) as reads:
            caught_up = reads.balance(account)
        assert catalog.active_version(old.name) == 2
        assert caught_up is not None and caught_up.balance == 105
        assert caught_up.as_of_position >= served.as_of_position
    finally:
        worker.close()
        runner.stop()
        ledger.close()


def exists(store: ReadStore, table: str) -> bool:
    return store.execute("SELECT to_regclass(%s)", (table,))[0][0] is not None


def _add_deposit(event: LogEvent, rows: Rows) -> None:
    key = (event.originator_id,)
    row = rows.get("deposit_totals", key) or {"account_id": event.originator_id, "total": 0}
    rows.put("deposit_totals", {**row, "total": row["total"] + event.data["amount"]})


def _add_deposit_but_not_13(event: LogEvent, rows: Rows) -> None:
    if event.data["amount"] == 13:
        raise ValueError("thirteen")
    _add_deposit(event, rows)


TOTALS = Table(
    "deposit_totals", (Column("account_id"), Column("total", "bigint")), key=("account_id",)
)
BUGGY_TOTALS = Projection(
    name="deposit_totals",
    version=1,
    tables=(TOTALS,),
    handlers={event_type(Account.Deposited): _add_deposit_but_not_13},
)
FIXED_TOTALS = replace(
    BUGGY_TOTALS, version=2, handlers={event_type(Account.Deposited): _add_deposit}
)


def test_an_event_parked_for_one_version_is_not_left_out_of_another_versions_reconcile(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The group parks an event its v1 cannot apply. v2 (the fix) is built by the runner
    with that event in and handed to the group: reconciling v2 folds the event too, so its
    table is clean, and a repair takes nothing out of it. ``stream status`` fails while a
    version in use lacks the events, and passes once the versions that lack them retired."""
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(3)]
    for amount in (10, 13, 7):
        for account in accounts:
            ledger.deposit(account, amount)
    log = event_log_of(ledger)
    messages = of_partitions(Stream(1).publish(ledger), 0)
    worker = StreamApplier(
        pg_url, [BUGGY_TOTALS], group="g", topic="t", partitions=1, writer="test"
    )
    try:
        result = worker.apply(messages)
    finally:
        worker.close()
    assert len(result.parked) == 3  # every deposit of 13
    assert reconcile(log, pg_url, BUGGY_TOTALS).clean  # v1 leaves them out, as the group did
    status = ["stream", "status", "--url", pg_url, "--group", "g", "--topic", "t"]
    assert main(status) == 1
    out, err = capsys.readouterr()
    assert "3 dead letter(s), 3 left out of versions not retired" in out
    assert "(deposit_totals:1)" in out and "daybook projections rebuild NAME" in err
    runner = ProjectionRunner(log, pg_url, [FIXED_TOTALS])
    runner.run_until_caught_up()
    runner.stop()
    handover(log, pg_url, [FIXED_TOTALS], "stream:g", topic="t", partitions=1,
             known=[BUGGY_TOTALS])  # fmt: skip
    report = reconcile(log, pg_url, FIXED_TOTALS, repair=True)
    assert report.clean, report.drifts
    # v1 retired when v2 took over reads: the letters are history, the group is healthy.
    assert main(status) == 0
    assert "3 dead letter(s), 0 left out of" in capsys.readouterr().out
    store = open_store(pg_url)
    try:
        totals = store.execute(f"SELECT total FROM {TOTALS.physical_name(2)}")
    finally:
        store.close()
        ledger.close()
    assert sorted(int(row[0]) for row in totals) == [30, 30, 30]


def test_an_event_one_projection_of_the_group_fails_on_is_applied_to_none_of_them(
    pg_url: str,
) -> None:
    """An event is applied to every projection of the group or to none: parked because
    deposit_totals fails on it, it is left out of account_balances too, which had already
    applied it when deposit_totals failed (its change is undone, not kept)."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("owner", "EUR").account_id
    for amount in (10, 13, 7):
        ledger.deposit(account, amount)
    log = event_log_of(ledger)
    messages = of_partitions(Stream(1).publish(ledger), 0)
    worker = StreamApplier(pg_url, [ACCOUNT_BALANCES, BUGGY_TOTALS], group="g", topic="t",
                           partitions=1, writer="w")  # fmt: skip
    try:
        assert len(worker.apply(messages).parked) == 1  # the deposit of 13
    finally:
        worker.close()
    views = ReadModels(pg_url)
    try:
        row = views.balance(account)
    finally:
        views.close()
    assert row is not None and row.balance == 10 + 7, row
    assert reconcile(log, pg_url, ACCOUNT_BALANCES).clean  # the group's fold leaves it out
    ledger.close()


def test_letters_parked_before_versions_were_recorded_count_for_every_version(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dead-letter table as older workers left it (no ``versions``): status and the
    reconciler read it as before, every letter open and left out of every version."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("owner", "EUR").account_id
    for amount in (10, 13):
        ledger.deposit(account, amount)
    messages = of_partitions(Stream(1).publish(ledger), 0)
    worker = StreamApplier(pg_url, [BUGGY_TOTALS], group="g", topic="t", partitions=1, writer="w")
    try:
        assert len(worker.apply(messages).parked) == 1
    finally:
        worker.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE daybook_stream_dead_letters DROP COLUMN versions")
    assert main(["stream", "status", "--url", pg_url, "--group", "g", "--topic", "t"]) == 1
    assert "1 dead letter(s), 1 left out of versions" in capsys.readouterr().out
    assert reconcile(event_log_of(ledger), pg_url, BUGGY_TOTALS).clean
    ledger.close()


def test_closed_dead_letters_are_deleted_after_their_retention_and_open_ones_stay(
    pg_url: str,
) -> None:
    """Each parked event is a row, envelope included: a handler that fails every event of
    a kind parks as many as the log brings. A letter stays while a version it was left out
    of is not retired (it says what the version lacks), and for ``letter_retention`` after
    it was parked; then a worker of the group deletes it (after a batch, at most every
    ``letter_purge_interval``: here after every batch)."""
    ledger = open_ledger(pg_url)
    accounts = _deposits(ledger, 40, (10, 13))
    log = event_log_of(ledger)
    stream = Stream(1)
    buggy = StreamApplier(pg_url, [BUGGY_TOTALS], group="g", topic="t", partitions=1, writer="w")
    try:
        parked = buggy.apply(of_partitions(stream.publish(ledger), 0)).parked
        buggy.mark_published(parked)  # as the worker does once they are on the topic
    finally:
        buggy.close()
    assert len(parked) == 40  # every deposit of 13
    later = datetime.now(UTC) + timedelta(days=31)
    letters = "SELECT count(*) FROM daybook_stream_dead_letters"
    store = open_store(pg_url)
    try:
        buggy = StreamApplier(
            pg_url, [BUGGY_TOTALS], group="g", topic="t", partitions=1, writer="w"
        )
        try:
            assert buggy.purge_letters(later) == 0  # v1 serves without them: open
        finally:
            buggy.close()
        assert store.execute(letters)[0][0] == 40
        runner = ProjectionRunner(log, pg_url, [FIXED_TOTALS])
        runner.run_until_caught_up()
        runner.stop()
        handover(log, pg_url, [FIXED_TOTALS], "stream:g", topic="t", partitions=1,
                 known=[BUGGY_TOTALS])  # fmt: skip
        fixed = StreamApplier(pg_url, [FIXED_TOTALS], group="g", topic="t", partitions=1,
                              writer="w", letter_purge_interval=0)  # fmt: skip
        try:
            ledger.deposit(accounts[0], 13)
            fixed.apply(of_partitions(stream.publish(ledger), 0))  # looks for closed letters
            assert store.execute(letters)[0][0] == 40  # closed, but within their retention
            assert fixed.purge_letters(later - timedelta(days=2)) == 0
        finally:
            fixed.close()
        fixed = StreamApplier(pg_url, [FIXED_TOTALS], group="g", topic="t", partitions=1,
                              writer="w", letter_retention=0,
                              letter_purge_interval=0)  # fmt: skip
        try:
            ledger.deposit(accounts[0], 13)
            fixed.apply(of_partitions(stream.publish(ledger), 0))
            assert store.execute(letters)[0][0] == 0
        finally:
            fixed.close()
    finally:
        store.close()
        ledger.close()


def test_status_of_a_group_that_wrote_nothing_here_says_so_and_fails(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt --group is not a group with nothing applied yet: ``stream status`` says no
    group of that name wrote anything here, names those that did, and exits 1. Before any
    group applied anything, a group of any name has nothing applied yet: exit 0."""
    ledger = open_ledger(pg_url)
    ledger.open_account("owner", "EUR")
    messages = of_partitions(Stream(1).publish(ledger), 0)
    ledger.close()
    status = ["stream", "status", "--url", pg_url, "--topic", "t", "--group"]
    assert main([*status, "orders"]) == 0  # a new deployment, its workers not started yet
    capsys.readouterr()
    worker = StreamApplier(pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="w")
    try:
        worker.apply(messages)
    finally:
        worker.close()
    assert main([*status, "g"]) == 0
    capsys.readouterr()
    assert main([*status, "gg"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.strip() == (
        "daybook: no stream group 'gg' has applied anything from topic 't' here "
        "(groups that have: g)"
    )


def test_status_reads_a_group_whose_read_models_have_a_database_of_their_own(
    pg_url: str, pg_admin_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Workers given --readmodels-url keep their progress and dead letters there, beside
    the rows: ``stream status`` given the same URL reads them there too."""
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    ledger = open_ledger(pg_url)
    ledger.open_account("owner", "EUR")
    messages = of_partitions(Stream(1).publish(ledger), 0)
    ledger.close()
    worker = StreamApplier(readmodels, projections.ALL, group="g", topic="t", partitions=1,
                           writer="w")  # fmt: skip
    try:
        worker.apply(messages)
        status = ["stream", "status", "--url", pg_url, "--readmodels-url", readmodels,
                  "--topic", "t", "--group", "g"]  # fmt: skip
        assert main(status) == 0
        out = capsys.readouterr().out
        assert "worker g partition 0: position 1 (complete to 1), 1 applied" in out
    finally:
        worker.close()
        services.drop_database(pg_admin_url, readmodels.rsplit("/", 1)[1])


def test_the_purge_deletes_only_closed_letters_and_a_bounded_number_after_a_batch(
    pg_url: str,
) -> None:
    """The purge runs after a batch, holding up the worker: each look deletes at most
    ``letter_batches`` transactions of ``letter_batch`` letters. A look that deletes that
    many makes the next one due after the next batch, so a backlog drains batch by batch;
    one that deletes fewer waits ``letter_purge_interval``. Letters it must not delete stay
    whatever their age: not yet on the dead-letter topic, parked by an older daybook (no
    versions: open for good), another group's or another topic's (theirs to delete)."""
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(40)]
    for account in accounts:
        ledger.deposit(account, 13)
    log = event_log_of(ledger)
    stream = Stream(1)
    buggy = StreamApplier(pg_url, [BUGGY_TOTALS], group="g", topic="t", partitions=1, writer="w")
    try:
        buggy.mark_published(buggy.apply(of_partitions(stream.publish(ledger), 0)).parked)
    finally:
        buggy.close()
    runner = ProjectionRunner(log, pg_url, [FIXED_TOTALS])
    runner.run_until_caught_up()
    runner.stop()
    handover(log, pg_url, [FIXED_TOTALS], "stream:g", topic="t", partitions=1,
             known=[BUGGY_TOTALS])  # fmt: skip
    store = open_store(pg_url)
    insert = (
        "INSERT INTO daybook_stream_dead_letters (group_id, topic, partition, position,"
        " kafka_offset, error, envelope, published, versions, parked_at)"
        " VALUES (%s, %s, 0, %s, 0, 'e', '', %s, %s, now() - interval '31 days')"
    )
    closed = ["deposit_totals:1"]
    letters = "SELECT group_id, topic, position FROM daybook_stream_dead_letters"
    try:
        keep = [
            ("g", "t", -1, False, closed),  # not yet on the dead-letter topic
            ("g", "t", -2, True, None),  # parked by an older daybook
            ("h", "t", 1, True, closed),  # another group's
            ("g", "u", 1, True, closed),  # another topic's
        ]
        store.executemany(insert, keep)
        store.execute(  # the group's closed letters, past their retention too
            "UPDATE daybook_stream_dead_letters SET parked_at = now() - interval '31 days'"
        )
        kept = [("g", "t", -2), ("g", "t", -1), ("g", "u", 1), ("h", "t", 1)]
        store.execute(f"DROP INDEX {PURGE_INDEX}")  # a table made before the index was
        fixed = StreamApplier(pg_url, [FIXED_TOTALS], group="g", topic="t", partitions=1,
                              writer="w", letter_purge_interval=0)  # fmt: skip
        fixed.letter_purge_interval = 3_600.0  # (built with 0: the first look is due at once)
        fixed.letter_batch, fixed.letter_batches = 7, 2
        try:
            left = []
            for _ in range(4):
                ledger.deposit(accounts[0], 10)
                assert fixed.apply(of_partitions(stream.publish(ledger), 0)).applied == 1
                left.append(len(store.execute(letters)))
            # 14 a look while looks delete 14; 12 (fewer), then an hour's wait: none.
            assert left == [26 + 4, 12 + 4, 4, 4]
            assert sorted(store.execute(letters)) == kept
            assert store.execute("SELECT to_regclass(%s)", (PURGE_INDEX,))[0][0] is not None
            store.execute(insert, ("g", "t", -3, True, closed))
            ledger.deposit(accounts[0], 10)
            fixed.apply(of_partitions(stream.publish(ledger), 0))
            assert len(store.execute(letters)) == 5  # closed, but the next look is not due
            assert fixed.purge_letters(batch=7, batches=10) == 1
        finally:
            fixed.close()
        assert sorted(store.execute(letters)) == kept
    finally:
        store.close()
        ledger.close()


def test_a_purge_that_fails_neither_fails_the_batch_nor_stops_the_worker(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The purge runs after the batch committed: its error must not come out of ``apply``,
    where the batch's messages, delivered again, would be skipped as duplicates (and the
    letters it parked never published), or stop the worker (a statement timeout, and the
    same again after each restart). It is logged once and tried again after the interval."""
    tries: list[object] = []

    def timing_out(store: ReadStore, *args: object) -> int:
        tries.append(args)
        with store.transaction():
            store.execute("SET LOCAL statement_timeout = 1")
            store.execute("SELECT pg_sleep(1)")
        return 0

    monkeypatch.setattr(worker_module, "purge_closed_letters", timing_out)
    ledger = open_ledger(pg_url)
    account = ledger.open_account("owner", "EUR").account_id
    stream = Stream(1)
    worker = StreamApplier(pg_url, [BUGGY_TOTALS], group="g", topic="t", partitions=1,
                           writer="w", letter_purge_interval=0)  # fmt: skip
    worker.letter_purge_interval = 3.0  # (built with 0: the first look is due at once)
    caplog.set_level(logging.INFO, logger="daybook.worker")
    try:
        batch = []
        for amount in (13, 13, 10):
            ledger.deposit(account, amount)
            batch.append(of_partitions(stream.publish(ledger), 0))
        first = worker.apply(batch[0])  # the purge fails after it
        assert len(first.parked) == 1 and first.applied == 1  # the 13; the account opened
        assert len(tries) == 1
        second = worker.apply(batch[1])  # applied (no duplicates), no look within the interval
        assert len(second.parked) == 1 and second.duplicates == 0
        assert len(tries) == 1
        time.sleep(worker.letter_purge_interval)
        third = worker.apply(batch[2])  # the next look, failing again
        assert third.applied == 1 and len(tries) == 2
        assert worker.supervisor.health().error is None
    finally:
        worker.close()
        ledger.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # not one per failing look
    assert "could not delete closed dead letters of group g" in warnings[0]
    assert "statement timeout" in warnings[0]


class _Explained:
    """A store that explains the statements it is given instead of running them."""

    def __init__(self, store: ReadStore) -> None:
        self.store = store
        self.plans: list[str] = []

    def transaction(self) -> AbstractContextManager[None]:
        return self.store.transaction()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        rows = self.store.execute(f"EXPLAIN {sql}", params)
        self.plans.append("\n".join(row[0] for row in rows))
        return []


def test_the_purge_reads_the_oldest_letters_from_its_index_not_all_of_them(pg_url: str) -> None:
    """Each purge transaction takes the group's oldest letters from ``PURGE_INDEX`` until
    it has its batch; read and sorted whole, a group's letters cost each transaction their
    number, and a backlog of them time quadratic in its size."""
    worker = StreamApplier(pg_url, [BUGGY_TOTALS], group="g", topic="t", partitions=1, writer="w")
    try:
        store = worker.connect()
        store.execute(
            "INSERT INTO daybook_stream_dead_letters (group_id, topic, partition, position,"
            " kafka_offset, error, envelope, published, versions, parked_at)"
            " SELECT g, 't', 0, n, n, 'e', '', true, ARRAY['deposit_totals:1'],"
            " now() - interval '40 days' + n * interval '1 ms'"
            " FROM generate_series(1, 50000) n, (VALUES ('g'), ('h')) AS groups (g)"
        )
        store.execute("ANALYZE daybook_stream_dead_letters")
        explained = _Explained(store)
        purge_closed_letters(explained, "g", "t", datetime.now(UTC), 1_000)  # type: ignore[arg-type]
    finally:
        worker.close()
    [plan] = explained.plans
    assert f"Index Scan using {PURGE_INDEX}" in plan, plan
    assert "Sort" not in plan, plan


def test_a_worker_started_with_another_partitioning_than_its_group_refuses(pg_url: str) -> None:
    """The group's vector was made for its topic and partition count (what its versions
    record): a worker started with another count (a missing --partitions, the default 8
    for a group of 4) would map events to other partitions, applying some again and
    skipping others. It refuses at start, naming both, and applies nothing."""
    ledger = open_ledger(pg_url)
    try:
        account = ledger.open_account("owner", "EUR").account_id
        ledger.deposit(account, 10)
        stream = Stream(4)
        group = unique("g")
        four = StreamApplier(pg_url, [projections.ACCOUNT_BALANCES], group=group, topic="t",
                             partitions=4, writer="four")  # fmt: skip
        eight = StreamApplier(pg_url, [projections.ACCOUNT_BALANCES], group=group, topic="t",
                              partitions=8, writer="eight")  # fmt: skip
        other = StreamApplier(pg_url, [projections.ACCOUNT_BALANCES], group=group, topic="u",
                              partitions=4, writer="other")  # fmt: skip
        try:
            four.apply(stream.publish(ledger))
            four.refuse_at_start()  # its own partitioning: nothing to refuse
            with pytest.raises(PartitioningMismatch, match="t with 4 partitions") as refused:
                eight.refuse_at_start()
            assert refused.value.code == "partitioning_mismatch"
            assert "t with 8 partitions" in str(refused.value)
            with pytest.raises(PartitioningMismatch, match="u with 4 partitions"):
                other.refuse_at_start()
        finally:
            for worker in (four, eight, other):
                worker.close()
    finally:
        ledger.close()


def test_a_worker_refuses_at_a_batch_a_version_handed_to_its_group_with_another_partitioning(
    pg_url: str,
) -> None:
    """A version handed to the group while its worker runs, recording another partition
    count (a group with nothing recorded takes the handover's --partitions): the worker's
    next batch refuses it, applying nothing, as a worker started then would at start."""
    ledger = open_ledger(pg_url)
    try:
        account = ledger.open_account("owner", "EUR").account_id
        ledger.deposit(account, 10)
        log = event_log_of(ledger)
        group = unique("g")
        worker = StreamApplier(pg_url, [projections.ACCOUNT_BALANCES], group=group,
                               topic="t", partitions=4, writer="four")  # fmt: skip
        try:
            worker.refuse_at_start()  # nothing recorded yet: nothing to refuse
            runner = ProjectionRunner(log, pg_url, [projections.ACCOUNT_BALANCES])
            runner.run_until_caught_up()
            runner.stop()
            handover(log, pg_url, [projections.ACCOUNT_BALANCES], f"stream:{group}",
                     topic="t", partitions=8)  # fmt: skip
            before = read_status(pg_url, group, "t")
            with pytest.raises(PartitioningMismatch, match="t with 8 partitions"):
                worker.apply(Stream(4).publish(ledger))
        finally:
            worker.close()
        assert read_status(pg_url, group, "t") == before
    finally:
        ledger.close()


def _relay_cursor(url: str, topic: str, partitions: int) -> None:
    """The cursor of a relay that publishes ``topic`` with ``partitions`` (in the event
    store, here beside the read models)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(relay_module._CREATE)
        conn.execute(
            f"INSERT INTO {relay_module.CURSOR_TABLE} (topic, position, partitions, chain,"
            " next_offsets) VALUES (%s, 0, %s, %s, %s)",
            (topic, partitions, [0] * partitions, [0] * partitions),
        )


@pytest.mark.parametrize(("published", "running"), [(2, 1), (1, 2)])
def test_a_new_groups_worker_with_another_partition_count_than_the_relay_refuses(
    pg_url: str, published: int, running: int
) -> None:
    """A rebuild through a new group (README: start workers with a new --group) has no
    version recording a count to compare a missing or wrong --partitions with. With fewer
    partitions than the topic, a first batch of partition 0 alone switched the version to
    serving before partition 1's events were in (a balance read answered "no such
    account"); with more, the extra partition never moved, and the version never served,
    silently. The relay's cursor says how many the topic has: the worker refuses at start
    and at its first batch, naming both counts, having registered and applied nothing."""
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(10)]
    for account in accounts:
        ledger.deposit(account, 100)
    messages = Stream(published).publish(ledger)
    head = ledger.head()
    ledger.close()
    _relay_cursor(pg_url, "t", published)
    worker = StreamApplier(
        pg_url, projections.ALL, group="rebuild", topic="t", partitions=running, writer="test"
    )
    try:
        with pytest.raises(PartitioningMismatch) as refused:
            worker.refuse_at_start()
        assert refused.value.code == "partitioning_mismatch"
        assert f"publishes topic 't' with {published} partitions" in str(refused.value)
        assert f"runs with {running}" in str(refused.value)
        assert f"--partitions {published}" in str(refused.value)
        with pytest.raises(PartitioningMismatch):
            worker.apply(of_partitions(messages, 0))
        assert worker.store is not None
        assert VersionCatalog(worker.store).versions() == []
    finally:
        worker.close()
    assert read_status(pg_url, "rebuild", "t") == []
    reads = ReadModels(pg_url)
    try:
        with pytest.raises(StaleRead):
            reads.balance(accounts[0], min_position=head, timeout=0.2)
    finally:
        reads.close()


def test_a_worker_refuses_a_message_of_a_partition_past_its_count(pg_url: str) -> None:
    """Without a relay cursor to compare with (none published yet, say), a message of a
    partition at or past the worker's count still shows that the topic has more: the
    worker's vector would leave that partition out (the version served too early, and a
    handover to the runner applied its events again). The batch is refused, applying
    nothing."""
    ledger = open_ledger(pg_url)
    for n in range(10):
        ledger.deposit(ledger.open_account(f"owner-{n}", "EUR").account_id, 100)
    messages = Stream(2).publish(ledger)
    ledger.close()
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    try:
        with pytest.raises(PartitioningMismatch, match="partition 1 of topic 't'") as refused:
            worker.apply(messages)
        assert "runs with 1 partition" in str(refused.value)
    finally:
        worker.close()
    assert read_status(pg_url, "g", "t") == []
    store = open_store(pg_url)
    try:
        catalog = VersionCatalog(store)
        catalog.ensure()
        assert catalog.versions() == []
    finally:
        store.close()


def _run_with_one_partition_recorded(pg_url: str) -> tuple[Any, int]:
    """A group whose versions record 1 partition (its workers' --partitions, before they
    compared it with the relay's) while the relay publishes 2, and whose partition 1 is
    ahead of partition 0 (partitions move independently): the ledger, and its head."""
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(10)]
    for account in accounts:
        ledger.deposit(account, 100)
    messages = Stream(2).publish(ledger)
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=2, writer="test"
    )
    try:
        worker.apply(of_partitions(messages, 1))  # partition 1: everything
        worker.apply(of_partitions(messages, 0)[:1])  # partition 0: its first event only
    finally:
        worker.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE daybook_projection_versions SET partitions = 1 WHERE owner = 'stream:g'"
        )
    return ledger, ledger.head()


def test_a_group_recorded_with_fewer_partitions_than_the_relays_goes_to_the_runner_on_its_count(
    pg_url: str,
) -> None:
    """Converted for the count the versions record, the handover to the runner took
    partition 0's position for the whole group's, and the runner applied every event of
    partition 1 after it again: deposits counted twice. The progress rows follow the
    topic's partitions, which the relay's cursor counts: the checkpoint is converted for
    those."""
    ledger, _ = _run_with_one_partition_recorded(pg_url)
    log = event_log_of(ledger)
    try:
        handover(log, pg_url, projections.ALL, "runner", topic="t", published=2)
        runner = ProjectionRunner(log, pg_url, projections.ALL)
        runner.run_until_caught_up()
        runner.stop()
        drifts = [d for p in projections.ALL for d in reconcile(log, pg_url, p).drifts]
    finally:
        ledger.close()
    assert drifts == [], drifts[:3]


def test_a_group_with_progress_past_its_recorded_partitions_is_not_handed_to_the_runner_blind(
    pg_url: str,
) -> None:
    """With no relay cursor to say how many partitions the topic has, progress rows past
    the count the versions record show that count is wrong, and nothing tells the right
    one: the handover is refused, changing nothing."""
    ledger, _ = _run_with_one_partition_recorded(pg_url)
    log = event_log_of(ledger)
    try:
        with pytest.raises(HandoverRefused, match="progress rows for 2 partitions") as refused:
            handover(log, pg_url, projections.ALL, "runner", topic="t")
        assert "v1 records 1 (the workers')" in str(refused.value)
        store = open_store(pg_url)
        try:
            owners = {r.owner for r in VersionCatalog(store).versions()}
        finally:
            store.close()
        assert owners == {"stream:g"}
    finally:
        ledger.close()


def test_a_worker_whose_code_lacks_a_version_its_group_writes_applies_nothing(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The group's partition progress is one checkpoint for every version it owns. v2 of a
    projection is built by the runner and handed to the group while a worker still runs the
    code of v1 (and of another projection the group owns): it must not apply a batch to the
    other projection alone and move the group past events v2 never got. It refuses, the
    status says why, and a worker with the new code applies the batch to both."""
    fixed = FIXED_TOTALS
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(3)]
    for account in accounts:
        ledger.deposit(account, 10)
    log = event_log_of(ledger)
    stream = Stream(1)
    old_code = [projections.ACCOUNT_BALANCES, BUGGY_TOTALS]
    old = StreamApplier(pg_url, old_code, group="g", topic="t", partitions=1, writer="old")
    new = StreamApplier(pg_url, [projections.ACCOUNT_BALANCES, fixed], group="g", topic="t",
                        partitions=1, writer="new")  # fmt: skip
    try:
        old.apply(stream.publish(ledger))
        runner = ProjectionRunner(log, pg_url, [fixed])
        runner.run_until_caught_up()
        runner.stop()
        handover(log, pg_url, [fixed], "stream:g", topic="t", partitions=1,
                 known=[BUGGY_TOTALS])  # fmt: skip
        for account in accounts:
            ledger.deposit(account, 5)
        later = stream.publish(ledger)
        with pytest.raises(CodeLacksVersion, match="deposit_totals v2"):
            old.apply(later)
        assert main(["projections", "status", "--url", pg_url]) == 1
        assert "a worker of stream:g (old) stopped" in capsys.readouterr().out
        with pytest.raises(CodeLacksVersion):  # and says so at start, before joining
            old.refuse_at_start()
        new.apply(later)
        assert reconcile(log, pg_url, fixed).clean
        assert reconcile(log, pg_url, projections.ACCOUNT_BALANCES).clean
        assert main(["projections", "status", "--url", pg_url]) == 0  # followed again
    finally:
        old.close()
        new.close()
        ledger.close()


def test_a_group_is_not_handed_a_second_version_of_a_projection_it_writes(pg_url: str) -> None:
    """No worker's code defines two versions of one projection, and a worker refuses to run
    while its group writes one its code does not define: a group writing v1 of a projection
    that is handed v2 still rebuilding (before its switch retired v1) would have no worker
    left, old code or new. The handover refuses, changes nothing, and the group goes on."""
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(3)]
    for account in accounts:
        ledger.deposit(account, 10)
    log = event_log_of(ledger)
    stream = Stream(1)
    old = StreamApplier(pg_url, [projections.ACCOUNT_BALANCES, BUGGY_TOTALS], group="g",
                        topic="t", partitions=1, writer="old")  # fmt: skip
    store = open_store(pg_url)
    try:
        old.apply(stream.publish(ledger))
        with store.transaction():
            VersionCatalog(store).register(FIXED_TOTALS)  # the runner's, not switched yet
        with pytest.raises(HandoverRefused, match="deposit_totals v1"):
            handover(log, pg_url, [FIXED_TOTALS], "stream:g", topic="t", partitions=1,
                     known=[BUGGY_TOTALS])  # fmt: skip
        record = VersionCatalog(store).version("deposit_totals", 2)
        assert record is not None and record.owner == "runner"
        for account in accounts:
            ledger.deposit(account, 5)
        old.apply(stream.publish(ledger))  # the group still has its worker
        assert reconcile(log, pg_url, BUGGY_TOTALS).clean
    finally:
        store.close()
        old.close()
        ledger.close()


def test_a_worker_with_newer_code_than_its_groups_version_is_told_to_switch_it_first(
    pg_url: str,
) -> None:
    """Workers given the code of v2 while the group still writes v1 (v2 being rebuilt by
    the runner) refuse: they would leave v1, which serves reads, behind. Deploying newer
    code cannot help them; the refusal says what does."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("owner", "EUR").account_id
    ledger.deposit(account, 10)
    stream = Stream(1)
    old = StreamApplier(pg_url, [BUGGY_TOTALS], group="g", topic="t", partitions=1,
                        writer="old")  # fmt: skip
    new = StreamApplier(pg_url, [FIXED_TOTALS], group="g", topic="t", partitions=1,
                        writer="new")  # fmt: skip
    store = open_store(pg_url)
    try:
        old.apply(stream.publish(ledger))
        with store.transaction():
            VersionCatalog(store).register(FIXED_TOTALS)  # the runner's, not switched yet
        with pytest.raises(CodeLacksVersion, match="deposit_totals v1") as refused:
            new.refuse_at_start()
    finally:
        store.close()
        old.close()
        new.close()
        ledger.close()
    message = str(refused.value)
    assert "deploy the new code" not in message
    assert "daybook projections rebuild deposit_totals" in message


def test_closed_letters_of_groups_left_behind_by_rebuilds_go_too(pg_url: str) -> None:
    """The README's rebuild through the stream: bump the version, start workers with a new
    ``--group``. The old group never runs again; its letters are closed (every version they
    name is retired) and past their retention, but only a worker of that group deleted
    them, so they stayed for good. A worker now purges every group's closed letters."""
    ledger = open_ledger(pg_url)
    _deposits(ledger, 20, (10, 13))
    store = open_store(pg_url)
    letters_after, progress_after = [], []
    rebuilds = 4
    try:
        for version in range(1, rebuilds + 1):
            projection = replace(BUGGY_TOTALS, version=version)
            stream = Stream(2)  # a new group reads the topic from the earliest offset
            worker = StreamApplier(
                pg_url,
                [projection],
                group=f"g{version}",
                topic="t",
                partitions=2,
                writer="w",
                letter_retention=0,
                letter_purge_interval=0,
            )
            try:
                result = worker.apply(stream.publish(ledger))
                worker.mark_published(result.parked)
                # the new group looks for closed letters 1 year on (retention 0 here anyway)
                worker.purge_letters(datetime.now(UTC) + timedelta(days=365))
            finally:
                worker.close()
            assert VersionCatalog(store).active_version("deposit_totals") == version
            letters_after.append(
                store.execute("SELECT count(*) FROM daybook_stream_dead_letters")[0][0]
            )
            progress_after.append(
                store.execute("SELECT count(*) FROM daybook_stream_progress")[0][0]
            )
        retired_groups = store.execute(
            "SELECT count(*) FROM daybook_stream_dead_letters WHERE group_id <> %s",
            (f"g{rebuilds}",),
        )[0][0]
    finally:
        store.close()
        ledger.close()
    # Only the serving group's 20 open letters stay (and each group's progress rows: a
    # worker started again in a group that consumed events must be refused, not start
    # over from the group's committed offsets).
    assert letters_after == [20] * rebuilds, letters_after
    assert retired_groups == 0, (
        f"closed letters of abandoned groups never deleted: {retired_groups}; "
        f"letters per rebuild {letters_after}, progress rows {progress_after}"
    )


#: Withdrawal totals that count deposits too: every event reads its account's row.
WITHDRAWAL_TOTALS = replace(
    FAILS_DEPOSITS,
    name="money_totals",
    handlers={**FAILS_DEPOSITS.handlers, event_type(Account.Deposited): _add_withdrawal},
)


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ("lock_timeout", psycopg.errors.LockNotAvailable),
        ("statement_timeout", psycopg.errors.QueryCanceled),
    ],
)
def test_a_handlers_read_that_fails_fails_the_batch_and_parks_nothing(
    pg_admin_url: str,
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
    setting: str,
    refusal: type[psycopg.Error],
) -> None:
    """A read a handler makes (a row not cached) that the database refuses (a lock not
    granted within the role's or database's ``lock_timeout``, a statement cancelled by its
    ``statement_timeout``) was taken for a bad event: retried in a transaction the database
    had aborted, parked, and the letter's INSERT then failed for good, stopping the worker.
    It is the batch's failure: raised as it is (retried as an outage), nothing parked, and
    the batch goes through once the lock is released."""
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        name = readmodels.rsplit("/", 1)[1].split("?")[0]
        admin.execute(f'ALTER DATABASE "{name}" SET {setting} = 500')
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"o{n}", "EUR").account_id for n in range(5)]
    for account in accounts:
        ledger.deposit(account, 10)
    stream = Stream(1)
    worker = StreamApplier(
        readmodels,
        [WITHDRAWAL_TOTALS],
        group="g",
        topic="t",
        partitions=1,
        writer="w",
        cache_limit=0,
    )
    holder = psycopg.connect(readmodels)
    caplog.set_level(logging.INFO, logger="daybook.worker")
    try:
        worker.apply(stream.publish(ledger))
        for account in accounts:
            ledger.deposit(account, 7)
        second = stream.publish(ledger)
        holder.execute("LOCK TABLE rm_withdrawal_totals_v1 IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(refusal) as failed:
            worker.apply(second)
        assert is_transient(failed.value)
        holder.rollback()
        worker.close()  # as the worker does after a failed batch
        result = worker.apply(second)
        assert result.parked == [] and result.applied == len(accounts)
    finally:
        holder.close()
        worker.close()
        ledger.close()
    assert not [r for r in caplog.records if "parked event" in r.getMessage()]
    store = open_store(readmodels)
    try:
        rows = store.execute("SELECT count(*) FROM daybook_stream_dead_letters")
    finally:
        store.close()
    assert rows[0][0] == 0


def test_each_worker_start_writes_under_a_name_of_its_own() -> None:
    """A worker keeps its cached rows while its partitions' progress names it as their
    last writer. Named ``host:pid``, two containers on the host's network (each pid 1)
    shared one name: each took the other's writes for its own, and wrote a balance from
    the row it had cached before the other's deposit (110 where 160 was due)."""
    from daybook.infrastructure.streaming.app import writer_name

    first, second = writer_name(), writer_name()
    assert first != second
    assert first.rsplit(":", 1)[0] == second.rsplit(":", 1)[0]  # host:pid, for people


def test_a_letter_parked_by_a_batch_whose_step_after_the_commit_failed_is_reported(
    pg_url: str,
) -> None:
    """The batch committed the letter's row, then its next step (the switch check of a
    version the group builds) met a dropped connection: the batch raised, its retry found
    the messages applied already (duplicates: nothing parked), and the letter was never
    published. The step's outage now leaves the committed batch's result as it is."""
    from daybook.infrastructure.streaming.progress import read_dead_letters
    from daybook.infrastructure.urls import postgres_params
    from tests.streaming.test_faults import insert_poison

    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 100)
    insert_poison(ledger)  # a deposit to an account never opened: every attempt fails
    ledger.deposit(account, 5)
    messages = Stream(1).publish(ledger)
    head = ledger.head()
    dropped: list[int] = []

    def head_after_losing_the_connection() -> int:
        if not dropped:
            assert worker.store is not None
            ((pid,),) = worker.store.execute("SELECT pg_backend_pid()")
            with psycopg.connect(postgres_params(pg_url).conninfo(), autocommit=True) as c:
                c.execute("SELECT pg_terminate_backend(%s)", (pid,))
            dropped.append(pid)
        return head

    worker = StreamApplier(
        pg_url, [ACCOUNT_BALANCES], group="g", topic="t", partitions=1, writer="test",
        head=head_after_losing_the_connection,
    )  # fmt: skip
    parked = []
    try:
        for _ in range(3):  # as the agent does: close, back off, the same batch again
            try:
                parked = worker.apply(messages).parked
                break
            except Exception as error:
                assert is_transient(error), error
                worker.close()
        letters = read_dead_letters(pg_url, "g", "t")
    finally:
        worker.close()
        ledger.close()
    assert dropped and len(letters) == 1
    assert [letter.position for letter in parked] == [letters[0]["position"]]
