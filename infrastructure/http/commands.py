"""Commands over HTTP: ``POST /v1/commands/<name>`` for every registered command, derived
from the registry (a command added to daybook, or by an embedding service before the app is
built, is served with nothing else to write).

The body is a JSON object of the command's arguments (``parameters(command)``, less
``request_id`` and ``actor``, which the server sets). Values reach the command's own checks
unconverted: ``12.5``, ``"100"``, ``true`` and ``2**63`` are refused by the same rule, with
the same code, as through the Python API, never coerced.

Every POST needs an ``Idempotency-Key`` (the IETF httpapi idempotency-key draft): the key,
scoped by the caller's token, is the command's request id, so the ledger's own idempotency
records answer a retry: the same key and payload get the original receipt (``replayed``,
and the header ``Idempotent-Replayed: true``) or the original refusal; another payload under
the key is ``422 idempotency_conflict``; a retry while the first request is still in this
server is ``409 idempotency_key_in_use``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints
from uuid import UUID

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from daybook.domain.commands import Command, Receipt, parameters, registered
from daybook.domain.errors import DomainError, IdempotencyConflict
from daybook.domain.linked import Atomic
from daybook.domain.values import shown
from daybook.infrastructure.http.admission import Door
from daybook.infrastructure.http.auth import Authenticator
from daybook.infrastructure.http.problems import PROBLEM_JSON, Problem
from daybook.infrastructure.http.tokens import Token
from daybook.infrastructure.ledger.application import count_refused
from daybook.infrastructure.ledger.facade import AsyncLedger
from daybook.infrastructure.ledger.group_commit import LedgerClosed
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.nesting import MAX_NESTING, json_text, nested_deeper_than

#: Fields the server fills in: the caller cannot send them.
_SERVER_SET = frozenset({"request_id", "actor", "traceparent"})
#: The draft makes the key a structured-field String ("..." with \\ escapes, RFC 8941); a
#: bare key (printable ASCII, no spaces, quotes, backslashes or commas) is taken too. Not a
#: comma: a proxy may merge two Idempotency-Key lines into one joined by a bare comma (RFC
#: 9110 5.3), and "a,b" must be refused as two keys, not taken as one.
_QUOTED = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\]){1,128})"')
_BARE = re.compile(r"[\x21\x23-\x2b\x2d-\x5b\x5d-\x7e]{1,128}")
_JSON_TYPE = re.compile(r"application/([a-z0-9.+-]*\+)?json\s*(;.*)?$", re.IGNORECASE)


@dataclass
class CommandRoutes:
    ledger: AsyncLedger
    auth: Authenticator
    door: Door
    #: Request ids (scoped keys) of requests this server is processing.
    in_flight: set[str] = field(default_factory=set)
    #: The OpenAPI path items of the command routes.
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @contextlib.contextmanager
    def in_progress(self, request_id: str, key: str) -> Iterator[None]:
        """``request_id`` marked in progress for the block, checked and marked before anything
        is awaited: a second request with its key, checked while this one awaits, is refused
        ``409 idempotency_key_in_use`` (``in_use``)."""
        if request_id in self.in_flight:
            raise in_use(key)
        self.in_flight.add(request_id)
        try:
            yield
        finally:
            self.in_flight.discard(request_id)

    def install(self, app: FastAPI, commands: Iterable[type[Command]] | None = None) -> None:
        """Add a route per command to ``app`` (on the app itself: an included router is
        matched a second time on every request)."""
        for command_class in commands if commands is not None else registered():
            # Linked commands have a route of their own (``/v1/atomic``), which reads a list.
            if command_class.public and command_class is not Atomic:
                self._add(app, command_class)

    def _add(self, app: FastAPI, command_class: type[Command]) -> None:
        accepted = {p.name: p for p in parameters(command_class) if p.name not in _SERVER_SET}
        required = [name for name, p in accepted.items() if p.required]
        caller = self.auth.require("write", exempt=command_class.reduces_risk)

        async def run(request: Request) -> Response:
            # The token is checked here rather than as a FastAPI dependency: resolving
            # dependencies costs more per request than everything else in this function.
            token = await caller(request)
            if not command_class.reduces_risk:
                return await handle(request, token)
            # Let in over the token's rate: counted if it reduces nothing (``take``).
            with self.auth.limits.wasted_if_refused(token.name, token.rate, exempt=True):
                return await handle(request, token)

        async def handle(request: Request, token: Token) -> Response:
            key = idempotency_key(request)
            body = await json_body(request)
            with counted_if_refused(command_class.name):
                arguments = arguments_of(body, command_class, accepted, required)
            request_id = f"{token.name}/{key}"
            with self.in_progress(request_id, key):
                with counted_if_refused(command_class.name):
                    await self.refuse_earlier_batch_item(token.name, key)
                try:
                    with counted_if_refused(command_class.name):
                        command = command_class(
                            **arguments, request_id=request_id, actor=token.name
                        )
                except DomainError as error:
                    raise Problem.of(error) from None
                receipt = await self._execute(command, command_class.reduces_risk)
            return receipt_response(receipt, key)

        doc = (command_class.__doc__ or command_class.name).strip()
        path = f"/v1/commands/{command_class.name}"
        # A plain Starlette route: this is the hot path, and FastAPI's per-request machinery
        # (parameter resolution, telemetry, its own route matching) cost as much CPU as
        # everything the route does; the body is parsed here anyway. Its OpenAPI operation
        # is written from the registry below and merged into the document (``app.py``).
        app.router.routes.append(
            _CommandRoute(path, run, methods=["POST"], name=command_class.name)
        )
        self.operations[path] = {
            "post": {
                "tags": ["commands"],
                "summary": doc.splitlines()[0],
                "description": _description(doc, command_class),
                "operationId": command_class.name,
                **_openapi(command_class, accepted, required),
            }
        }

    async def _execute(self, command: Command, always: bool) -> Receipt:
        """``command`` run by the ledger once the command door admits it (``always``: a
        command that reduces risk, never shed); a refusal becomes a ``Problem``."""
        self.door.enter(always=always)
        try:
            return await self.ledger.execute(command)
        except DomainError as error:
            raise Problem.of(error) from None
        except LedgerClosed:
            raise self.closed() from None
        finally:
            self.door.leave()

    def closed(self) -> Problem:
        """The answer to a command the ledger took no more: the server is stopping (503,
        retry shortly), or the ledger's writer failed on a defect, which no retry cures
        until the server is restarted (500; its log has the traceback)."""
        if self.ledger.service.health().state is ServiceState.FAILED:
            return Problem(
                "internal_error",
                "the server's ledger stopped on a defect and takes no command until the "
                "server is restarted (its log says why); nothing of this request was applied",
            )
        return Problem(
            "shutting_down",
            "the server is stopping and took no new command; retry shortly",
            headers={"Retry-After": "5", "Connection": "close"},
        )

    async def refuse_earlier_batch_item(self, token: str, key: str) -> None:
        """Refuse a key ``K/i`` while ``K`` holds the claim of a batch an earlier daybook ran:
        it recorded item ``i`` under ``<token>/K/i``, this key's own request id, so the
        ledger would take this request for that item's retry (and answer a command it never
        applied with the item's receipt). Such claims expire with the retention window of
        request records; a batch run now has ids of its own (``lists.item_ids``)."""
        shaped = _ITEM_KEY.fullmatch(key)
        if shaped is None:
            return  # the common case: no lookup
        scope = f"{token}/{shaped.group(1)}"
        found = await asyncio.to_thread(self.ledger.service.recorded, [scope])
        if scope in found and found[scope].command == EARLIER_BATCH_CLAIM:
            raise Problem.of(
                IdempotencyConflict(
                    f"Idempotency-Key {key!r} names item {shaped.group(2)} of the batch sent "
                    f"with the key {shaped.group(1)!r} before this server was upgraded (its "
                    "items were recorded under their batch's key and index); use another key"
                )
            )


#: The ``command`` of the claim on its key of a batch an earlier daybook ran, which recorded
#: item ``i`` under ``<token>/<key>/<i>``: ids a single command keyed ``<key>/<i>`` has too.
EARLIER_BATCH_CLAIM = "batch"
#: A key such a batch's item ids end with: ``<key>/<i>``, ``i`` as ``str(int)`` writes it.
_ITEM_KEY = re.compile(r"(.+)/(0|[1-9][0-9]*)")


class _CommandRoute(Route):
    """A plain route that, like FastAPI's own, names itself in the scope when it matches
    (metrics and traces label requests by route template: ``observe``)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def in_use(key: str) -> Problem:
    return Problem(
        "idempotency_key_in_use",
        f"a request with Idempotency-Key {key!r} is still being processed; retry once it has "
        "been answered",
        headers={"Retry-After": "1"},
    )


