"""One owner per checkpoint: the in-process runner (a log position) or one stream group (a
partition vector). Writers refuse what they do not own, the handover converts a checkpoint
without applying an event twice or skipping one, and a stream version's position is honest."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from daybook import Ledger, open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.handover import handover
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.queries import ReadModels
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.worker import StreamApplier
from tests.projections.helpers import assert_tables_match, stored_rows, workload
from tests.streaming.messages import Stream, of_partitions

pytestmark = pytest.mark.postgres

GROUP, TOPIC = "g", "events"


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


def applier(url: str, partitions: int = 4) -> StreamApplier:
    return StreamApplier(
        url, projections.ALL, group=GROUP, topic=TOPIC, partitions=partitions, writer="test"
    )


def snapshot(url: str) -> tuple[dict[str, object], list[tuple[object, ...]]]:
    tables = {p.name: stored_rows(url, p) for p in projections.ALL}
    store = open_store(url)
    try:
        catalog = [
            (r.name, r.version, r.state, r.position) for r in VersionCatalog(store).versions()
        ]
    finally:
        store.close()
    return tables, catalog


def test_workers_refuse_versions_the_runner_owns_and_change_nothing(
    ledger: Ledger, pg_url: str
) -> None:
    workload(ledger, 120)
    runner = ProjectionRunner(event_log_of(ledger), pg_url, projections.ALL)
    runner.run_until_caught_up()
    runner.stop()
    before = snapshot(pg_url)
    worker = applier(pg_url)
    try:
        with pytest.raises(Exception, match="handover") as refused:
            worker.apply(Stream(4).publish(ledger))
    finally:
        worker.close()
    message = str(refused.value)
    assert "runner" in message
    assert "daybook projections handover account_balances --to stream:g" in message
    assert getattr(refused.value, "code", None) == "not_owner"
    assert snapshot(pg_url) == before


def uneven(ledger: Ledger, url: str) -> list[object]:
    """Stream versions whose partitions stand at different positions: 0 and 1 applied
    through, 2 half-way, 3 not at all."""
    messages = Stream(4).publish(ledger)
    two = of_partitions(messages, 2)
    worker = applier(url)
    try:
        worker.apply(of_partitions(messages, 0, 1))
        worker.apply(two[: len(two) // 2])
    finally:
        worker.close()
    return messages  # type: ignore[return-value]


def test_a_runner_leaves_a_stream_version_alone_until_it_is_handed_over(
    ledger: Ledger, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    workload(ledger, 200)
    uneven(ledger, pg_url)
    before = snapshot(pg_url)
    caplog.set_level(logging.WARNING, logger="daybook")
    runner = ProjectionRunner(event_log_of(ledger), pg_url, projections.ALL)
    runner.run_until_caught_up()
    workload(ledger, 10, seed=4)
    runner.run_until_caught_up()
    assert snapshot(pg_url) == before  # refused: not its checkpoint
    names = [p.name for p in projections.ALL]
    # It says so once per version, naming the owner and the command that hands it over.
    told = [r.getMessage() for r in caplog.records if "leaves it alone" in r.getMessage()]
    assert len(told) == len(names), told
    for projection in projections.ALL:
        name = projection.name
        (line,) = [t for t in told if t.startswith(f"projection {name} v{projection.version} ")]
        assert f"owned by stream:{GROUP}" in line
        assert f"daybook projections handover {name} --to runner" in line
    handover = ["projections", "handover", *names, "--to", "runner", "--url", pg_url]
    assert main([*handover, "--topic", TOPIC, "--partitions", "4"]) == 0
    workload(ledger, 60, seed=5)
    runner.run_until_caught_up()
    runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, pg_url, projection)


def test_reconcile_checks_a_healthy_stream_version_at_its_vector(
    ledger: Ledger, pg_url: str
) -> None:
    workload(ledger, 200)
    uneven(ledger, pg_url)
    before = snapshot(pg_url)
    for projection in projections.ALL:
        report = reconcile(event_log_of(ledger), pg_url, projection)
        assert report.clean, [d.describe() for d in report.drifts]
    assert main(["reconcile", "--url", pg_url, "--repair"]) == 0
    assert snapshot(pg_url) == before


def test_idle_partitions_do_not_hold_back_a_stream_version(ledger: Ledger, pg_url: str) -> None:
    accounts = [ledger.open_account(f"o{i}", "EUR").account_id for i in range(3)]
    for n in range(30):
        ledger.deposit(accounts[n % 3], 10 + n)
    stream = Stream(8)
    messages = stream.publish(ledger)
    used = {m.partition for m in messages if not envelope.decode(m.value).is_mark}
    assert len(used) <= 3  # five or more of the eight partitions are idle
    worker = applier(pg_url, partitions=8)
    try:
        worker.apply(messages)
    finally:
        worker.close()
    head = ledger.head()
    with ReadModels(pg_url, log=event_log_of(ledger)) as views:
        row = views.balance(accounts[0], min_position=head, timeout=2.0)
        assert row is not None and row.as_of_position == head and row.lag_events == 0


def test_projections_handed_to_a_group_one_at_a_time_and_back_apply_each_event_once(
    ledger: Ledger, pg_url: str
) -> None:
    ids = workload(ledger, 150)
    stream = Stream(4)
    runner = ProjectionRunner(event_log_of(ledger), pg_url, projections.ALL)
    runner.run_until_caught_up()
    options = ["--url", pg_url, "--topic", TOPIC, "--partitions", "4"]
    to_group = ["--to", f"stream:{GROUP}", *options]
    assert main(["projections", "handover", "account_balances", *to_group]) == 0
    worker = applier(pg_url)
    try:
        worker.apply(of_partitions(stream.publish(ledger), 0, 2))  # the group moves ahead
        workload(ledger, 80, seed=2, accounts=ids)
        runner.run_until_caught_up()  # the runner goes on with the other three
        # The runner's position converts to partitions ahead of the group's in 1 and 3, behind
        # in 0 and 2: the group's own version is brought up too.
        assert main(["projections", "handover", "account_statement", *to_group]) == 0
        worker.apply(stream.publish(ledger))  # everything, repeats included
    finally:
        worker.close()
    workload(ledger, 40, seed=3, accounts=ids)
    back = ["--to", "runner", *options]
    assert main(["projections", "handover", "account_balances", "account_statement", *back]) == 0
    runner.run_until_caught_up()
    runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, pg_url, projection)


def test_workers_whose_code_is_older_than_the_serving_version_say_so(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from daybook.infrastructure.readmodels.rebuild import rebuild
    from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2

    workload(ledger, 80)
    stream = Stream(4)
    worker = applier(pg_url)
    try:
        worker.apply(stream.publish(ledger))  # the group builds version 1, which serves
        rebuild(event_log_of(ledger), pg_url, ACCOUNT_BALANCES_V2, progress=False)
        workload(ledger, 20, seed=4)
        worker.apply(stream.publish(ledger))  # version 1 is retired: it cannot follow 2
    finally:
        worker.close()
    capsys.readouterr()
    assert main(["projections", "status", "--url", pg_url]) == 1
    assert "cannot follow account_balances version 2" in capsys.readouterr().out


def test_a_runner_neither_builds_keys_for_nor_stops_a_version_handed_away(
    ledger: Ledger, pg_url: str
) -> None:
    """The runner built account_statement v1 without switching it, and the version was then
    handed to a stream group. The runner, still holding its slot, reaches the head: it
    must leave the group's version alone, not build its key (a build that finds appended
    rows repeating a key would stop the group's version with the runner's reason)."""
    workload(ledger, 40)
    log = event_log_of(ledger)
    runner = ProjectionRunner(log, pg_url, [projections.ACCOUNT_STATEMENT], switch=False)
    runner.run_until_caught_up()
    handover(log, pg_url, [projections.ACCOUNT_STATEMENT], "stream:g", topic=TOPIC, partitions=4)
    table = projections.ACCOUNT_STATEMENT.tables[0].physical_name(1)
    store = open_store(pg_url)
    try:
        store.execute(f"INSERT INTO {table} SELECT * FROM {table} LIMIT 1")  # a repeated key
        runner.switch = True
        runner.step()
        record = VersionCatalog(store).version("account_statement", 1)
        assert record is not None
        assert (record.owner, record.state.value, record.error) == ("stream:g", "rebuilding", None)
        assert not store.has_unique_key(table)
    finally:
        store.close()
        runner.stop()


def test_every_query_of_a_stream_version_says_when_it_may_include_later_events(
    ledger: Ledger, pg_url: str
) -> None:
    ids = workload(ledger, 60)
    stream = Stream(4)
    worker = applier(pg_url)
    try:
        worker.apply(stream.publish(ledger))  # caught up: the group's versions serve
        workload(ledger, 60, seed=2, accounts=ids)
        later = stream.publish(ledger)
        events = [m for m in later if not envelope.decode(m.value).is_mark]
        worker.apply(of_partitions(later, events[-1].partition))  # one runs ahead to the head
    finally:
        worker.close()
    balances = projections.ACCOUNT_BALANCES
    with ReadModels(pg_url, log=event_log_of(ledger)) as views:
        one = views.balance(ids[0])
        assert one is not None and one.includes_later  # what the single-row reads say
        many = views.balances()
        page = views.balance_page(limit=3)
        assert many.includes_later and page.includes_later
        assert all(b.includes_later for b in (*many.balances, *page.balances))
        assert views.rows(balances, "account_balances").includes_later
        assert views.count(balances, "account_balances").includes_later
        assert many.as_of_position == one.as_of_position < ledger.head()


def test_a_version_new_to_a_group_that_has_applied_events_is_refused_and_changes_nothing(
    ledger: Ledger, pg_url: str
) -> None:
    """Workers with a bumped version restarted in the same group would build it only from
    the group's committed offsets on, and serve it incomplete. They refuse it, with the two
    ways that build it whole; the version the group serves stays as it was. The second way
    (rebuild, then hand over) then works for the same group."""
    from tests.projections.test_rebuild_reconcile import ALL_V2

    workload(ledger, 80)
    stream = Stream(4)
    worker = applier(pg_url)
    try:
        worker.apply(stream.publish(ledger))  # the group builds version 1, which serves
    finally:
        worker.close()
    workload(ledger, 20, seed=4)
    later = stream.publish(ledger)  # what Kafka delivers after the group's offsets
    before = snapshot(pg_url)
    bumped = StreamApplier(pg_url, ALL_V2, group=GROUP, topic=TOPIC, partitions=4, writer="new")
    try:
        with pytest.raises(Exception, match="new --group") as refused:
            bumped.apply(later)
    finally:
        bumped.close()
    assert getattr(refused.value, "code", None) == "group_already_started"
    message = str(refused.value)
    assert "account_balances v2" in message
    assert "daybook projections rebuild account_balances" in message
    assert "daybook projections handover account_balances --to stream:g" in message
    assert snapshot(pg_url) == before

    from daybook.infrastructure.readmodels.rebuild import rebuild
    from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2

    log = event_log_of(ledger)
    rebuild(log, pg_url, ACCOUNT_BALANCES_V2, progress=False)
    handover(log, pg_url, [ACCOUNT_BALANCES_V2], f"stream:{GROUP}", topic=TOPIC, partitions=4,
             known=ALL_V2)  # fmt: skip
    bumped = StreamApplier(pg_url, ALL_V2, group=GROUP, topic=TOPIC, partitions=4, writer="new")
    try:
        bumped.apply(later)
    finally:
        bumped.close()
    for projection in ALL_V2:
        assert_tables_match(ledger, pg_url, projection)


def test_a_handover_to_a_group_never_moves_the_position_readers_see_back(
    ledger: Ledger, pg_url: str
) -> None:
    """The runner has applied every event up to the head; the last ones went to one
    partition. Handed to a group that owns nothing yet, the version still answers as of the
    head: every partition has every event up to it, whether its own last one is earlier."""
    ids = [ledger.open_account(f"owner{n}", "EUR").account_id for n in range(8)]
    receipt = ledger.deposit(ids[0], 10)
    log = event_log_of(ledger)
    runner = ProjectionRunner(log, pg_url, [projections.ACCOUNT_BALANCES])
    runner.run_until_caught_up()
    runner.stop()
    with ReadModels(pg_url, log=log) as views:
        assert views.position("account_balances") == receipt.position == ledger.head()
        handed = handover(
            log, pg_url, [projections.ACCOUNT_BALANCES], f"stream:{GROUP}", topic=TOPIC,
            partitions=4,
        )  # fmt: skip
        assert [h.position for h in handed] == [receipt.position]
        assert views.position("account_balances") == receipt.position
        row = views.balance(ids[0], min_position=receipt.position, timeout=0.0)
        assert row is not None and row.balance == 10 and row.as_of_position == receipt.position
    # The group's workers go on from there: nothing applied twice, nothing skipped.
    workload(ledger, 40, accounts=ids)
    worker = StreamApplier(
        pg_url, [projections.ACCOUNT_BALANCES], group=GROUP, topic=TOPIC, partitions=4,
        writer="test",
    )  # fmt: skip
    try:
        worker.apply(Stream(4).publish(ledger))
    finally:
        worker.close()
    assert_tables_match(ledger, pg_url, projections.ACCOUNT_BALANCES)
    with ReadModels(pg_url, log=log) as views:
        assert views.position("account_balances") == ledger.head()


def test_a_worker_left_owning_nothing_by_a_rebuild_names_the_version_that_replaced_it(
    ledger: Ledger, pg_url: str
) -> None:
    """The group owned account_balances v1 only (the other projections are the runner's). A
    rebuild with newer code builds v2, the runner's, and retires v1: the group's workers
    are left owning nothing, and the refusal names v2 and the handover that gives it to
    them (it named the first of the runner's projections, which is not theirs to take)."""
    from daybook.infrastructure.readmodels.checkpoints import NotOwner
    from daybook.infrastructure.readmodels.rebuild import rebuild
    from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2

    ids = workload(ledger, 40)
    others = [p for p in projections.ALL if p is not projections.ACCOUNT_BALANCES]
    runner = ProjectionRunner(event_log_of(ledger), pg_url, others)
    runner.run_until_caught_up()
    runner.stop()
    stream = Stream(1)
    worker = applier(pg_url, partitions=1)
    try:
        worker.apply(stream.publish(ledger))  # the group builds account_balances v1
        rebuild(event_log_of(ledger), pg_url, ACCOUNT_BALANCES_V2, progress=False)
        workload(ledger, 10, seed=3, accounts=ids)
        with pytest.raises(NotOwner) as refused:
            worker.apply(stream.publish(ledger))
    finally:
        worker.close()
    assert "account_balances v2 is owned by runner" in str(refused.value)
    assert "handover account_balances --to stream:" in str(refused.value)


def test_a_worker_left_owning_nothing_by_a_rebuild_is_refused_at_start(
    ledger: Ledger, pg_url: str
) -> None:
    """As above, a worker (re)started after the rebuild: it says so at start, as it does
    when every version has another owner, rather than joining the group and running on in
    silence until an event comes."""
    from daybook.infrastructure.readmodels.checkpoints import NotOwner
    from daybook.infrastructure.readmodels.rebuild import rebuild
    from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2

    workload(ledger, 40)
    others = [p for p in projections.ALL if p is not projections.ACCOUNT_BALANCES]
    runner = ProjectionRunner(event_log_of(ledger), pg_url, others)
    runner.run_until_caught_up()
    runner.stop()
    worker = applier(pg_url, partitions=1)
    try:
        worker.apply(Stream(1).publish(ledger))  # the group builds account_balances v1
        worker.refuse_at_start()  # the group writes v1: nothing to refuse
        rebuild(event_log_of(ledger), pg_url, ACCOUNT_BALANCES_V2, progress=False)
        with pytest.raises(NotOwner) as refused:
            worker.refuse_at_start()
    finally:
        worker.close()
    assert "account_balances v2 is owned by runner" in str(refused.value)
    assert "handover account_balances --to stream:" in str(refused.value)


def recorded(url: str) -> tuple[object, ...]:
    """Everything a handover could change: the tables, the catalog (owners and partition
    counts included) and every stream group's progress rows."""
    from daybook.infrastructure.readmodels.checkpoints import PROGRESS_TABLE

    store = open_store(url)
    try:
        catalog = [
            (r.name, r.version, r.state, r.position, r.owner, r.topic, r.partitions, r.epoch)
            for r in VersionCatalog(store).versions()
        ]
        progress = store.execute(
            f"SELECT group_id, topic, partition, position, bound, state FROM {PROGRESS_TABLE}"
            " ORDER BY group_id, topic, partition"
        )
    finally:
        store.close()
    built = [projections.ACCOUNT_BALANCES, projections.ACCOUNT_STATEMENT]
    tables = {p.name: stored_rows(url, p) for p in built}
    return tables, catalog, [tuple(row) for row in progress]


def group_of_four(ledger: Ledger, url: str) -> tuple[list[object], Stream]:
    """account_statement built by the runner up to the head; account_balances owned by the
    group, whose workers run with 4 partitions and stand behind the runner."""
    ids = workload(ledger, 120)
    stream = Stream(4)
    worker = StreamApplier(
        url, [projections.ACCOUNT_BALANCES], group=GROUP, topic=TOPIC, partitions=4,
        writer="test",
    )  # fmt: skip
    try:
        worker.apply(stream.publish(ledger))
    finally:
        worker.close()
    workload(ledger, 60, seed=2, accounts=ids)
    runner = ProjectionRunner(event_log_of(ledger), url, [projections.ACCOUNT_STATEMENT])
    runner.run_until_caught_up()
    runner.stop()
    return ids, stream  # type: ignore[return-value]


def partitions_of(url: str, name: str) -> tuple[str, int | None]:
    store = open_store(url)
    try:
        record = VersionCatalog(store).version(name, 1)
    finally:
        store.close()
    assert record is not None
    return record.owner, record.partitions


def test_a_handover_without_partitions_takes_the_count_the_group_runs_with(
    ledger: Ledger, pg_url: str
) -> None:
    """The group's workers run with 4 partitions; the handover is run without --partitions
    (whose default is 8). It converts the runner's position for the group's 4 partitions,
    and the workers go on from there: nothing is applied twice (converted for 8, events
    went to the wrong partitions, and the workers applied some of them again)."""
    ids, stream = group_of_four(ledger, pg_url)
    command = ["projections", "handover", "account_statement", "--to", f"stream:{GROUP}"]
    assert main([*command, "--url", pg_url, "--topic", TOPIC]) == 0
    assert partitions_of(pg_url, "account_statement") == (f"stream:{GROUP}", 4)
    both = [projections.ACCOUNT_BALANCES, projections.ACCOUNT_STATEMENT]
    workload(ledger, 40, seed=3, accounts=ids)  # type: ignore[arg-type]
    worker = StreamApplier(
        pg_url, both, group=GROUP, topic=TOPIC, partitions=4, writer="test"
    )  # fmt: skip
    try:
        worker.apply(stream.publish(ledger))  # what Kafka delivers after the group's offsets
    finally:
        worker.close()
    for projection in both:
        assert_tables_match(ledger, pg_url, projection)


def test_a_handover_given_other_partitions_than_the_group_has_is_refused_and_changes_nothing(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from daybook.infrastructure.readmodels.handover import HandoverRefused

    group_of_four(ledger, pg_url)
    before = recorded(pg_url)
    capsys.readouterr()
    command = ["projections", "handover", "account_statement", "--to", f"stream:{GROUP}"]
    assert main([*command, "--url", pg_url, "--topic", TOPIC, "--partitions", "8"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith("daybook: ")
    assert "4 partitions" in err and "--partitions 8" in err
    assert "--partitions 4" in err  # what to do
    assert recorded(pg_url) == before
    with pytest.raises(HandoverRefused) as refused:
        handover(
            event_log_of(ledger), pg_url, [projections.ACCOUNT_STATEMENT], f"stream:{GROUP}",
            topic=TOPIC, partitions=2,
        )  # fmt: skip
    assert refused.value.code == "handover_refused"
    assert "4 partitions" in str(refused.value)
    assert recorded(pg_url) == before


def test_a_group_that_owns_nothing_any_more_must_be_given_its_count(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The group handed its only version to the runner: its progress rows only say it
    follows the topic with at least as many partitions as it has rows (an idle partition
    has none), so a handover back is refused without --partitions, and with fewer than it
    has rows, changing nothing; given the workers' 4, it goes through."""
    ids, stream = group_of_four(ledger, pg_url)
    options = ["--url", pg_url, "--topic", TOPIC]
    assert main(["projections", "handover", "account_balances", "--to", "runner", *options]) == 0
    names = ["account_balances", "account_statement"]
    before = recorded(pg_url)
    capsys.readouterr()
    assert main(["projections", "handover", *names, "--to", f"stream:{GROUP}", *options]) == 1
    assert "give --partitions N" in capsys.readouterr().err
    too_few = [*options, "--partitions", "2"]
    assert main(["projections", "handover", *names, "--to", f"stream:{GROUP}", *too_few]) == 1
    assert "progress rows for 4 partitions" in capsys.readouterr().err
    assert recorded(pg_url) == before
    four = [*options, "--partitions", "4"]
    assert main(["projections", "handover", *names, "--to", f"stream:{GROUP}", *four]) == 0
    assert partitions_of(pg_url, "account_balances") == (f"stream:{GROUP}", 4)
    assert partitions_of(pg_url, "account_statement") == (f"stream:{GROUP}", 4)
    both = [projections.ACCOUNT_BALANCES, projections.ACCOUNT_STATEMENT]
    workload(ledger, 40, seed=3, accounts=ids)  # type: ignore[arg-type]
    worker = StreamApplier(pg_url, both, group=GROUP, topic=TOPIC, partitions=4, writer="test")
    try:
        worker.apply(stream.publish(ledger))
    finally:
        worker.close()
    for projection in both:
        assert_tables_match(ledger, pg_url, projection)


def test_a_handover_to_a_group_with_nothing_recorded_takes_the_default_count(
    ledger: Ledger, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    workload(ledger, 30)
    runner = ProjectionRunner(event_log_of(ledger), pg_url, [projections.ACCOUNT_STATEMENT])
    runner.run_until_caught_up()
    runner.stop()
    monkeypatch.setenv("DAYBOOK_PARTITIONS", "3")
    command = ["projections", "handover", "account_statement", "--to", f"stream:{GROUP}"]
    assert main([*command, "--url", pg_url, "--topic", TOPIC]) == 0
    assert partitions_of(pg_url, "account_statement") == (f"stream:{GROUP}", 3)


def test_a_group_whose_versions_record_different_partitions_is_refused(
    ledger: Ledger, pg_url: str
) -> None:
    """A group whose versions disagree (a handover before this check converted one for
    another count): which count its workers run with is unknown, so nothing is guessed."""
    from daybook.infrastructure.readmodels.handover import HandoverRefused

    group_of_four(ledger, pg_url)
    runner = ProjectionRunner(event_log_of(ledger), pg_url, [projections.INVENTORY_LEVELS])
    runner.run_until_caught_up()
    runner.stop()
    store = open_store(pg_url)
    try:
        with store.transaction():
            VersionCatalog(store).set_owner(
                "account_statement", 1, f"stream:{GROUP}", position=1, topic=TOPIC, partitions=8
            )
    finally:
        store.close()
    before = recorded(pg_url)
    with pytest.raises(HandoverRefused, match="different partition counts") as refused:
        handover(
            event_log_of(ledger), pg_url, [projections.INVENTORY_LEVELS], f"stream:{GROUP}",
            topic=TOPIC,
        )  # fmt: skip
    assert "account_balances v1: 4" in str(refused.value)
    assert "account_statement v1: 8" in str(refused.value)
    assert recorded(pg_url) == before


def test_a_handover_to_a_group_standing_behind_the_runner_keeps_the_position_readers_see(
    ledger: Ledger, pg_url: str
) -> None:
    """The runner's version is at the head; the group owns another version, behind. Handed
    to the group, the version still answers as of the head (the group's version is brought
    there too), and the group's workers go on from there."""
    ids, stream = group_of_four(ledger, pg_url)
    log = event_log_of(ledger)
    with ReadModels(pg_url, log=log) as views:
        head = ledger.head()
        assert views.position("account_statement") == head
        assert views.position("account_balances") < head
        command = ["projections", "handover", "account_statement", "--to", f"stream:{GROUP}"]
        assert main([*command, "--url", pg_url, "--topic", TOPIC, "--partitions", "4"]) == 0
        assert views.position("account_statement") == head
        assert views.position("account_balances") == head
    both = [projections.ACCOUNT_BALANCES, projections.ACCOUNT_STATEMENT]
    workload(ledger, 40, seed=3, accounts=ids)  # type: ignore[arg-type]
    worker = StreamApplier(pg_url, both, group=GROUP, topic=TOPIC, partitions=4, writer="test")
    try:
        worker.apply(stream.publish(ledger))
    finally:
        worker.close()
    for projection in both:
        assert_tables_match(ledger, pg_url, projection)
    with ReadModels(pg_url, log=log) as views:
        assert views.position("account_statement") == ledger.head()


def test_a_handover_of_versions_the_group_owns_already_changes_nothing(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    group_of_four(ledger, pg_url)
    before = recorded(pg_url)
    capsys.readouterr()
    command = ["projections", "handover", "account_balances", "--to", f"stream:{GROUP}"]
    assert main([*command, "--url", pg_url, "--topic", TOPIC]) == 0
    assert capsys.readouterr().out == f"account_balances v1: already owned by stream:{GROUP}\n"
    assert recorded(pg_url) == before
