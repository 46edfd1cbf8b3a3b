"""What ``/v1/dashboard`` answers about the projections: their owner from the read-model
catalog, the last reconcile run, and the rows reconcile repaired (the browser test,
``tests/integration/test_dashboard.py``, checks that the page shows them)."""

from __future__ import annotations

from typing import Any

from daybook.infrastructure.cli import main
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.store import LOG_SHARD, ReadStore
from daybook.projections.accounts import BALANCES
from daybook.projections.model import SHARD
from daybook.projections.sagas import SAGA_LIST, SAGA_STATES, SAGAS
from tests.http.conftest import Api


def projection(api: Api, name: str) -> dict[str, Any]:
    view = api.get("/v1/dashboard").json()
    found: dict[str, Any] = next(p for p in view["projections"] if p["name"] == name)
    return found


def test_the_dashboard_shows_owners_the_last_reconcile_and_its_repairs(
    sqlite_api: Api, tmp_path: Any
) -> None:
    api = sqlite_api
    account = api.open_account("ann")
    deposit = api.command("deposit", {"account_id": account, "amount": 5}).json()
    api.get(f"/v1/accounts/{account}/balance", min_position=deposit["position"])
    balances = projection(api, "account_balances")
    assert (balances["owner"], balances["last_reconcile"]) == ("runner", None)
    assert api.get("/v1/dashboard").json()["decisions"] == []

    url = api.parts.readmodels_url
    assert url is not None
    store = open_store(url)
    try:
        with store.transaction():
            row = store.fetch(BALANCES, 1, (account,))
            assert row is not None
            store.upsert(BALANCES, 1, [{**row, "owner": "tampered"}])
    finally:
        store.close()
    ledger_url = f"sqlite:///{tmp_path}/ledger.db"
    assert main(["reconcile", "account_balances", "--url", ledger_url, "--repair"]) == 0

    last = projection(api, "account_balances")["last_reconcile"]
    assert {k: last[k] for k in ("result", "position", "drift", "error")} == {
        "result": "repaired",
        "position": deposit["position"],
        "drift": 1,
        "error": None,
    }
    assert last["at"] and account in last["drifts"][0]
    [decision] = api.get("/v1/dashboard").json()["decisions"]
    assert decision["projection"] == "account_balances v1" and decision["row"] == account
    assert decision["table"] == "account_balances" and decision["change"] == "different"

    assert main(["reconcile", "account_balances", "--url", ledger_url]) == 0
    assert projection(api, "account_balances")["last_reconcile"]["result"] == "clean"
    assert projection(api, "account_statement")["last_reconcile"] is None


def test_the_dashboard_reads_sagas_in_bounded_memory(sqlite_api: Api, monkeypatch: Any) -> None:
    """Finished sagas stay in the sagas read model (one row per order, for months): the
    dashboard, polled every few seconds, reads their counts (a row per state) and only the
    stuck ones, at most twenty, rather than every saga ever run."""
    api = sqlite_api
    account = api.open_account("ann")
    deposit = api.command("deposit", {"account_id": account, "amount": 5}).json()
    api.get(f"/v1/accounts/{account}/balance", min_position=deposit["position"])
    url = api.parts.readmodels_url
    assert url is not None

    def saga(number: int, state: str, deadline: str | None = None) -> dict[str, Any]:
        at = f"2026-01-01T00:{number // 60 % 60:02d}:{number % 60:02d}+00:00"
        return {
            "saga_id": f"00000000-0000-4000-8000-{number:012d}", "kind": "order",
            "reference": f"order-{number}", "state": state, "step": "pay",
            "plan": "reserve pay ship", "current": 1, "pending": "reserve",
            "compensable": "reserve", "attempts": 1, "last_error": None,
            "deadline_at": deadline, "retry_at": None, "wake_at": None,
            "started_at": at, "updated_at": at, "version": 3, "position": number,
        }  # fmt: skip

    finished = [saga(n, "completed") for n in range(300)]
    stuck = [saga(1000 + n, "needs_attention") for n in range(25)]
    late = [saga(2000, "running", deadline="2026-01-01T00:00:00+00:00")]
    on_time = [saga(2001, "running", deadline="2999-01-01T00:00:00+00:00")]
    counts = {"completed": 300, "needs_attention": 25, "running": 2}
    store = open_store(url)
    try:
        with store.transaction():
            store.upsert(SAGAS, SAGA_LIST.version, finished + stuck + late + on_time)
            store.upsert(
                SAGA_STATES.stored,
                SAGA_LIST.version,
                [{"state": k, "sagas": n, SHARD: LOG_SHARD} for k, n in counts.items()],
            )
    finally:
        store.close()

    read: list[int] = []
    select = ReadStore.select

    def counted(self: ReadStore, *args: Any, **kwargs: Any) -> list[Any]:
        rows = select(self, *args, **kwargs)
        read.append(len(rows))
        return rows

    monkeypatch.setattr(ReadStore, "select", counted)
    sagas = api.get("/v1/dashboard").json()["sagas"]
    assert sagas["counts"] == counts
    assert len(sagas["stuck"]) == 20
    # The newest first: the late one, then the last needs_attention ones.
    assert [s["saga_id"][-4:] for s in sagas["stuck"]] == ["2000"] + [
        f"{1000 + n}" for n in range(24, 5, -1)
    ]
    assert sum(read) <= 20 + 10, f"the dashboard read {read} rows"


