"""``bench_rebuild_cpu.py --url`` on a database that holds no log (a wrong URL, or
bench_projections not run there yet): a one-line error, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres


def refused(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``scripts/SCRIPT ARGS``, run; it must end with an error of one line, not a traceback."""
    path = Path(__file__).resolve().parents[2] / "scripts" / script
    result = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode != 0, (result.stdout[-500:], result.stderr[-500:])
    return result


def test_bench_rebuild_cpu_on_an_empty_log_says_so(pg_url: str) -> None:
    result = refused("bench_rebuild_cpu.py", "--url", pg_url, "--runs", "1")
    assert "no log" in result.stderr, result.stderr


def test_bench_rebuild_cpu_refuses_a_database_the_benchmark_did_not_write(pg_url: str) -> None:
    """Each run drops every read model of the database it is given: given a service's (a
    wrong URL), it dropped them all. A database whose log the benchmark did not write is
    refused, in one line, its read models kept."""
    from daybook import open_ledger, run_projections
    from daybook.infrastructure.readmodels.catalog import VersionCatalog
    from daybook.infrastructure.readmodels.location import open_store

    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        ledger.deposit(account, 5)
        with run_projections(ledger, pg_url, start=False) as runner:
            runner.run_until_caught_up()
    result = refused("bench_rebuild_cpu.py", "--url", pg_url, "--runs", "1")
    assert "bench_projections.py" in result.stderr, result.stderr
    store = open_store(pg_url)
    try:
        assert VersionCatalog(store).versions(), "the read models are still there"
    finally:
        store.close()


def test_bench_projections_refuses_a_database_whose_log_it_did_not_write(pg_url: str) -> None:
    """Given a service's database (a wrong URL), it appended its own events to that log and
    dropped every read model there."""
    from daybook import open_ledger

    with open_ledger(pg_url) as ledger:
        ledger.deposit(ledger.open_account("ann", "EUR").account_id, 5)
        head = ledger.head()
    result = refused("bench_projections.py", "--url", pg_url, "--events", "1000")
    assert result.returncode == 2 and "did not write" in result.stderr, result.stderr
    with open_ledger(pg_url) as ledger:
        assert ledger.head() == head