def idempotency_key(request: Request) -> str:
    """The request's Idempotency-Key. Sent twice (two field lines: one field ``a, b`` to
    HTTP, whatever a proxy made of them), it is refused, as the two keys on one line are:
    which key a request means must not depend on the proxies it went through."""
    headers = request.headers.getlist("idempotency-key")
    if len(headers) > 1:
        raise Problem(
            "idempotency_key_invalid",
            f"send one Idempotency-Key header, not {len(headers)}",
        )
    header = headers[0] if headers else None
    if header is None or not header.strip():
        raise Problem(
            "idempotency_key_missing",
            "this operation needs an Idempotency-Key header (a fresh UUID per operation; "
            "send the same key to retry it)",
        )
    value = header.strip()
    quoted = _QUOTED.fullmatch(value)
    if quoted is not None:
        return re.sub(r"\\(.)", r"\1", quoted.group(1))
    if not _BARE.fullmatch(value):
        raise Problem(
            "idempotency_key_invalid",
            "the Idempotency-Key must be one string of 1-128 printable ASCII characters, "
            'quoted ("...") or without spaces, quotes, backslashes and commas (a comma '
            "separates two keys)",
        )
    return value


async def json_body(request: Request) -> Any:
    media = request.headers.get("content-type", "")
    if not _JSON_TYPE.match(media.strip()):
        # The header is the client's, cut as any echoed input is (``shown``).
        sent = shown(media) if media else "without a Content-Type"
        raise Problem("unsupported_media_type", f"send the body as application/json, not {sent}")
    body = await request.body()
    try:
        text = json_text(body)
        if nested_deeper_than(text, MAX_NESTING):
            raise Problem(
                "malformed_json",
                f"the body is not valid JSON: its values are nested too deeply (more than"
                f" {MAX_NESTING} levels)",
            )
        # The standard library's parser, not orjson: it keeps integers of any size exact (so
        # 2**64 is refused as too large, not read as a float), and it lets us refuse repeated
        # members and NaN, which would otherwise make one body mean two things. It recurses
        # once per level of nesting: hence the check above.
        return json.loads(
            text,
            object_pairs_hook=_unique_members,
            parse_constant=_no_constant,
            parse_int=_integer,
        )
    except (ValueError, UnicodeDecodeError) as error:
        raise Problem("malformed_json", f"the body is not valid JSON: {error}") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise Problem(
            "malformed_json", "the body is not valid JSON: its values are nested too deeply"
        ) from None


