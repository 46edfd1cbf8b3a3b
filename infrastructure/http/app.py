"""The ASGI application behind ``daybook serve`` (FastAPI, served by uvicorn).

``create_app(parts)`` wires routes to what ``bootstrap.http_parts`` built: the asyncio ledger,
a pool of read-model connections, the token store, and (when the server runs them) the
projections. Routes: ``POST /v1/commands/<name>`` per registered command, ``POST
/v1/atomic`` and ``POST /v1/batch`` for lists of them (``lists``), reads under
``/v1/``, ``GET /health``, ``GET /v1/status`` (admin), ``/problems/<code>`` (what a problem
code means), the OpenAPI document (``/openapi.json``), its docs pages (``/docs``,
``/redoc``) and the dashboard (``board``). Every route needs a token but ``/health``, the
problem pages, the docs and the dashboard's page and files, none of which holds data. A
query parameter a route does not define is refused (``parameters``), not ignored.

Every error is problem+json (``problems``), a bug included: it is logged with its
traceback on the server, once, and answered ``500 internal_error`` without one. A bug, a
database outage (``503 unavailable``) and a read model a deploy changed (``503
read_model_changed``) are answered inside ``Observe`` (``Unhandled``): counted, logged and
traced with the status sent and the request's ids, and the exception goes no further (the
server would log it again, with its traceback). A client that hangs up before its body has
arrived is no error of the server's: counted as ``499``, not logged as a bug, and not
answered (nobody is there). Bodies larger than ``max_body_bytes`` are refused while they
arrive. CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daybook.domain.values import shown
from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.http.admission import Door, RateLimits
from daybook.infrastructure.http.auth import Authenticator
from daybook.infrastructure.http.board import Dashboard
from daybook.infrastructure.http.commands import CommandRoutes, receipt_schema
from daybook.infrastructure.http.lists import ListRoutes
from daybook.infrastructure.http.observe import Observe
from daybook.infrastructure.http.options import HttpOptions
from daybook.infrastructure.http.parameters import refuse_unknown_parameters
from daybook.infrastructure.http.problems import (
    Problem,
    describe,
    is_outage,
    out_of_storage,
    unavailable,
)
from daybook.infrastructure.http.reads import ReadPool, ReadRoutes
from daybook.infrastructure.http.tokens import Token, TokenStore
from daybook.infrastructure.ledger.facade import AsyncLedger
from daybook.infrastructure.lifecycle import Health
from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.observability.logs import one_line
from daybook.infrastructure.readmodels import ReadModelChanged
from daybook.infrastructure.transient import first_line, login_refused

log = logging.getLogger("daybook.http")


@dataclass
class HttpParts:
    """What the application serves; ``close`` releases it (the projections first)."""

    ledger: AsyncLedger
    pool: ReadPool
    tokens: TokenStore
    options: HttpOptions = field(default_factory=HttpOptions)
    #: Health of the other services this process runs (request purge, projections), by name.
    services: dict[str, Callable[[], Health]] = field(default_factory=dict)
    #: The event log and the read-model database, for the dashboard (None: no dashboard).
    log: EventLog | None = None
    readmodels_url: str | None = None
    on_close: list[Callable[[], None]] = field(default_factory=list)

    async def close(self) -> None:
        for close in self.on_close:
            # Stopping a service joins its thread (up to its drain timeout): off the event
            # loop, which may still be answering requests meanwhile.
            await asyncio.to_thread(close)
        self.pool.close()
        await self.ledger.close()
        self.tokens.close()


def create_app(parts: HttpParts, *, owns_parts: bool = True) -> FastAPI:
    """The application; with ``owns_parts``, its shutdown (after the server has answered
    every request in progress) closes them, so the committer finishes what it was given."""
    options = parts.options
    limits = RateLimits(options.token_rate)
    auth = Authenticator(parts.tokens, limits, options.token_cache_seconds)
    command_door = Door("command", options.command_capacity)
    read_door = Door("read", options.read_capacity)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        auth.close()
        if owns_parts:
            await parts.close()
        # The last requests' spans: the process ends by the signal, without atexit.
        await asyncio.to_thread(tracing.flush_tracing)

    app = FastAPI(
        title="daybook",
        summary="An event-sourced ledger: strict writes, reads that say how fresh they are.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.parts = parts
    app.state.auth = auth
    app.state.doors = {"command": command_door, "read": read_door}
    app.state.limits = limits
    commands = CommandRoutes(parts.ledger, auth, command_door)
    app.state.commands = commands
    commands.install(app)
    ListRoutes(commands).install(app)
    reads = ReadRoutes(parts.pool, auth, read_door, options.max_read_wait)
    reads.install(app)
    if parts.log is not None and parts.readmodels_url is not None:
        Dashboard(parts.pool, auth, parts.log, parts.readmodels_url).install(app)

    @app.get("/health", tags=["service"], summary="Liveness and the health of each part")
    async def health(request: Request) -> Response:
        states = {"committer": await parts.ledger.health()}
        states.update({name: check() for name, check in parts.services.items()})
        ok = all(h.ok for h in states.values())
        # What went wrong (a database's host and port, a table's name) only to an admin:
        # anyone may ask this route, and the state alone says whether to send traffic.
        shown = await auth.shows(request, "admin")
        body = {
            "status": "ok" if ok else "failing",
            "services": {
                name: {
                    "state": h.state.value,
                    "restarts": h.restarts,
                    **({"error": h.error} if shown else {}),
                }
                for name, h in states.items()
            },
        }
        return _json(body, 200 if ok else 503)

    # HEAD too, as a load balancer's health check may probe (answered without a body): a
    # route of its own, out of the OpenAPI document, whose operation ids must be unique.
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    admin = Depends(auth.require("admin"))
    reader = Depends(auth.require("read", limited=False))

    @app.get("/v1/status", tags=["service"], summary="Admission, rate limits and the log head")
    async def status(_: Token = admin) -> Response:
        doors = {
            door.name: {
                "in_progress": door.inside,
                "capacity": door.capacity,
                "admitted": door.admitted,
                "shed": door.shed,
                "drain_per_second": round(door.rate.per_second, 1),
            }
            for door in (command_door, read_door)
        }
        head = await parts.ledger.head()
        return _json({"admission": doors, "rate_limited": limits.limited, "head": head})

    @app.get("/problems/{code}", tags=["service"], summary="What a problem code means")
    async def problem(code: str) -> Response:
        text = describe(code)
        if text is None:
            raise Problem("not_found", f"no problem has the code {shown(code)}")
        return _json({"code": code, "description": text})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema["paths"] = {**commands.operations, **schema["paths"]}
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {})["Receipt"] = receipt_schema()
            schemes = components.setdefault("securitySchemes", {})
            schemes["bearer"] = {"type": "http", "scheme": "bearer"}
            schema["security"] = [{"bearer": []}]
            for path in ("/health", "/problems/{code}"):
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (read scope)")
    async def prometheus(_: Token = reader) -> Response:
        for door in (command_door, read_door):
            metrics.ADMISSION_DEPTH.labels(door.name).set(door.inside)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # Every route now exists (FastAPI added its documentation pages as it was made). The
    # page Swagger UI's OAuth2 login returns to is left alone: the parameters it receives
    # are the identity provider's, not daybook's.
    oauth2 = app.swagger_ui_oauth2_redirect_url if app.docs_url else None
    refuse_unknown_parameters(app, unchecked={oauth2} if oauth2 else set())
    _handle_errors(app)
    # Innermost of ours: its answers pass through BodyLimit, CORS (a browser may read them)
    # and Observe (they are measured, and carry the request's id) like every other answer.
    app.add_middleware(Unhandled)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes, idle=options.body_timeout)
    if options.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Daybook-Min-Position",
                # What every request may carry: its id, and the trace it continues.
                "X-Request-Id",
                "traceparent",
                "tracestate",
            ],
            expose_headers=[
                "X-Request-Id",
                "Daybook-Position",
                "Daybook-As-Of-Position",
                "Daybook-Lag-Events",
                "Idempotent-Replayed",
                "Retry-After",
            ],
        )
    # Outermost: every request is measured and traced, refusals and errors included.
    app.add_middleware(Observe, access_log=options.access_log)
    return app


#: The status a request whose client hung up is counted under (nginx's "client closed
#: request"): not sent, since nobody is there to read it.
CLIENT_CLOSED_REQUEST = 499


def _methods_at(app: FastAPI, scope: Scope) -> list[str]:
    """The methods the routes at ``scope``'s path take, sorted."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.matches(scope)[0] is not Match.NONE:
            methods.update(route.methods or ())
    return sorted(methods)


