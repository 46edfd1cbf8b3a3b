"""Handing every projection from the in-process runner to a stream group and back while
commands keep arriving: the tables end equal to a from-scratch in-process build."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from daybook import open_ledger, projections, run_projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from scripts import services
from scripts.streams import open_accounts, unique, wait_until, write_money
from tests.streaming.test_workers import PARTITIONS, relay, worker

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]

NAMES = [p.name for p in projections.ALL]


def checksums(url: str) -> dict[str, dict[str, tuple[int, int]]]:
    store = open_store(url)
    try:
        return {
            t.name: store.range_checksums(t, p.version) for p in projections.ALL for t in p.tables
        }
    finally:
        store.close()


def owners(url: str) -> set[str]:
    store = open_store(url)
    try:
        return {r.owner for r in VersionCatalog(store).versions()}
    finally:
        store.close()


def test_handover_both_ways_under_load_applies_every_event_once(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 40)
    write_money(ledger, accounts, 1500)
    topic, group = unique("handover"), unique("group")
    stop = threading.Event()

    def load() -> None:
        seed = 10
        while not stop.is_set():
            seed += 1
            write_money(ledger, accounts, 40, seed=seed)
            stop.wait(0.02)

    handover = ["projections", "handover", *NAMES, "--url", pg_url, "--topic", topic]
    handover += ["--partitions", str(PARTITIONS)]
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start()
    runner = run_projections(ledger, pg_url, poll_interval=0.01)
    writer = threading.Thread(target=load)
    writer.start()
    workers = []
    try:
        runner.views.balance(accounts[0], min_position=ledger.head(), timeout=60)
        assert main([*handover, "--to", f"stream:{group}"]) == 0  # the runner is writing
        assert owners(pg_url) == {f"stream:{group}"}
        workers = [
            worker(pg_url, kafka_bootstrap, topic, group, tmp_path / f"w{n}.log").start()
            for n in range(2)
        ]
        # The workers follow: they apply what was written after the handover (the writer
        # keeps going, so wait for the head as it was, not for a moving one).
        written = ledger.head()
        wait_until(
            lambda: runner.views.position("account_balances") >= written,
            "the workers to follow",
        )
        assert main([*handover, "--to", "runner"]) == 0  # the workers are writing
        assert owners(pg_url) == {"runner"}
        # Owning nothing any more, the workers stop and say why.
        for each in workers:
            assert each.wait() == 1, each.output
            assert "daybook projections handover" in each.output
    finally:
        stop.set()
        writer.join()
        for each in [*workers, the_relay]:
            each.stop()
    head = ledger.head()
    for name in NAMES:
        wait_until(lambda n=name: runner.views.position(n) == head, f"{name} to catch up")
    runner.stop()
    reference = services.create_database(pg_admin_url, unique("daybook_ref").replace("-", "_"))
    scratch = ProjectionRunner(event_log_of(ledger), reference, projections.ALL, batch_size=5000)
    scratch.run_until_caught_up()
    scratch.stop()
    assert checksums(pg_url) == checksums(reference)
    ledger.close()
