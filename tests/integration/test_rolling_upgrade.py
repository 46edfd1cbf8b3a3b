"""A rolling upgrade: older and newer processes side by side on one PostgreSQL database."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from daybook import open_ledger, projections, run_projections
from daybook.infrastructure.readmodels.catalog import version_lock_key

pytestmark = pytest.mark.postgres


def _in_schema(pg_url: str, schema: str) -> str:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{pg_url}?options=-csearch_path%3D{schema}"


def _old_runner_locks(url: str) -> psycopg.Connection:
    """What a runner of the last release holds while it writes every version: its
    ``AdvisoryLocks.try_take`` ran ``SELECT pg_try_advisory_lock(key)`` on a session of the
    read-model URL, the key unchanged whatever the schema."""
    conn = psycopg.connect(url, autocommit=True)
    for projection in projections.ALL:
        key = version_lock_key(projection.name, projection.version)
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        assert row is not None and row[0]
    return conn


def _taken_beside_an_older_runner(ledger: Any, url: str) -> list[tuple[str, int]]:
    """The versions a runner of this code takes at ``url`` (one step) while an older runner
    holds every version's lock there."""
    old = _old_runner_locks(url)
    try:
        new = run_projections(ledger, url, start=False)
        try:
            new.step()
            return sorted(new.slots)
        finally:
            new.stop()
    finally:
        old.close()


def _taken_as_an_older_runner(url: str) -> list[str]:
    """The projections whose lock an older runner starting now at ``url`` would take (each
    version's plain key, tried on a session of its own, let go with it)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            p.name
            for p in projections.ALL
            if conn.execute(
                "SELECT pg_try_advisory_lock(%s)", (version_lock_key(p.name, p.version),)
            ).fetchone()[0]
        ]


def test_a_new_runner_stands_by_while_an_older_one_writes_read_models_in_a_schema(
    pg_url: str,
) -> None:
    """Read models kept in a schema of their own (the read-model URL's search_path): an
    older runner still running takes each version's lock by its plain key; an upgraded one
    must stand by, as the README promises (one runner writes each version), not write every
    version beside it."""
    views = _in_schema(pg_url, "views")
    with open_ledger(pg_url) as ledger:
        ledger.open_account("ann", "EUR")
        took = _taken_beside_an_older_runner(ledger, views)
        assert not took, f"the upgraded runner took {took} while an older runner held their locks"


def test_an_older_runner_stands_by_while_a_new_one_writes_read_models_in_a_schema(
    pg_url: str,
) -> None:
    """The other way round: an upgraded runner leads; an older one started (or restarted)
    beside it must find every version taken."""
    views = _in_schema(pg_url, "views")
    with open_ledger(pg_url) as ledger:
        ledger.open_account("ann", "EUR")
        new = run_projections(ledger, views, start=False)
        try:
            new.run_until_caught_up()
            assert len(new.slots) == len(projections.ALL)
            taken = _taken_as_an_older_runner(views)
            assert taken == [], f"an older runner would write {taken} beside the new one"
        finally:
            new.stop()


def test_a_runner_in_public_does_not_hold_back_a_runner_in_another_schema(pg_url: str) -> None:
    """A ledger in public beside one in its own schema, each with its runner: the public
    runner held the older runners' plain keys exclusively, which the other schema's runner
    takes shared (for older runners in its schema), so it stood by for ever."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA other")
    other = f"{pg_url}?options=-csearch_path%3Dother"
    with open_ledger(pg_url) as first, open_ledger(other) as second:
        first.open_account("ann", "EUR")
        second.open_account("bob", "EUR")
        a = run_projections(first, pg_url, start=False)
        try:
            a.step()
            assert len(a.slots) == len(projections.ALL)
            b = run_projections(second, other, start=False)
            try:
                b.step()
                assert len(b.slots) == len(projections.ALL), (
                    f"the runner of schema 'other' took {sorted(b.slots)} only, while the "
                    "runner of public writes its own ledger's versions"
                )
            finally:
                b.stop()
        finally:
            a.stop()


def test_public_runners_of_the_older_and_the_newer_code_exclude_each_other(pg_url: str) -> None:
    """In public too: an older runner (the plain key) and a newer one never both write."""

    with open_ledger(pg_url) as ledger:
        ledger.open_account("ann", "EUR")
        assert not _taken_beside_an_older_runner(ledger, pg_url)
        new = run_projections(ledger, pg_url, start=False)
        try:
            new.run_until_caught_up()
            assert len(new.slots) == len(projections.ALL)
            taken = _taken_as_an_older_runner(pg_url)
            assert taken == []
        finally:
            new.stop()
