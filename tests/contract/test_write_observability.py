"""The write side seen from outside: ``/metrics`` after known work, and the commit's span.

Metrics live in one process-wide registry, so each test scrapes ``exposition()`` before and
after its work and checks the differences.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from daybook import Ledger, open_async_ledger, open_ledger
from daybook.domain.accounts import Deposit, InsufficientFunds, SameAccount, Withdraw
from daybook.domain.errors import DomainError, InvalidAmount, InvalidRequest, InvalidSku
from daybook.infrastructure.ledger.application import outcome_label
from daybook.infrastructure.observability import metrics, tracing


def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``/metrics``, by name and labels."""
    text = metrics.exposition().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def delta(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    key = (name, frozenset(labels.items()))
    return scrape().get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(params=[True, False], ids=["group-commit", "direct"])
def ledger(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Ledger]:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", group_commit=request.param)
    yield ledger
    ledger.close()


def _known_work(ledger: Ledger) -> None:
    """1 account opened, 5 deposits, 2 refused withdrawals, 1 replayed deposit."""
    account = ledger.open_account("ada", "EUR").account_id
    assert account is not None
    for _ in range(4):
        ledger.deposit(account, 10)
    ledger.deposit(account, 10, request_id="d-1")
    for _ in range(2):
        with pytest.raises(InsufficientFunds):
            ledger.withdraw(account, 1000)
    assert ledger.deposit(account, 10, request_id="d-1").replayed


def _assert_known_work(before: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> None:
    commands = "daybook_commands_total"
    assert delta(before, commands, command="open_account", outcome="ok") == 1
    assert delta(before, commands, command="deposit", outcome="ok") == 5
    assert delta(before, commands, command="deposit", outcome="replayed") == 1
    assert delta(before, commands, command="withdraw", outcome="insufficient_funds") == 2
    latency = "daybook_command_duration_seconds_count"
    assert delta(before, latency, command="deposit") == 6
    assert delta(before, latency, command="withdraw") == 2
    # A transaction per accepted command (one caller, one at a time); a refusal without a
    # caller's request id and a replay have nothing to write, so they are not commits.
    assert delta(before, "daybook_commit_duration_seconds_count") == 6
    assert delta(before, "daybook_commit_batch_size_count") == 6
    assert delta(before, "daybook_commit_batch_size_sum") == 6


def test_known_work_is_counted_once_per_command(ledger: Ledger) -> None:
    before = scrape()
    _known_work(ledger)
    _assert_known_work(before)


def test_asyncio_callers_are_counted_the_same(tmp_path: Path) -> None:
    async def work() -> None:
        async with open_async_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
            account = (await ledger.open_account("ada", "EUR")).account_id
            assert account is not None
            for _ in range(4):
                await ledger.deposit(account, 10)
            await ledger.deposit(account, 10, request_id="d-1")
            for _ in range(2):
                with pytest.raises(InsufficientFunds):
                    await ledger.withdraw(account, 1000)
            assert (await ledger.deposit(account, 10, request_id="d-1")).replayed

    before = scrape()
    asyncio.run(work())
    _assert_known_work(before)


def test_a_submission_counts_each_of_its_commands(ledger: Ledger) -> None:
    account = ledger.open_account("ada", "EUR").account_id
    assert account is not None
    before = scrape()
    outcomes = ledger.submit(
        [
            Deposit(account, 10, request_id="s-1"),
            Deposit(account, 10),
            Withdraw(account, 1000),
            Deposit(account, 10, request_id="s-1"),
        ]
    )
    assert [outcome_label(o) for o in outcomes] == ["ok", "ok", "insufficient_funds", "replayed"]
    commands = "daybook_commands_total"
    assert delta(before, commands, command="deposit", outcome="ok") == 2
    assert delta(before, commands, command="deposit", outcome="replayed") == 1
    assert delta(before, commands, command="withdraw", outcome="insufficient_funds") == 1
    if ledger.settings.group_commit:  # one batch, one transaction, of four commands
        assert delta(before, "daybook_commit_batch_size_count") == 1
        assert delta(before, "daybook_commit_batch_size_sum") == 4
    else:  # each command alone: the refusal and the replay write nothing
        assert delta(before, "daybook_commit_batch_size_count") == 2
        assert delta(before, "daybook_commit_batch_size_sum") == 2


def _refused_as_built(ledger: Ledger, account: UUID) -> None:
    """4 commands refused as their methods build them (before any ledger has them), 1
    refused by the ledger."""
    with pytest.raises(InvalidAmount):
        ledger.deposit(account, -5)
    with pytest.raises(InvalidRequest):
        # A caller without a type checker: the command's own check refuses the text.
        ledger.transfer(account, account, 5, transfer_id="not an id")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        ledger.atomic([])
    with pytest.raises(InvalidSku):
        # A method made at run time for a command with none generated (ledger.__getattr__);
        # type checkers know only the generated ones.
        ledger.place_order("o-1", account, account, [("no sku!", 1, 100)])  # type: ignore[attr-defined]
    with pytest.raises(SameAccount):
        ledger.transfer(account, account, 5)


def _assert_refused_as_built(before: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> None:
    commands = "daybook_commands_total"
    assert delta(before, commands, command="deposit", outcome="invalid_amount") == 1
    assert delta(before, commands, command="transfer", outcome="invalid_request") == 1
    assert delta(before, commands, command="atomic", outcome="invalid_request") == 1
    assert delta(before, commands, command="place_order", outcome="invalid_sku") == 1
    assert delta(before, commands, command="transfer", outcome="same_account") == 1


def test_a_command_refused_as_its_method_builds_it_is_counted_once(ledger: Ledger) -> None:
    """``ledger.deposit(a, -5)`` is refused before the ledger has the command: counted as the
    ledger counts its own refusals, by command and code, and a refusal the ledger answers
    is not counted a second time."""
    account = ledger.open_account("ada", "EUR").account_id
    assert account is not None
    before = scrape()
    _refused_as_built(ledger, account)
    _assert_refused_as_built(before)


def test_a_command_refused_as_its_coroutine_method_builds_it_is_counted_once(
    tmp_path: Path,
) -> None:
    async def work() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with open_async_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
            account = (await ledger.open_account("ada", "EUR")).account_id
            assert account is not None
            before = scrape()
            with pytest.raises(InvalidAmount):
                await ledger.deposit(account, -5)
            with pytest.raises(InvalidRequest):  # as in _refused_as_built
                await ledger.transfer(account, account, 5, transfer_id="not an id")  # type: ignore[arg-type]
            with pytest.raises(InvalidRequest):
                await ledger.atomic([])
            with pytest.raises(InvalidSku):  # a method made at run time
                await ledger.place_order("o-1", account, account, [("no sku!", 1, 100)])  # type: ignore[attr-defined]
            with pytest.raises(SameAccount):
                await ledger.transfer(account, account, 5)
            return before

    _assert_refused_as_built(asyncio.run(work()))


def test_outcome_labels() -> None:
    assert outcome_label(InsufficientFunds("no")) == "insufficient_funds"
    assert outcome_label(DomainError("no")) == "domain_error"
    assert outcome_label(ConnectionError("gone")) == "error"


def _by_name(spans: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def test_a_commands_trace_holds_its_commit(ledger: Ledger, spans: InMemorySpanExporter) -> None:
    account = ledger.open_account("ada", "EUR").account_id
    assert account is not None
    spans.clear()
    ledger.deposit(account, 10)
    by_name = _by_name(spans)
    (command,) = by_name["command deposit"]
    (commit,) = by_name["daybook.commit"]
    assert command.context is not None and commit.context is not None
    assert commit.context.trace_id == command.context.trace_id
    assert commit.parent is not None and commit.parent.span_id == command.context.span_id
    assert commit.attributes is not None and commit.attributes["daybook.batch_size"] == 1


def test_a_batch_of_several_traces_links_to_each(
    ledger: Ledger, spans: InMemorySpanExporter
) -> None:
    account = ledger.open_account("ada", "EUR").account_id
    assert account is not None
    tracer = trace.get_tracer("test")
    parents = []
    for name in ("first", "second"):
        with tracer.start_as_current_span(name) as caller:
            parents.append(caller.get_span_context())
    traceparents = [f"00-{p.trace_id:032x}-{p.span_id:016x}-01" for p in parents]
    spans.clear()
    # One batch of both, whichever the committer (without group commit, a submission's
    # commands commit alone).
    ledger.service.execute([Deposit(account, 10, traceparent=t) for t in traceparents])
    (commit,) = _by_name(spans)["daybook.commit"]
    assert {link.context.span_id for link in commit.links} == {p.span_id for p in parents}
    assert commit.context is not None
    assert commit.context.trace_id not in {p.trace_id for p in parents}


def test_a_stored_traceparent_is_read_as_the_propagator_reads_it() -> None:
    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    parent = tracing.context_of(stored)
    assert parent is not None
    assert tracing.span_context_of(stored) == trace.get_current_span(parent).get_span_context()
    zero = "00-00000000000000000000000000000000-b7ad6b7169203331-01"
    for junk in (None, "", "junk", zero, stored.upper()[:-1]):
        assert tracing.span_context_of(junk) is None
    later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more"  # a future version
    found = tracing.span_context_of(later)
    assert found is not None and found.span_id == 0xB7AD6B7169203331


def service_up() -> dict[str, float]:
    return {
        sample.labels["service"]: sample.value
        for family in metrics.SERVICE_UP.collect()
        for sample in family.samples
    }


@pytest.mark.parametrize("group_commit", [True, False])
def test_a_healthy_ledger_reports_no_part_down(tmp_path: Path, group_commit: bool) -> None:
    """Every ledger built a one-at-a-time committer and started it, and a group-commit
    ledger then replaced it: ``daybook_service_up{service="direct commit"}`` stayed 0 for
    the life of every ``daybook serve``, an alert on it firing for nothing."""
    for name in ("direct commit", "group commit"):
        metrics.forget_service(name)  # other tests' closed ledgers
    with open_ledger(f"sqlite:///{tmp_path}/l.db", group_commit=group_commit) as ledger:
        ledger.open_account("ann", "EUR")
        assert ledger.service.committer.health().ok
        running, other = ("group commit", "direct commit")[:: 1 if group_commit else -1]
        assert service_up()[running] == 1.0
        assert other not in service_up()


def test_a_replaced_committer_leaves_no_series(tmp_path: Path) -> None:
    from daybook.infrastructure.ledger.group_commit import GroupCommitter

    metrics.forget_service("direct commit")
    with open_ledger(f"sqlite:///{tmp_path}/l.db", group_commit=False) as ledger:
        assert service_up().get("direct commit") == 1.0
        ledger.service.install_committer(GroupCommitter)
        assert "direct commit" not in service_up()
        assert service_up()["group commit"] == 1.0
