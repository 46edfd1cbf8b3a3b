"""Each HTTP request measured, traced and logged with the ids that caused it.

One ASGI middleware, outside everything else: a server span per request (continuing the
caller's trace when it sends a ``traceparent`` header), the request counted and timed by
method, route template and status (templates, not paths: a label per account id would grow
without bound; and methods outside HTTP's own as ``other``, since the method is any token a
client sends), and the request's ids (the caller's ``X-Request-Id`` or a fresh one, the
trace) on every log line written while it is handled and on the answer (``X-Request-Id``).
Errors are answered below it (``app.Unhandled``), so what it counts, logs and traces is the
status sent, an error's included.
"""

from __future__ import annotations

import logging
from time import perf_counter

from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daybook.domain.ids import new_id_text
from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.observability.logs import log_context, one_line

_UNMATCHED = "unmatched"
#: The methods HTTP defines (RFC 9110, and PATCH); the metrics call any other ``other``.
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_OTHER = "other"


log = logging.getLogger("daybook.http.access")


class Observe:
    def __init__(self, app: ASGIApp, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:200] or new_id_text()
        parent = headers.get(b"traceparent", b"").decode("latin-1") or None
        method = scope["method"]
        # Counted when no answer started: an exception raised above ``Unhandled`` (or after
        # an answer began), which the framework answers 500 outside this middleware.
        status = 500
        request_header = (b"x-request-id", request_id.encode("latin-1"))

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], request_header]
            await send(message)

        started = perf_counter()
        with (
            log_context(request_id=request_id),
            tracing.span(f"HTTP {method}", parent=parent, kind=SpanKind.SERVER) as span,
        ):
            try:
                await self.app(scope, receive, sending)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", _UNMATCHED)
                span.update_name(f"{method} {template}")
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", status)
                seconds = perf_counter() - started
                measured = method if method in _METHODS else _OTHER
                metrics.HTTP_REQUESTS.labels(measured, template, str(status)).inc()
                metrics.HTTP_SECONDS.labels(measured, template).observe(seconds)
                if self.access_log:  # inside the request's context: its ids are on the line
                    fields = {"method": method, "route": template, "status": status}
                    log.info(
                        "%s %s %d %.1f ms",
                        method,
                        one_line(scope.get("path", "")),  # decoded: %0A is a newline
                        status,
                        seconds * 1000,
                        extra={"fields": {**fields, "seconds": round(seconds, 6)}},
                    )
