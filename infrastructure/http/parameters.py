"""Query parameters a route defines: a request with any other is refused (``400
unknown_parameter``) before its route runs, rather than the parameter ignored.

An ignored parameter is a silent wrong answer: ``?min_positon=N`` (for ``min_position``) read
at once, before the write it was meant to wait for. A route's parameters are those its
operation in the OpenAPI document lists (the read routes, which read their query by hand,
write theirs there; FastAPI writes those of any other route from its signature), so what is
documented is what is taken. A route the document leaves out (the dashboard's page and
files, the documentation pages, ``/openapi.json``) takes none.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import QueryParams
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from daybook.domain.values import shown
from daybook.infrastructure.http.problems import Problem

#: Unknown names a refusal lists (each as sent, or cut as ``shown`` cuts it).
_NAMES_SHOWN = 10


def refuse_unknown_parameters(app: FastAPI, *, unchecked: Collection[str] = ()) -> None:
    """Make each route of ``app`` (but those whose path is in ``unchecked``) refuse a query
    parameter it does not define. The check runs once the route has matched, on its own
    parameters, and costs nothing to a request without a query; the parameters are read
    from the OpenAPI document when a query first arrives (it is built once, then kept)."""
    table: dict[str, tuple[str, ...]] | None = None

    def defined(path: str) -> tuple[str, ...]:
        nonlocal table
        if table is None:
            table = _query_parameters(app.openapi())
        return table.get(path, ())

    for route in app.router.routes:
        if isinstance(route, Route) and route.path not in unchecked:
            route.app = _checked(route.app, route.path_format, defined)


def _query_parameters(document: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Each path's query parameters, in the order its operations list them."""
    found: dict[str, tuple[str, ...]] = {}
    for path, operations in document.get("paths", {}).items():
        names = [
            parameter["name"]
            for operation in operations.values()
            if isinstance(operation, dict)
            for parameter in operation.get("parameters", [])
            if parameter.get("in") == "query"
        ]
        found[path] = tuple(dict.fromkeys(names))
    return found


def _checked(app: ASGIApp, path: str, defined: Callable[[str], tuple[str, ...]]) -> ASGIApp:
    async def checked(scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string")
        if query:
            takes = defined(path)
            sent = dict.fromkeys(QueryParams(query).keys())
            unknown = [name for name in sent if name not in takes]
            if unknown:
                raise _unknown(path, unknown, takes)
        await app(scope, receive, send)

    return checked


def _unknown(path: str, unknown: list[str], takes: tuple[str, ...]) -> Problem:
    # Named as sent, but the first few only, each cut short (``shown``): the names are the
    # client's, and a query may be made of many, or of one very long.
    first = unknown[:_NAMES_SHOWN]
    named = [name if shown(name) == repr(name) else shown(name) for name in first]
    listed = ", ".join(map(shown, first))
    more = f" ({len(unknown)} unknown in all)" if len(unknown) > _NAMES_SHOWN else ""
    accepted = f"it takes {', '.join(takes)}" if takes else "it takes none"
    return Problem(
        "unknown_parameter",
        f"{path} has no query parameter {listed}{more}; {accepted}",
        details={"unknown": named, "takes": list(takes)},
    )
