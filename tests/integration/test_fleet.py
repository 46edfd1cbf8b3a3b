"""Two real ``daybook serve`` processes on one PostgreSQL, as behind a load balancer."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from daybook import open_ledger
from daybook.infrastructure.http.tokens import open_tokens
from scripts.serve_process import ServeProcess
from tests.integration.test_http_server import servers

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
__all__ = ["servers"]  # the fixture


def two(pg_url: str, tmp_path: Path, servers: list[ServeProcess], *args: str) -> list[ServeProcess]:
    for name in ("a", "b"):
        servers.append(ServeProcess(pg_url, tmp_path / f"{name}.log", list(args)).start())
    return servers


def _deposit(server: ServeProcess, secret: str, account: str, key: str, amount: int = 1) -> int:
    reply = httpx.post(
        f"{server.base_url}/v1/commands/deposit",
        json={"account_id": account, "amount": amount},
        headers={"Authorization": f"Bearer {secret}", "Idempotency-Key": key},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return int(reply.json()["position"])


def _balance(server: ServeProcess, secret: str, account: str, position: int) -> httpx.Response:
    return httpx.get(
        f"{server.base_url}/v1/accounts/{account}/balance",
        params={"min_position": position, "timeout": 10},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )


def test_the_standby_runner_takes_over_when_the_writer_is_killed(
    pg_url: str, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """Each server's projection runner: one writes each version, the other stands by; the
    writer killed, the other's takes over, nothing skipped or applied twice."""
    with open_ledger(pg_url) as ledger:
        account = str(ledger.open_account("ann", "EUR").account_id)
    _, secret = open_tokens(pg_url).create("client", ["read", "write", "admin"])
    a, b = two(pg_url, tmp_path, servers)
    total = 0
    for i in range(20):
        position = _deposit((a, b)[i % 2], secret, account, f"k{i}")
        total += 1
    for server in (a, b):
        reply = _balance(server, secret, account, position)
        assert reply.status_code == 200, reply.text
        assert reply.json()["balance"] == total
    a.kill()  # SIGKILL
    for i in range(20, 40):
        position = _deposit(b, secret, account, f"k{i}")
        total += 1
    reply = _balance(b, secret, account, position)
    assert reply.status_code == 200, reply.text
    assert reply.json()["balance"] == total
    health = httpx.get(f"{b.base_url}/health", headers={"Authorization": f"Bearer {secret}"})
    assert health.status_code == 200, health.text


def test_a_revoked_token_is_refused_by_every_server_within_the_cache_time(
    pg_url: str, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """README: a revoked token is refused within the token cache's time (here 1 s), by
    every server, not only the one that revoked it."""
    tokens = open_tokens(pg_url)
    _, secret = tokens.create("client", ["read"])
    a, b = two(pg_url, tmp_path, servers, "--token-cache-seconds", "1")
    headers = {"Authorization": f"Bearer {secret}"}
    for server in (a, b):
        assert httpx.get(f"{server.base_url}/v1/activity", headers=headers).status_code == 200
    tokens.revoke("client")
    tokens.close()
    time.sleep(1.2)
    for server in (a, b):
        assert httpx.get(f"{server.base_url}/v1/activity", headers=headers).status_code == 401