#: Integers longer than this are refused as they are read, before Python spends time
#: converting them (no command takes one past 2**63, which has 19 digits; shorter ones still
#: reach the command's own check and its code, ``invalid_amount`` say).
_MAX_DIGITS = 100


def _integer(text: str) -> int:
    if len(text.removeprefix("-")) > _MAX_DIGITS:
        raise ValueError(f"a number has more than {_MAX_DIGITS} digits")
    return int(text)


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"member {shown(name)} appears twice")
        result[name] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


@contextlib.contextmanager
def counted_if_refused(command: str) -> Iterator[None]:
    """Count a refusal of a command before the ledger has it, in ``daybook_commands_total``
    by command and code, as the ledger counts the refusals it answers: its arguments, as the
    body is made into the command (an unknown argument, an amount of -5), and its key, held
    by an earlier daybook's batch (``refuse_earlier_batch_item``)."""
    try:
        yield
    except (DomainError, Problem) as refused:
        count_refused(command, refused.code)
        raise


def arguments_of(
    body: Any,
    command_class: type[Command],
    accepted: dict[str, Any],
    required: list[str],
) -> dict[str, Any]:
    """The command's keyword arguments from a JSON body, names checked (values are checked
    by the command itself)."""
    if not isinstance(body, dict):
        raise Problem(
            "invalid_request",
            f"the body must be a JSON object of {command_class.name}'s arguments",
        )
    takes = ", ".join(accepted)
    unknown = [name for name in body if name not in accepted]
    if unknown:
        # Named as sent, but the first few only, each cut short (``shown``): the names are
        # the client's, and a body of a megabyte may be made of them.
        first = unknown[:_NAMES_SHOWN]
        named = [name if shown(name) == repr(name) else shown(name) for name in first]
        listed = ", ".join(map(shown, first))
        more = f" ({len(unknown)} unknown in all)" if len(unknown) > _NAMES_SHOWN else ""
        raise Problem(
            "invalid_request",
            f"{command_class.name} has no argument {listed}{more}; it takes {takes}",
            details={"unknown": named},
        )
    missing = [name for name in required if name not in body]
    if missing:
        raise Problem(
            "invalid_request",
            f"{command_class.name} needs {', '.join(map(repr, missing))}; it takes {takes}",
            details={"missing": missing},
        )
    # null for an optional argument means "not given" (the ledger generates or omits it).
    return {k: v for k, v in body.items() if v is not None or accepted[k].required}


#: Unknown argument names a refusal lists (each as sent, or cut as ``shown`` cuts it).
_NAMES_SHOWN = 10