def test_the_dashboard_counts_failed_commands_apart_from_refused_ones(sqlite_api: Api) -> None:
    """A refusal is the ledger's answer (a code); a failure (an outage past its budget, a
    defect) is none, and an operator reading "refused" would look for it in the wrong place."""
    before = sqlite_api.get("/v1/dashboard").json()["writes"]
    metrics.COMMANDS.labels("deposit", "insufficient_funds").inc()
    metrics.COMMANDS.labels("deposit", "error").inc(2)
    after = sqlite_api.get("/v1/dashboard").json()["writes"]
    assert after["refused"] - before["refused"] == 1
    assert after["failed"] - before["failed"] == 2


def test_the_dashboard_commit_latency_is_recent_not_since_the_server_started(
    sqlite_api: Api, monkeypatch: Any
) -> None:
    """The page shows commit p50/p99 beside the last minute's throughput, for an operator
    watching the system converge: commits that became slow a minute ago must show, however
    many fast ones the server committed in the hours before."""
    import types

    from daybook.infrastructure.http import board

    clock = [1_000.0]
    # The board's own clock only (``board.time`` is the time module: patching its
    # ``monotonic`` would stop every clock of the process, the event loop's included).
    monkeypatch.setattr(board, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    for _ in range(20_000):  # hours of 2 ms commits
        metrics.COMMIT_SECONDS.observe(0.002)
    sqlite_api.get("/v1/dashboard")
    clock[0] += 120.0
    for _ in range(200):  # the last two minutes: the database takes 2 s a commit
        metrics.COMMIT_SECONDS.observe(2.0)
    writes = sqlite_api.get("/v1/dashboard").json()["writes"]
    assert writes["commit_p99"] >= 1.0, f"commit p99 shown {writes['commit_p99']}"


def test_the_dashboard_page_cannot_be_framed_and_runs_only_its_own_script(
    sqlite_api: Api,
) -> None:
    """The page takes a token (an admin one replays parked events): another site must not
    frame it under a decoy (clickjacking), and it needs no script, style or connection
    but its own origin's, which a Content-Security-Policy can say."""
    for path in ("/", "/dashboard/dashboard.js"):
        headers = sqlite_api.get(path).headers
        policy = headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in policy, f"{path}: CSP {policy!r}"
        assert "script-src 'self'" in policy, f"{path}: CSP {policy!r}"
        assert headers.get("x-frame-options") == "DENY", path
        assert headers.get("x-content-type-options") == "nosniff", path


def test_the_dashboard_latency_after_nobody_polled_for_hours_is_of_the_last_minute() -> None:
    """An operator opens the page during an incident after nobody watched it for
    two hours: the latency shown must be of about the last minute, not of the two hours
    since the last poll (where the fast commits hide the slow ones, as since-start did)."""
    from prometheus_client import CollectorRegistry, Histogram

    from daybook.infrastructure.http.board import RecentLatency

    histogram = Histogram(
        "commit_seconds_of_a_test",
        "x",
        registry=CollectorRegistry(),
        buckets=metrics.COMMIT_SECONDS._upper_bounds[:-1],
    )
    latency = RecentLatency()
    now = 1_000.0
    latency.observe(now, histogram)  # someone looked once
    for _ in range(20_000):  # two hours nobody looks: fast commits
        histogram.observe(0.002)
    now += 7_200.0
    shown = []
    for _ in range(25):  # the database is slow now; the operator watches for 50 s
        for _ in range(10):
            histogram.observe(2.0)
        shown.append(latency.observe(now, histogram)[1])
        now += 2.0
    assert all(p99 is None or p99 >= 1.0 for p99 in shown), shown
