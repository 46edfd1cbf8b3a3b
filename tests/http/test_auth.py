"""Who may do what: no token, the wrong scope, a revoked token; tokens stored hashed; rate
limits per token; CORS off unless asked for."""

from __future__ import annotations

import asyncio
import secrets
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from daybook.infrastructure.cli import main
from daybook.infrastructure.http import auth as auth_module
from daybook.infrastructure.http.app import HttpOptions
from daybook.infrastructure.http.tokens import TokenError, open_tokens
from daybook.infrastructure.urls import postgres_params
from tests.http.conftest import Api, make_api

ACCOUNT = str(uuid.UUID(int=5))
#: (method, path, scope it needs); every route but /health, the docs, /problems and the
#: dashboard's page and files.
ROUTES = [
    ("POST", "/v1/commands/deposit", "write"),
    ("POST", "/v1/commands/release_reservation", "write"),
    ("POST", "/v1/atomic", "write"),
    ("POST", "/v1/batch", "write"),
    ("GET", f"/v1/accounts/{ACCOUNT}/balance", "read"),
    ("GET", "/v1/balances", "read"),
    ("GET", "/v1/balances/snapshot", "read"),
    ("GET", f"/v1/accounts/{ACCOUNT}/statement", "read"),
    ("GET", "/v1/stock/SKU-1", "read"),
    ("GET", "/v1/activity", "read"),
    ("GET", "/v1/status", "admin"),
    ("GET", "/metrics", "read"),
    ("GET", "/v1/dashboard", "read"),
    ("POST", "/v1/projections/account_balances/resume", "admin"),
]


