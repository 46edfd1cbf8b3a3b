"""A real ``daybook serve`` process on PostgreSQL: SIGTERM under load, a flood, tokens kept
out of the logs, TLS. Outcomes are counted, never timed."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import httpx
import pytest
import trustme

from daybook import open_ledger
from daybook.infrastructure.http.tokens import open_tokens
from scripts.serve_process import ROOT, ServeProcess

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def plain_http(base_url: str, headers: dict[str, str]) -> httpx.AsyncClient:
    """A client of the plain-HTTP test server. No TLS settings: httpx otherwise loads the CA
    bundle for every client (40 ms of the event loop each, so a hundred clients made in
    turn held back the first ones' requests for seconds), and a timeout long enough for a
    loaded machine: a client's timeout is not the server's failure."""
    return httpx.AsyncClient(base_url=base_url, headers=headers, verify=False, timeout=30.0)


@pytest.fixture
def servers() -> Iterator[list[ServeProcess]]:
    """Servers a test starts; any still running at its end are killed."""
    started: list[ServeProcess] = []
    yield started
    for server in started:
        server.kill()


def open_accounts(url: str, count: int) -> list[UUID]:
    with open_ledger(url) as ledger:
        return [ledger.open_account(f"client-{i}", "EUR").account_id for i in range(count)]


@dataclass
class Tally:
    receipts: Counter[int] = field(default_factory=Counter)
    request_ids: list[str] = field(default_factory=list)
    after_signal: int = 0
    refused_connection: int = 0
    shutting_down: int = 0
    #: Requests that were sent and got no answer (the connection closed under them).
    unanswered: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


def test_sigterm_under_load_answers_every_caller_and_loses_nothing(
    pg_url: str, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    clients = 16
    accounts = open_accounts(pg_url, clients)
    _, secret = open_tokens(pg_url).create("loader", ["write"])
    server = ServeProcess(pg_url, tmp_path / "serve.log").start()
    servers.append(server)
    tally = Tally()
    signalled = asyncio.Event()

    async def client(number: int) -> None:
        headers = {"Authorization": f"Bearer {secret}"}
        body = {"account_id": str(accounts[number]), "amount": 1}
        async with plain_http(server.base_url, headers) as http:
            for step in range(5_000):  # bounded; the server goes away long before
                key = f"c{number}-{step}"
                try:
                    reply = await http.post(
                        "/v1/commands/deposit", json=body, headers={"Idempotency-Key": key}
                    )
                except httpx.ConnectError:
                    tally.refused_connection += 1  # not sent: nothing listens any more
                    return
                except httpx.TransportError:
                    tally.unanswered.append(f"loader/{key}")
                    return
                if reply.status_code == 200:
                    tally.receipts[number] += 1
                    tally.request_ids.append(reply.json()["request_id"])
                    tally.after_signal += signalled.is_set()
                elif "shutting_down" in reply.text:
                    tally.shutting_down += 1
                    return
                else:
                    tally.other.append(f"{reply.status_code} {reply.text[:200]}")
                    return

    async def signal_when_busy() -> None:
        while sum(tally.receipts.values()) < 300:
            await asyncio.sleep(0.01)
        signalled.set()
        server.terminate()

    async def scenario() -> None:
        await asyncio.gather(signal_when_busy(), *(client(n) for n in range(clients)))

    asyncio.run(scenario())
    # After draining, uvicorn ends the process by the signal it caught (as shells expect).
    assert server.wait() == -signal.SIGTERM, server.output
    assert "Application shutdown complete" in server.output
    assert tally.other == []
    assert tally.after_signal >= 1  # requests in progress at the signal were answered
    assert "Traceback" not in server.output
    with open_ledger(pg_url) as ledger:
        # Every receipt is in the log...
        records = ledger.service.recorder.select_requests(tally.request_ids)  # type: ignore[attr-defined]
        assert set(records) == set(tally.request_ids)
        # ...and nothing was applied without its caller hearing: each account holds exactly
        # the deposits its client got receipts for (a request that lost its connection
        # was never taken).
        for number, account in enumerate(accounts):
            assert ledger.account(account).balance == tally.receipts[number]
        lost = ledger.service.recorder.select_requests(tally.unanswered)  # type: ignore[attr-defined]
        assert lost == {}


def test_a_flood_is_shed_with_retry_after_and_risk_reducing_commands_get_through(
    pg_url: str, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    accounts = open_accounts(pg_url, 8)
    tokens = open_tokens(pg_url)
    flood = tokens.create("flood", ["write"])[1]
    ops = tokens.create("ops", ["write", "admin"])[1]
    trickle = tokens.create("trickle", ["write"], rate=2.0)[1]
    with open_ledger(pg_url) as ledger:
        ledger.receive_stock("SKU-F", 1_000)
        reservations = [ledger.reserve_stock("SKU-F", 1).reservation_id for _ in range(40)]
    server = ServeProcess(pg_url, tmp_path / "serve.log", ["--command-capacity", "4"]).start()
    servers.append(server)
    outcomes: Counter[str] = Counter()
    retry_after: list[int] = []
    releases: list[int] = []

    async def post(http: httpx.AsyncClient, name: str, body: object, key: str) -> httpx.Response:
        return await http.post(f"/v1/commands/{name}", json=body, headers={"Idempotency-Key": key})

    async def flooder(number: int) -> None:
        headers = {"Authorization": f"Bearer {flood}"}
        body = {"account_id": str(accounts[number % 8]), "amount": 1}
        async with plain_http(server.base_url, headers) as http:
            for step in range(8):
                reply = await post(http, "deposit", body, f"f{number}-{step}")
                code = "accepted" if reply.status_code == 200 else reply.json()["code"]
                outcomes[code] += 1
                if reply.status_code == 503:
                    retry_after.append(int(reply.headers["retry-after"]))

    async def release(reservation: str) -> None:
        headers = {"Authorization": f"Bearer {ops}"}
        body = {"sku": "SKU-F", "reservation_id": reservation}
        async with plain_http(server.base_url, headers) as http:
            releases.append(
                (await post(http, "release_reservation", body, reservation)).status_code
            )

    async def trickler() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {trickle}"}
        body = {"account_id": str(accounts[0]), "amount": 1}
        async with plain_http(server.base_url, headers) as http:
            # All at once: the bucket's burst (2) gets through, the rest are over the rate.
            return list(
                await asyncio.gather(*(post(http, "deposit", body, f"t{i}") for i in range(6)))
            )

    async def scenario() -> list[httpx.Response]:
        results = await asyncio.gather(
            trickler(), *(flooder(n) for n in range(64)), *(release(r) for r in reservations)
        )
        return results[0]  # type: ignore[no-any-return]

    trickled = asyncio.run(scenario())
    status = httpx.get(
        f"{server.base_url}/v1/status", headers={"Authorization": f"Bearer {ops}"}
    ).json()
    assert server.stop() == -signal.SIGTERM
    assert set(outcomes) <= {"accepted", "overloaded"}, outcomes
    assert outcomes["overloaded"] >= 1 and outcomes["accepted"] >= 1
    assert len(retry_after) == outcomes["overloaded"] and min(retry_after) >= 1
    trickle_shed = sum(r.status_code == 503 for r in trickled)  # the trickle queues too
    assert status["admission"]["command"]["shed"] == outcomes["overloaded"] + trickle_shed
    assert releases == [200] * len(reservations)  # never shed
    limited = [r for r in trickled if r.status_code == 429]
    assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
    trickled_in = sum(r.status_code == 200 for r in trickled)
    with open_ledger(pg_url) as ledger:
        total = sum(ledger.account(a).balance for a in accounts)
        assert total == outcomes["accepted"] + trickled_in  # every accepted one is in the log
        assert ledger.inventory("SKU-F").reserved == 0


def test_no_token_reaches_the_logs(
    pg_url: str, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "daybook.infrastructure.cli",
            "tokens",
            "create",
            "reader",
            "--scope",
            "read",
            "--url",
            pg_url,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    secret = made.stdout.strip()
    assert secret not in made.stderr
    _, revoked = (store := open_tokens(pg_url)).create("gone", ["read"])
    store.revoke("gone")
    server = ServeProcess(pg_url, tmp_path / "serve.log", ["--log-level", "debug"]).start()
    servers.append(server)
    wrong = "dbk_this-is-not-a-token-at-all"
    for token in (secret, revoked, wrong):
        for path in ("/v1/balances", "/v1/status", "/v1/stock/SKU-1"):
            httpx.get(server.base_url + path, headers={"Authorization": f"Bearer {token}"})
        httpx.post(
            f"{server.base_url}/v1/commands/deposit",
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k"},
            json={"account_id": str(UUID(int=1)), "amount": 1},
        )
    assert server.stop() == -signal.SIGTERM
    log = server.output
    assert "GET /v1/balances" in log  # the access log was on
    for token in (secret, revoked, wrong):
        assert token not in log and token[4:] not in log
    assert "Bearer" not in log and "authorization" not in log.lower()


def test_a_test_server_whose_port_was_taken_starts_on_another(
    pg_url: str, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """Between finding a port free and binding it, another process can take it (CI saw
    exactly that): the server says so and exits, and the helper starts it elsewhere."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServeProcess(pg_url, tmp_path / "serve.log", port=port)
        servers.append(server)
        server.start()
        assert server.port != port
        assert "address already in use" in server.output.lower()
        assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_tls_through_uvicorns_options(
    pg_url: str, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_pem.write_to_path(key)
    certificate.cert_chain_pems[0].write_to_path(cert)
    context = ssl.create_default_context()
    authority.configure_trust(context)
    server = ServeProcess(
        pg_url, tmp_path / "serve.log", ["--tls-cert", str(cert), "--tls-key", str(key)]
    )
    server.verify = context
    servers.append(server.start())
    assert httpx.get(f"{server.base_url}/health", verify=context).json()["status"] == "ok"
    with pytest.raises(httpx.ConnectError):  # untrusted by default
        httpx.get(f"{server.base_url}/health")
    server.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    assert server.wait() == 130  # Ctrl-C: "daybook: interrupted", after the drain