def _handle_errors(app: FastAPI) -> None:
    async def problem(request: Request, error: Exception) -> Response:
        assert isinstance(error, Problem)
        return error.response()

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if error.status_code == 404:
            return Problem("not_found", f"nothing is at {shown(request.url.path)}").response()
        if error.status_code == 405:
            # RFC 9110 15.5.6: a 405 must say, in Allow, which methods the path takes: those
            # of every route at the path (the exception's headers name the first one's only).
            allowed = ", ".join(_methods_at(app, request.scope))
            return Problem(
                "method_not_allowed",
                f"{shown(request.url.path)} does not take {request.method}; it takes {allowed}",
                headers={"Allow": allowed},
            ).response()
        return Problem("invalid_request", str(error.detail), status=error.status_code).response()

    async def invalid(request: Request, error: Exception) -> Response:
        return Problem(
            "invalid_parameter", "a parameter has a value that cannot be used"
        ).response()

    async def hung_up(request: Request, error: Exception) -> Response:
        # The client (or a proxy) closed the connection before its body arrived: nothing
        # was done, and nobody is left to answer. Counted as nginx counts it, never as a 500.
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.add_exception_handler(Problem, problem)
    app.add_exception_handler(ClientDisconnect, hung_up)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    # Only for an exception out of the middlewares outside ``Unhandled``, which answers the
    # routes' own: Starlette gives a handler of ``Exception`` to its outermost middleware.
    app.add_exception_handler(Exception, _unhandled)