def call(api: Api, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    headers = {**headers, "Idempotency-Key": str(uuid.uuid4())}
    body = {"account_id": ACCOUNT, "amount": 5}
    return api.run(api.client.request(method, path, headers=headers, json=body))


def _lookups(
    api: Api, monkeypatch: pytest.MonkeyPatch, before: Callable[[str], object] | None = None
) -> list[str]:
    """The secrets the token store is asked to verify from now on, in order; ``before`` runs
    ahead of each lookup (to hold it up, say)."""
    looked_up: list[str] = []
    verify = api.parts.tokens.verify

    def watched(secret: str) -> Any:
        looked_up.append(secret)
        if before is not None:
            before(secret)
        return verify(secret)

    monkeypatch.setattr(api.parts.tokens, "verify", watched)
    return looked_up


def test_every_route_the_matrix_names_exists(api: Api) -> None:
    document = api.run(api.client.get("/openapi.json")).json()
    served = {
        (method.upper(), path)
        for path, methods in document["paths"].items()
        for method in methods
        if not path.startswith(("/health", "/problems"))
    }
    named = {
        (
            m,
            p.replace(ACCOUNT, "{account_id}")
            .replace("SKU-1", "{sku}")
            .replace("account_balances/", "{name}/"),
        )
        for m, p, _ in ROUTES
    }
    assert {(m, p) for m, p in served if not p.startswith("/v1/commands/")} <= named
    assert ("POST", "/v1/commands/deposit") in served


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
def test_no_token_is_401(api: Api, method: str, path: str, scope: str) -> None:
    head = api.head()
    for headers in ({}, {"Authorization": "Bearer dbk_not-a-token"}, {"Authorization": "Basic x"}):
        reply = call(api, method, path, headers)
        assert reply.status_code == 401, reply.text
        assert reply.json()["code"] == "unauthorized"
        assert reply.headers["www-authenticate"] == "Bearer"
    assert api.head() == head


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
def test_the_wrong_scope_is_403(api: Api, method: str, path: str, scope: str) -> None:
    for other in {"read", "write", "admin"} - {scope, "admin"}:
        api.token(f"only-{other}", other)
        head = api.head()
        reply = call(api, method, path, api.auth(f"only-{other}"))
        assert reply.status_code == 403, reply.text
        assert reply.json()["code"] == "forbidden"
        assert api.head() == head


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
def test_the_right_scope_and_admin_get_through(
    api: Api, method: str, path: str, scope: str
) -> None:
    api.token("right", scope)
    api.token("boss", "admin")
    for who in ("right", "boss"):
        reply = call(api, method, path, api.auth(who))
        assert reply.status_code not in (401, 403), reply.text


def test_a_token_revoked_through_the_servers_own_store_and_forgotten_is_refused_at_once(
    api: Api,
) -> None:
    # An embedding service that revokes in-process tells the authenticator (``forget``);
    # a revocation by another process waits out the cache (the next test).
    api.token("leaver", "read")
    assert api.get("/v1/balances", who="leaver").status_code == 200
    api.parts.tokens.revoke("leaver")
    api.app.state.auth.forget("leaver")
    reply = api.get("/v1/balances", who="leaver")
    assert reply.status_code == 401 and reply.json()["code"] == "unauthorized"


def test_a_token_forgotten_while_its_lookup_is_under_way_is_not_remembered(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``forget`` while a lookup of the token is under way (it found the token, then the
    token was revoked and forgotten): the lookup's answer is not remembered, or the token
    would be trusted for the cache's time after its revocation."""
    api.token("leaver", "read")
    gate, looking = threading.Event(), threading.Event()
    verify = api.parts.tokens.verify

    def found_then_held(secret: str) -> Any:
        found = verify(secret)  # the token, before its revocation
        looking.set()
        gate.wait(60)
        return found

    monkeypatch.setattr(api.parts.tokens, "verify", found_then_held)

    async def scenario() -> tuple[int, int]:
        first = asyncio.ensure_future(api.client.get("/v1/balances", headers=api.auth("leaver")))
        while not looking.is_set():
            await asyncio.sleep(0.01)
        api.parts.tokens.revoke("leaver")
        api.app.state.auth.forget("leaver")
        gate.set()
        answered = (await first).status_code  # looked up before the revocation: it passes
        again = await api.client.get("/v1/balances", headers=api.auth("leaver"))
        return answered, again.status_code

    answered, again = api.run(scenario())
    assert (answered, again) == (200, 401)


def test_a_revocation_elsewhere_takes_effect_once_the_cache_expires(tmp_path: Path) -> None:
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", HttpOptions(token_cache_seconds=5.0))
    try:
        clock = [0.0]
        api.app.state.auth.clock = lambda: clock[0]
        api.token("leaver", "read")
        assert api.get("/v1/balances", who="leaver").status_code == 200
        # Revoked by another process (the CLI), through its own store.
        assert main(["tokens", "revoke", "leaver", "--url", f"sqlite:///{tmp_path}/ledger.db"]) == 0
        clock[0] = 4.0
        assert api.get("/v1/balances", who="leaver").status_code == 200  # still trusted
        clock[0] = 5.5
        assert api.get("/v1/balances", who="leaver").status_code == 401
    finally:
        api.close()


def stranger() -> dict[str, str]:
    return {"Authorization": f"Bearer dbk_{secrets.token_urlsafe(32)}"}


def test_made_up_tokens_never_push_a_known_one_out_of_the_cache(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown secrets are remembered too (each is a lookup), at most so many: made-up ones
    past that bound emptied the whole cache, and every known token was looked up again."""
    api = sqlite_api
    monkeypatch.setattr(auth_module, "_CACHE_LIMIT", 5)
    assert api.get("/v1/balances").status_code == 200  # "tester" is cached
    looked_up = _lookups(api, monkeypatch)
    made_up = [api.run(api.client.get("/v1/balances", headers=stranger())) for _ in range(20)]
    assert {reply.status_code for reply in made_up} == {401}
    assert api.get("/v1/balances").status_code == 200
    assert api.secrets["tester"] not in looked_up, "a known token was pushed out"
    assert len(looked_up) == 20


def test_a_burst_of_one_tokens_requests_is_one_lookup(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before its token is cached, a client's requests sent at once wait for one lookup:
    each its own would fill the bounded lookups with one client's, and refuse the rest."""
    api = sqlite_api
    api.token("burst", "read")
    looked_up = _lookups(api, monkeypatch)
    count = 2 * api.app.state.auth.lookups.capacity

    async def burst() -> list[int]:
        replies = await asyncio.gather(
            *(api.client.get("/v1/balances", headers=api.auth("burst")) for _ in range(count))
        )
        return [reply.status_code for reply in replies]

    assert api.run(burst()) == [200] * count
    assert looked_up == [api.secrets["burst"]]


def test_made_up_tokens_do_not_stall_a_known_tokens_read(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests with made-up tokens need no credentials, and each looks its token up: with
    the token store slow to answer (here, stopped until the end), their lookups waited in
    the thread pool the reads run in, without bound, and a cached token's read that waits
    for nothing waited behind them. Now the lookups wait apart, a few at most: the others
    are refused at once with 503 overloaded and Retry-After."""
    api = sqlite_api
    account = api.open_account()
    path = f"/v1/accounts/{account}/balance"
    assert api.get(path, min_position=api.head()).status_code == 200  # cached and current
    gate = threading.Event()
    looked_up = _lookups(api, monkeypatch, lambda secret: gate.wait(60))

    async def scenario() -> tuple[bool, int, list[httpx.Response]]:
        strangers = [
            asyncio.ensure_future(api.client.get("/v1/balances", headers=stranger()))
            for _ in range(200)
        ]
        for _ in range(1000):  # until the lookups have begun (10 s at most)
            if looked_up:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # and the rest of the strangers are in
        mine = asyncio.ensure_future(
            api.client.get(path, params={"timeout": 0}, headers=api.auth("tester"))
        )
        # Answered at once; it was not answered while a single lookup was stuck.
        await asyncio.wait({mine}, timeout=10)
        answered = mine.done()
        gate.set()
        replies = await asyncio.gather(*strangers)
        return answered, (await mine).status_code, replies

    answered, status, replies = api.run(scenario())
    assert answered, "a cached token's read waited for the lookups of made-up tokens"
    assert status == 200
    assert {reply.status_code for reply in replies} == {401, 503}
    refused = [reply for reply in replies if reply.status_code == 503]
    assert all(reply.json()["code"] == "overloaded" for reply in refused)
    assert all(int(reply.headers["retry-after"]) >= 1 for reply in refused)
    assert len(looked_up) <= api.app.state.auth.lookups.capacity < len(replies)


def test_valid_clients_starting_together_are_not_refused_overloaded(sqlite_api: Api) -> None:
    """40 clients, each with its own valid token, send their first request at once (a server
    just started): every one is answered. The bound on waiting lookups (32) refused 8."""
    api = sqlite_api
    names = [f"client{i}" for i in range(40)]
    for name in names:
        api.token(name, "read")

    async def burst() -> list[int]:
        replies = await asyncio.gather(
            *(api.client.get("/v1/balances", headers=api.auth(name)) for name in names)
        )
        return [reply.status_code for reply in replies]

    assert api.run(burst()) == [200] * len(names)


def test_a_token_seen_valid_is_never_refused_for_lookups_of_made_up_ones(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made-up tokens fill every place lookups wait in; a valid token whose cache entry has
    expired is checked again (a revocation still takes effect) but is not refused, and its
    check goes ahead of theirs. Its entry expiring while they kept the places full made
    the valid client 503 overloaded."""
    api = sqlite_api
    auth = api.app.state.auth
    later = [0.0]
    monkeypatch.setattr(auth, "clock", lambda: time.monotonic() + later[0])
    assert api.get("/v1/balances").status_code == 200  # "tester" is seen valid
    later[0] += 2 * auth.cache_seconds  # and its entry has expired
    mine = api.secrets["tester"]
    looked_up = _lookups(
        api, monkeypatch, lambda secret: secret != mine and threading.Event().wait(0.02)
    )
    strangers = 2 * auth.lookups.capacity

    async def scenario() -> tuple[list[int], int, int]:
        made_up = [
            asyncio.ensure_future(api.client.get("/v1/balances", headers=stranger()))
            for _ in range(strangers)
        ]
        for _ in range(1000):  # until the lookups have begun (10 s at most)
            if looked_up:
                break
            await asyncio.sleep(0.01)
        reply = await api.client.get("/v1/balances", headers=api.auth("tester"))
        before = len(looked_up)
        replies = await asyncio.gather(*made_up)
        return [r.status_code for r in replies], reply.status_code, before

    statuses, status, before = api.run(scenario())
    assert status == 200
    assert 503 in statuses, "the places for made-up tokens were never full"
    # Checked ahead of the made-up tokens queued before it (a few may have run meanwhile).
    assert before < auth.lookups.capacity // 2
    api.parts.tokens.revoke("tester")  # and a revocation takes effect on the next check
    later[0] += 2 * auth.cache_seconds
    assert api.get("/v1/balances").status_code == 401


def test_a_lookup_the_store_does_not_answer_is_503_unavailable(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token store that never answers (a connection a middlebox dropped without a word)
    held every request with a token to look up until the kernel gave up, about 15 minutes:
    a request waits a bounded time, then is 503 unavailable with Retry-After."""
    api = sqlite_api
    monkeypatch.setattr(auth_module, "LOOKUP_WAIT", 0.5)
    gate = threading.Event()

    def stuck(secret: str) -> Any:
        gate.wait(60)
        return None

    monkeypatch.setattr(api.parts.tokens, "verify", stuck)
    try:
        replies = [api.run(api.client.get("/v1/balances", headers=stranger())) for _ in range(2)]
    finally:
        gate.set()
    for reply in replies:
        assert reply.status_code == 503, reply.text
        assert reply.json()["code"] == "unavailable"
        assert int(reply.headers["retry-after"]) >= 1


def test_health_docs_and_problem_pages_need_no_token(api: Api) -> None:
    for path in ("/health", "/openapi.json", "/docs", "/problems/overloaded"):
        answer = api.run(api.client.get(path))
        assert answer.status_code == 200, (path, answer.text)


def test_serve_help_names_every_route_that_needs_no_token(
    sqlite_api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    """``daybook serve --help`` said every route but /health, the docs and /problems needs a
    token; the dashboard's page and its files answer without one too."""
    tokenless = ["/", "/dashboard/dashboard.js", "/health", "/docs", "/problems/overloaded"]
    for path in tokenless:
        answer = sqlite_api.run(sqlite_api.client.get(path))
        assert answer.status_code == 200, (path, answer.text)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the dashboard's page (/ and its files under /dashboard/" in text, text
    for named in ("/health", "/docs", "/problems"):
        assert named in text


def test_tokens_are_stored_hashed(sqlite_api: Api, tmp_path: Path) -> None:
    secret = sqlite_api.token("dashboard", "read")
    database = (tmp_path / "ledger.db").read_bytes()
    assert secret.encode() not in database
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        (stored,) = conn.execute("SELECT token_hash FROM daybook_tokens WHERE name = 'dashboard'")
    assert stored[0] != secret and len(stored[0]) == 64


def test_token_names_are_never_reused(store_url: str) -> None:
    store = open_tokens(store_url)
    store.create("ops", ["admin"])
    store.revoke("ops")
    with pytest.raises(TokenError, match="never reused"):
        store.create("ops", ["admin"])
    with pytest.raises(TokenError, match="scopes are"):
        store.create("new", ["root"])
    with pytest.raises(TokenError, match="token name"):
        store.create("has space", ["read"])
    with pytest.raises(TokenError, match="no token is called"):
        store.revoke("nobody")
    [token] = store.list()
    assert token.name == "ops" and not token.active
    store.close()


def test_lookups_reuse_one_connection_and_see_a_revocation_at_once(
    shared_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request with a token the server has not cached looks it up, and each lookup
    opened a connection of its own: a connection for every request with a made-up token,
    which anyone can send. One connection serves the lookups, and sees what is committed."""
    writer, server = open_tokens(shared_store_url), open_tokens(shared_store_url)
    _, secret = writer.create("reader", ["read"])
    opened: list[object] = []
    for module in (sqlite3, psycopg):
        connect = module.connect

        def counted(*args: Any, connect: Any = connect, **kwargs: Any) -> Any:
            opened.append(args)
            return connect(*args, **kwargs)

        monkeypatch.setattr(module, "connect", counted)
    found = [server.verify(secret) for _ in range(20)]
    assert all(token is not None and token.name == "reader" for token in found)
    assert server.verify(f"dbk_{secrets.token_urlsafe(32)}") is None
    assert len(opened) == 1
    writer.revoke("reader")  # another process's revocation: seen by the kept connection
    assert server.verify(secret) is None
    if shared_store_url.startswith("postgresql"):  # the server ends it: a restart, say
        with psycopg.connect(postgres_params(shared_store_url).conninfo()) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        before = len(opened)
        assert server.verify(secret) is None and len(opened) == before + 1  # a new one
    writer.close()
    server.close()


class _Blackhole:
    """A TCP proxy to PostgreSQL; ``drop()`` stops forwarding on the flows open so far without
    closing them (a NAT or load balancer that forgot an idle flow); new flows are forwarded."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.generation = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self) -> None:
        self.generation += 1

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
                born = self.generation
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pipe, args=(a, b, born), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, born: int) -> None:
        with suppress(OSError):
            while data := a.recv(65536):
                if self.generation == born:
                    b.sendall(data)  # else swallowed: nothing comes back, nothing is closed


def test_a_lookup_on_a_silently_dropped_connection_is_tried_again_on_a_new_one(
    pg_url: str,
) -> None:
    """The kept lookup connection's flow is dropped without a word (TCP sees every packet
    acknowledged, so neither keepalives nor tcp_user_timeout notice): the lookup is given
    up after a bounded time and made again on a new connection, rather than hang."""
    parts = urlsplit(pg_url)
    proxy = _Blackhole(parts.hostname or "127.0.0.1", parts.port or 5432)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    url = urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{proxy.port}"))
    writer, server = open_tokens(pg_url), open_tokens(url)
    _, secret = writer.create("reader", ["read"])
    assert server.verify(secret) is not None  # the lookup connection is open (and kept)
    proxy.drop()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(server.verify(secret)), daemon=True)
    thread.start()
    thread.join(60)  # generous: the lookup gives up after a few seconds
    assert result and result[0] is not None, "the lookup hangs on the dropped connection"
    writer.close()
    server.close()
    proxy.listener.close()


def test_tokens_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    assert main(["tokens", "create", "dashboard", "--scope", "read", "--url", url]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith("dbk_") and "only time" in err
    assert main(["tokens", "create", "dashboard", "--scope", "read", "--url", url]) == 1
    assert "never reused" in capsys.readouterr().err
    assert main(["tokens", "list", "--url", url]) == 0
    listing = capsys.readouterr().out
    assert "dashboard" in listing and "read" in listing and secret not in listing
    assert main(["tokens", "revoke", "dashboard", "--url", url]) == 0
    assert main(["tokens", "list", "--url", url]) == 0
    assert "revoked" in capsys.readouterr().out


# -- rate limits ----------------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Api]:
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", HttpOptions(token_rate=2.0))
    api.app.state.limits.clock = lambda: 100.0  # time stands still: only the count matters
    yield api
    api.close()


def test_a_token_over_its_rate_gets_429_with_retry_after(limited: Api) -> None:
    replies = [limited.get("/v1/balances") for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 429, 429]
    assert replies[2].json()["code"] == "rate_limited"
    assert int(replies[2].headers["retry-after"]) >= 1
    limited.token("own-rate", "read", rate=5.0)  # a token's own rate wins
    assert [limited.get("/v1/balances", who="own-rate").status_code for _ in range(6)] == [
        200
    ] * 5 + [429]


def test_risk_reducing_commands_are_not_rate_limited(limited: Api) -> None:
    limited.command("receive_stock", {"sku": "SKU-1", "quantity": 10})
    reservations = [
        limited.command("reserve_stock", {"sku": "SKU-1", "quantity": 1}) for _ in range(3)
    ]
    assert [r.status_code for r in reservations] == [200, 429, 429]
    reserved = reservations[0].json()["reservation_id"]
    release = {"sku": "SKU-1", "reservation_id": reserved}
    assert limited.command("release_reservation", release).status_code == 200


# -- CORS -----------------------------------------------------------------------------------


def preflight(api: Api) -> httpx.Response:
    headers = {
        "Origin": "https://dashboard.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    return api.run(api.client.options("/v1/balances", headers=headers))


def test_cors_is_off_by_default(sqlite_api: Api) -> None:
    assert "access-control-allow-origin" not in preflight(sqlite_api).headers


def test_cors_for_the_origins_given(tmp_path: Path) -> None:
    options = HttpOptions(cors_origins=("https://dashboard.example",))
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", options)
    try:
        allowed = preflight(api).headers.get("access-control-allow-origin")
        assert allowed == "https://dashboard.example"
    finally:
        api.close()


def test_an_allowed_origin_can_read_an_outage_or_a_bugs_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 or a 500 is answered with the CORS headers of any other answer: a page on an
    allowed origin reads its code (and its Retry-After) rather than a network error."""
    options = HttpOptions(cors_origins=("https://dashboard.example",))
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", options)
    errors = [psycopg.OperationalError("connection refused"), RuntimeError("a bug")]

    async def failing(command: object) -> None:
        raise errors.pop(0)

    try:
        account = api.open_account()
        monkeypatch.setattr(api.parts.ledger, "execute", failing)
        origin = {"Origin": "https://dashboard.example"}
        replies = [
            api.command("deposit", {"account_id": account, "amount": 5}, headers=origin)
            for _ in range(2)
        ]
    finally:
        api.close()
    assert [r.status_code for r in replies] == [503, 500]
    for reply in replies:
        assert reply.headers.get("access-control-allow-origin") == "https://dashboard.example"
    assert "retry-after" in replies[0].headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize(
    "value",
    [
        "https://dashboard.example/",  # a trailing slash: no browser sends one
        "https://dashboard.example/app",
        "https://dashboard.example?x=1",
        "https://dashboard.example#top",
        "dashboard.example",
        "https://",
        "https://dashboard.example:0",
        "https://dashboard.example:99999",
        "https://dashboard.example:443",  # a browser leaves the default port out
        "http://dashboard.example:80",
        "http://dashboard.example:0080",
        "http://[0:0:0:0:0:0:0:1]:8000",  # a browser writes [::1]
        "http://[not:an:address]",
        "1https://dashboard.example",
        "https://user@dashboard.example",
        "HTTPS://DASHBOARD.EXAMPLE",  # browsers send an origin in lowercase
        "",
        "**",
    ],
)
def test_serve_refuses_a_cors_origin_that_no_browser_sends(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--cors-origin`` took anything: a value no browser's Origin ever equals (a trailing
    slash, a path) allowed nobody, and nothing said so. Refused as the options are read, in
    one line. (``--tls-cert`` alone stops the server before it opens anything, should the
    value be taken.)"""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--cors-origin", value, "--tls-cert", "missing.pem"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert "--cors-origin" in error and repr(value) in error, error


def test_serve_takes_every_cors_origin_a_browser_sends() -> None:
    from daybook.infrastructure.cli import build_parser

    origins = [
        "*",
        "https://dashboard.example",
        "http://localhost:3000",
        "http://127.0.0.1:8080",
        "http://[::1]:8000",
        "https://xn--bcher-kva.example",
        "https://dashboard.example:8443",
        "http://dashboard.example:443",
        "capacitor://localhost",  # an app's web view
        "chrome-extension://abcdefghijklmnopabcdefghijklmnop",
    ]
    arguments = [part for origin in origins for part in ("--cors-origin", origin)]
    args = build_parser().parse_args(["serve", *arguments])
    assert args.cors_origin == origins


def test_the_dashboards_reads_count_against_the_tokens_rate(limited: Api) -> None:
    """Rate limits are per token, a bucket of N requests a second: ``/v1/dashboard``, the
    costliest read (a fresh read-model connection and every projection's status per call),
    was not counted, so a read token over its rate was answered every time."""
    limited.token("board", "read")
    replies = [limited.get("/v1/dashboard", who="board") for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 429, 429]
    assert replies[2].json()["code"] == "rate_limited"


def test_dashboard_polls_do_not_hold_up_a_batch(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ``/v1/dashboard`` ran its view in the event loop's default thread pool, as many
    at once as were sent (no read door, no rate): a read token's burst of polls, each slow
    on a loaded database, queued there ahead of a ``/v1/batch``'s key check, which runs in
    that pool too, and the writer waited for every poll before it."""
    from daybook.infrastructure.http import board

    api = sqlite_api
    account = api.open_account()
    api.token("board", "read")
    slow = board.projection_status
    # A database under load: every poll's view is held until the batch is answered (or,
    # should the batch wait for the polls, until the valve opens).
    release = threading.Event()
    valve = threading.Timer(60, release.set)

    def loaded(*args: Any, **kwargs: Any) -> Any:
        release.wait()
        return slow(*args, **kwargs)

    monkeypatch.setattr(board, "projection_status", loaded)

    async def scenario() -> bool:
        polls = [
            asyncio.ensure_future(api.client.get("/v1/dashboard", headers=api.auth("board")))
            for _ in range(60)
        ]
        await asyncio.sleep(0.1)  # the polls are in
        body = {
            "commands": [{"command": "deposit", "fields": {"account_id": account, "amount": 5}}]
        }
        headers = {**api.auth("tester"), "Idempotency-Key": api.key()}
        reply = await api.client.post("/v1/batch", json=body, headers=headers)
        before_the_polls = not release.is_set()
        release.set()
        assert reply.status_code == 200, reply.text
        await asyncio.gather(*polls)
        return before_the_polls

    valve.start()
    try:
        assert api.run(scenario()), "the batch waited for the dashboard polls"
    finally:
        valve.cancel()
        release.set()


def test_an_allowed_origin_may_send_and_read_the_request_id_and_trace(tmp_path: Path) -> None:
    """Every answer carries ``X-Request-Id`` (the client's, or a new one), and a request's
    span continues an incoming ``traceparent``: a page on an allowed origin that sent either
    (OpenTelemetry's browser instrumentation adds ``traceparent`` to every fetch) had its
    preflight refused, a plain-text ``400 Disallowed CORS headers``, and the request was never
    sent; nor could it read the ``X-Request-Id`` it was answered with."""
    options = HttpOptions(cors_origins=("https://dashboard.example",))
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", options)
    try:
        origin = {"Origin": "https://dashboard.example"}
        for sent in ("x-request-id", "traceparent", "tracestate"):
            headers = {
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": (
                    f"authorization,content-type,idempotency-key,{sent}"
                ),
            }
            reply = api.run(api.client.options("/v1/commands/deposit", headers=headers))
            assert reply.status_code == 200, (sent, reply.text)
        answer = api.run(api.client.get("/v1/balances", headers={**api.auth("tester"), **origin}))
        exposed = answer.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed, exposed
    finally:
        api.close()
