"""The HTTP application in-process: httpx against the ASGI app, on a real ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from daybook.infrastructure.bootstrap import http_parts
from daybook.infrastructure.http.app import HttpOptions, HttpParts, create_app
from daybook.infrastructure.http.tokens import open_tokens
from daybook.infrastructure.settings import Settings

T = TypeVar("T")


#: The paths of the read routes, which take ``timeout``.
_READS = ("/v1/accounts/", "/v1/balances", "/v1/stock/", "/v1/activity")


class Api:
    """An httpx client on the app, driven from a test (one event loop for its whole life:
    the app's ledger answers on the loop that asked)."""

    def __init__(self, parts: HttpParts) -> None:
        self.parts = parts
        self.app = create_app(parts, owns_parts=False)
        self.loop = asyncio.new_event_loop()
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://daybook")
        self.secrets: dict[str, str] = {}
        self._keys = 0

    def run(self, coroutine: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coroutine)  # type: ignore[arg-type]

    def token(self, name: str, *scopes: str, rate: float | None = None) -> str:
        _, secret = self.parts.tokens.create(name, scopes, rate=rate)
        self.secrets[name] = secret
        return secret

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[name]}"}

    def key(self) -> str:
        self._keys += 1
        return f"key-{self._keys}"

    def command(
        self,
        name: str,
        body: Any,
        *,
        key: str | None = None,
        who: str = "tester",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return self.run(self.send_command(name, body, key=key, who=who, headers=headers))

    async def send_command(
        self,
        name: str,
        body: Any,
        *,
        key: str | None = None,
        who: str = "tester",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        sent = {**self.auth(who), "Idempotency-Key": key or self.key(), **(headers or {})}
        return await self.client.post(f"/v1/commands/{name}", json=body, headers=sent)

    def get(self, path: str, *, who: str = "tester", **params: Any) -> httpx.Response:
        # Reads wait up to the server's longest wait, not its default 2 s, unless the test
        # says otherwise: the read models' first version is built as the app starts, which
        # a loaded machine can make slow (other routes refuse the parameter).
        if path.startswith(_READS):
            params.setdefault("timeout", 10)
        return self.run(self.client.get(path, params=params, headers=self.auth(who)))

    def head(self) -> int:
        return self.run(self.parts.ledger.head())

    def open_account(self, owner: str = "ann", currency: str = "EUR") -> str:
        reply = self.command("open_account", {"owner": owner, "currency": currency})
        assert reply.status_code == 200, reply.text
        account_id: str = reply.json()["account_id"]
        return account_id

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(self.parts.close())
        self.loop.close()


def make_api(url: str, options: HttpOptions | None = None) -> Api:
    parts = http_parts(Settings.load(url=url), options, tokens=open_tokens(url))
    api = Api(parts)
    api.token("tester", "read", "write", "admin")
    return api


@pytest.fixture
def api(store_url: str) -> Iterator[Api]:
    """The app on each backend (memory, SQLite, PostgreSQL), with an all-scopes token."""
    made = make_api(store_url)
    yield made
    made.close()


@pytest.fixture
def sqlite_api(tmp_path: Any) -> Iterator[Api]:
    made = make_api(f"sqlite:///{tmp_path}/ledger.db")
    yield made
    made.close()