async def _unhandled(request: Request, error: Exception) -> Response:
    """The answer to an exception no handler of its own took, logged."""
    if isinstance(error, ReadModelChanged):  # a deploy under way, not a bug here
        log.warning("%s %s: %s", request.method, one_line(request.url.path), error)
        return Problem("read_model_changed", str(error), headers={"Retry-After": "5"}).response()
    if (full := out_of_storage(error)) is not None:  # the operator's to mend: one line
        log.error("%s %s: the database is out of disk space: %s", request.method,
                  one_line(request.url.path), first_line(error))  # fmt: skip
        return full.response()
    if login_refused(error):  # credentials rotated, a role dropped: the operator's to mend
        log.error("%s %s: a database refused daybook's connection: %s", request.method,
                  one_line(request.url.path), first_line(error))  # fmt: skip
        return unavailable(error).response()
    if is_outage(error):  # an outage, not a bug: one line, no traceback
        log.warning("%s %s: a database did not answer: %s", request.method,
                    one_line(request.url.path), error)  # fmt: skip
        return unavailable(error).response()
    log.error("%s %s failed", request.method, one_line(request.url.path), exc_info=error)
    return Problem(
        "internal_error", "the server failed to handle this request; its log says why"
    ).response()


class Unhandled:
    """Answer an exception the routes' handlers leave (a bug, an outage) as ``_unhandled``
    does, below ``Observe``, and raise it no further.

    Starlette answers such an exception in its outermost middleware, outside ``Observe``,
    and then raises it again to the server: the request would be measured, traced and
    logged as a 500 (a 503 outage too), without the request's ids on the answer or on the
    line about it, and the server would log the exception with its traceback. Once an
    answer has started nothing can be answered: the exception goes on up to the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:
            if started:
                raise
            tracing.record_failure(error)  # the request's span, as if the error had left it
            response = await _unhandled(Request(scope), error)
            await response(scope, receive, send)


#: The slowest a body may arrive on average, in bytes per second, after its first ``idle``
#: seconds (Apache's mod_reqtimeout has the same default, ``MinRate=500``).
BODY_MIN_RATE = 500


class BodyLimit:
    """Refuse bodies over ``limit`` bytes: by Content-Length at once, and while a body
    without one arrives (so nothing larger is ever held in memory); and a body whose next
    part does not arrive within ``idle`` seconds, or that arrives slower than that allows
    (``idle`` seconds, plus one per ``BODY_MIN_RATE`` bytes received), with
    ``408 request_timeout``."""

    def __init__(self, app: ASGIApp, limit: int, idle: float) -> None:
        self.app = app
        self.limit = limit
        self.idle = idle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send)
            return
        seen = 0
        arrived = False
        started: float | None = None

        async def counted() -> Message:
            nonlocal seen, arrived, started
            if arrived:  # (a wait for the client to hang up, say: no limit on it)
                return await receive()
            loop = asyncio.get_running_loop()
            now = loop.time()
            if started is None:
                started = now
            # A body that stops arriving (a client gone without closing, a stalled upload)
            # would hold its request, and a SIGTERM that waits for it, for ever; one that
            # trickles (a byte every few seconds) nearly as long, each part in time.
            deadline = started + self.idle + seen / BODY_MIN_RATE
            wait = min(self.idle, deadline - now)
            try:
                if wait <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait):  # no task of its own, as wait_for makes
                    message = await receive()
            except TimeoutError:
                if wait < self.idle:
                    detail = (
                        f"the body arrived slower than {BODY_MIN_RATE} bytes/s ({seen:,} bytes "
                        f"in {loop.time() - started:.0f}s); send it again"
                    )
                else:
                    detail = f"no part of the body arrived for {self.idle:g}s; send it again"
                raise Problem("request_timeout", detail, headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                arrived = not message.get("more_body", False)
                if seen > self.limit:
                    raise _too_large(self.limit)
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send: Send) -> None:
        response = _too_large(self.limit).response()
        response.headers["Connection"] = "close"
        await response({"type": "http"}, _nothing, send)


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


def _too_large(limit: int) -> Problem:
    return Problem("payload_too_large", f"the body is larger than {limit} bytes")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _version() -> str:
    from daybook import __version__

    return __version__


__all__: Sequence[str] = ["BodyLimit", "HttpOptions", "HttpParts", "Unhandled", "create_app"]