def receipt_body(receipt: Receipt) -> dict[str, Any]:
    """Every field of ``receipt`` as JSON (ids as text), those it leaves unset (None) left
    out; a linked list's receipts (``linked``), one per command, the same way."""
    body: dict[str, Any] = {}
    for spec in fields(receipt):
        value = getattr(receipt, spec.name)
        if spec.name == "linked":
            if value:
                body["linked"] = [receipt_body(part) for part in value]
        elif value is not None:
            body[spec.name] = str(value) if isinstance(value, UUID) else value
    return body


def receipt_response(receipt: Receipt, key: str) -> Response:
    body = receipt_body(receipt)
    body["idempotency_key"] = key
    headers = {"Daybook-Position": str(receipt.position)}
    if receipt.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


# -- OpenAPI --------------------------------------------------------------------------------

_RECEIPT_DESCRIPTIONS = {
    "position": "log position of the command's last event",
    "replayed": "true when this answers a retry of a command applied before",
    "linked": "a linked list's receipts, one per command in order (POST /v1/atomic)",
}


def receipt_schema() -> dict[str, Any]:
    """The receipt's JSON schema, from ``Receipt``'s own fields (a field added there is
    answered and described with nothing else to write)."""
    hints = get_type_hints(Receipt)
    properties: dict[str, Any] = {}
    required = []
    for spec in fields(Receipt):
        if spec.name == "linked":
            schema: dict[str, Any] = {
                "type": "array",
                "items": {"$ref": "#/components/schemas/Receipt"},
            }
        else:
            schema = _schema_of(hints[spec.name])
        if spec.name in _RECEIPT_DESCRIPTIONS:
            schema["description"] = _RECEIPT_DESCRIPTIONS[spec.name]
        properties[spec.name] = schema
        unset = spec.default is MISSING and spec.default_factory is MISSING
        if unset or spec.name == "replayed":
            required.append(spec.name)
    return {
        "type": "object",
        "description": "The command's receipt; the fields it leaves unset are left out.",
        "properties": properties,
        "required": required,
    }


#: The answer of a command route: the receipt and the key it was sent with.
_RECEIPT_SCHEMA = {
    "allOf": [
        {"$ref": "#/components/schemas/Receipt"},
        {
            "type": "object",
            "properties": {"idempotency_key": {"type": "string"}},
            "required": ["idempotency_key"],
        },
    ]
}


def _schema_of(annotation: Any) -> dict[str, Any]:
    """The JSON schema of an argument, from its annotation (``Annotated`` checks unwrapped;
    ``X | None`` is X)."""
    origin = get_origin(annotation)
    if origin in (tuple, list):
        items = [a for a in get_args(annotation) if a is not Ellipsis]
        return {"type": "array", "items": _schema_of(items[0]) if items else {}}
    if origin is dict or annotation is dict:
        return {"type": "object"}
    args = [a for a in get_args(annotation) if a is not type(None)]
    base = args[0] if origin is not None and args else annotation
    if base is not annotation:
        return _schema_of(base)
    if base is int:
        return {"type": "integer"}
    if base is UUID:
        return {"type": "string", "format": "uuid"}
    if base is bool:
        return {"type": "boolean"}
    if dataclasses.is_dataclass(base):  # sent as a list of its fields, in order (a line)
        fields = dataclasses.fields(base)
        hints = get_type_hints(base)
        return {
            "type": "array",
            "prefixItems": [_schema_of(hints[f.name]) for f in fields],
            "minItems": len(fields),
            "maxItems": len(fields),
            "description": ", ".join(f.name for f in fields),
        }
    return {"type": "string"}


def _description(doc: str, command_class: type[Command]) -> str:
    risk = (
        "\n\nReduces risk: never shed under load, not counted against rate limits."
        if command_class.reduces_risk
        else ""
    )
    return doc + risk


def _openapi(
    command_class: type[Command], accepted: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    properties = {name: _schema_of(p.annotation) for name, p in accepted.items()}
    problem = {"content": {PROBLEM_JSON: {"schema": {"type": "object"}}}}
    return {
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "maxLength": 130},
                "description": "A fresh key per operation; resend it to retry safely.",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": properties,
                        "required": required,
                        "additionalProperties": False,
                    }
                }
            },
        },
        "responses": {
            "200": {
                "description": "The receipt (also for a replay: Idempotent-Replayed: true)",
                "content": {"application/json": {"schema": _RECEIPT_SCHEMA}},
            },
            "400": {"description": "Malformed request", **problem},
            "404": {"description": "Something the command names does not exist", **problem},
            "409": {"description": "Refused by the ledger's state", **problem},
            "422": {"description": "Refused by a rule about the values", **problem},
            "503": {"description": "Overloaded or stopping; see Retry-After", **problem},
            "507": {
                "description": "The database is out of disk space: nothing was applied",
                **problem,
            },
        },
    }
