"""Lists of commands over HTTP: ``POST /v1/atomic`` (linked commands, all-or-nothing) and
``POST /v1/batch`` (a submission: each command on its own, one outcome each, in order).

Both take ``{"commands": [{"command": NAME, "fields": {...}}, ...]}``, each item's fields
checked as ``POST /v1/commands/<name>`` checks its body, and both need an Idempotency-Key
with the same answers as a single command (``commands``):

- ``/v1/atomic`` is one request: the key (``<token>/<key>``) is the request id of the list
  (``ledger.atomic``), so a retry replays its receipt, whose ``linked`` holds one receipt per
  command, or its refusal (the failing command's code, ``details.index`` and
  ``details.outcomes``); nothing of a refused list is written.
- ``/v1/batch`` gives item ``i`` the request id ``<token>:<key>/<i>``
  (``ledger.submit``), so each command keeps its own idempotency, and no single command's
  id (``<token>/<key>``, whatever its key) is ever an item's: a batch keyed ``K`` and a
  command keyed ``K/0`` sent after it are two operations (a command keyed ``K/<i>``, ``i``
  from 0 to the batch's length, sent before a batch keyed ``K`` looks like an item of a
  batch an earlier daybook ran: that batch is refused, below). Before anything runs, the ids are
  looked up: the same key with another list (an item changed, or the list shorter than the first)
  or already used for a single command or a linked list is ``422 idempotency_conflict`` and
  nothing is applied; the same list again answers every item's original outcome, and runs again,
  as a single command's retry would, only the items that left no record (refused
  ``concurrency_conflict`` or failed for want of the server: ``500``/``503``), and items appended
  at the end, which are new commands. A batch an earlier daybook ran, whose items it recorded
  under ``<token>/<key>/<i>``, is answered under those ids, for the same list
  only (``ListRoutes._check_batch``).

A list that cannot be read (not an object, no commands, too many, an unknown command or
field, a bad value) is refused as a whole (``400``/``422``, ``details.index`` naming the
item) before anything runs; so is a list longer than the server admits at once
(``--command-capacity``: ``422 invalid_request``, for good, rather than ``503 overloaded``
on every retry), unless it holds only commands that reduce risk, which are never shed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from daybook.domain.commands import Command, Receipt, command_named, parameters
from daybook.domain.errors import DomainError, IdempotencyConflict
from daybook.domain.linked import MAX_LINKED, Atomic
from daybook.domain.values import shown
from daybook.infrastructure.http.commands import (
    _SERVER_SET,
    EARLIER_BATCH_CLAIM,
    CommandRoutes,
    _CommandRoute,
    arguments_of,
    counted_if_refused,
    idempotency_key,
    json_body,
    receipt_body,
    receipt_response,
)
from daybook.infrastructure.http.problems import (
    PROBLEM_JSON,
    Problem,
    is_outage,
    out_of_storage,
    unavailable,
)
from daybook.infrastructure.http.tokens import Token
from daybook.infrastructure.ledger.group_commit import LedgerClosed
from daybook.infrastructure.ledger.requests import RequestRecord
from daybook.infrastructure.transient import first_line

log = logging.getLogger("daybook.http")

#: The most commands one ``POST /v1/batch`` takes (and one ``/v1/atomic``: ``MAX_LINKED``).
MAX_BATCH = 1000


def commands_of(body: Any, limit: int, actor: str, request_ids: str | None = None) -> list[Command]:
    """The commands a list's body names, each checked as its own route checks it; a
    ``Problem`` naming the first bad item otherwise (nothing has run). With
    ``request_ids``, item ``i``'s request id is ``<request_ids>/<i>``."""
    if not isinstance(body, dict) or set(body) != {"commands"}:
        raise Problem(
            "invalid_request",
            'the body must be {"commands": [{"command": NAME, "fields": {...}}, ...]}',
        )
    items = body["commands"]
    if not isinstance(items, list) or not 0 < len(items) <= limit:
        count = len(items) if isinstance(items, list) else None
        raise Problem(
            "invalid_request",
            f"commands must be a list of 1 to {limit} commands",
            details={"limit": limit, "count": count},
        )
    return [
        _command(index, item, actor, None if request_ids is None else f"{request_ids}/{index}")
        for index, item in enumerate(items)
    ]


def _command(index: int, item: Any, actor: str, request_id: str | None) -> Command:
    where = f"commands[{index}]"
    if not isinstance(item, dict) or "command" not in item or set(item) - {"command", "fields"}:
        raise Problem(
            "invalid_request",
            f'{where} must be {{"command": NAME, "fields": {{...}}}}',
            details={"index": index},
        )
    name = item["command"]
    try:
        if not isinstance(name, str):
            raise KeyError(f"the command name must be a string, got {shown(name)}")
        command_class = command_named(name)
        if command_class is Atomic:
            raise KeyError("a list cannot hold a list (atomic)")
        if not command_class.public:
            raise KeyError(f"{name} is sent only by daybook's own services, not over HTTP")
    except KeyError as error:
        raise Problem(
            "invalid_request", f"{where}: {error.args[0]}", details={"index": index}
        ) from None
    accepted = {p.name: p for p in parameters(command_class) if p.name not in _SERVER_SET}
    required = [n for n, p in accepted.items() if p.required]
    try:
        with counted_if_refused(command_class.name):
            arguments = arguments_of(item.get("fields", {}), command_class, accepted, required)
            if request_id is not None:
                arguments["request_id"] = request_id
            return command_class(**arguments, actor=actor)
    except Problem as problem:
        raise Problem(
            problem.code,
            f"{where}: {problem.detail}",
            details={**problem.details, "index": index},
        ) from None
    except DomainError as error:
        raise Problem(
            error.code,
            f"{where} ({name}): {error.message}",
            details={**error.details, "index": index},
        ) from None


@dataclass
class ListRoutes:
    """``/v1/atomic`` and ``/v1/batch``, sharing the command routes' ledger, admission and
    keys in progress."""

    commands: CommandRoutes

    def install(self, app: FastAPI) -> None:
        # The rate is taken once the list is read: a list made only of commands that reduce
        # risk is not counted against it, as such a command alone is not.
        caller = self.commands.auth.require("write", limited=False)
        limits = self.commands.auth.limits

        async def atomic(request: Request) -> Response:
            token = await caller(request)
            key = idempotency_key(request)
            _, listed, exempt = await self._listed(request, token, MAX_LINKED)
            request_id = f"{token.name}/{key}"
            with limits.wasted_if_refused(token.name, token.rate, exempt):
                with counted_if_refused(Atomic.name):
                    await self.commands.refuse_earlier_batch_item(token.name, key)
                receipt = await self._run(
                    token,
                    exempt,
                    request_id,
                    key,
                    listed,
                    self.commands.ledger.atomic(listed, request_id=request_id, actor=token.name),
                )
            return receipt_response(receipt, key)

        async def batch(request: Request) -> Response:
            token = await caller(request)
            key = idempotency_key(request)
            scope = f"{token.name}/{key}"
            body, submitted, exempt = await self._listed(
                request, token, MAX_BATCH, item_ids(token.name, key)
            )
            # In progress from here: the check claims the key in the store, which a request
            # still in progress with it (a single command, sent first) must not lose to a
            # batch answered ``idempotency_key_in_use``. (``_run`` marks it again, with no
            # await between.)
            with limits.wasted_if_refused(token.name, token.rate, exempt):
                with self.commands.in_progress(scope, key):
                    if await self._check_batch(token.name, key, submitted):
                        # A batch an earlier daybook ran: its items keep the ids they were
                        # given.
                        submitted = commands_of(body, MAX_BATCH, token.name, scope)
                outcomes = await self._run(
                    token, exempt, scope, key, submitted, self.commands.ledger.submit(submitted)
                )
            return _batch_response(key, outcomes, self.commands.closed)

        for path, endpoint, name in (
            ("/v1/atomic", atomic, "atomic"),
            ("/v1/batch", batch, "batch"),
        ):
            app.router.routes.append(_CommandRoute(path, endpoint, methods=["POST"], name=name))
        self.commands.operations["/v1/atomic"] = {"post": _openapi_atomic()}
        self.commands.operations["/v1/batch"] = {"post": _openapi_batch()}

    async def _listed(
        self, request: Request, token: Token, most: int, scope: str | None = None
    ) -> tuple[Any, list[Command], bool]:
        """The request's list of commands (``commands_of``) if the command door can ever
        admit it (``_fits``), counted against the token's rate unless every command of it
        reduces risk (never shed, and let in over the rate: ``Command.reduces_risk``,
        ``RateLimits.take``); a list that cannot be read or run counts. The body comes with
        it, and whether every command reduces risk (``exempt``, as ``take`` has it)."""
        try:
            body = await json_body(request)
            listed = commands_of(body, most, token.name, scope)
            exempt = all(type(command).reduces_risk for command in listed)
            if not exempt:
                self._fits(listed)
        except Problem:
            self.commands.auth.limits.take(token.name, token.rate)
            raise
        self.commands.auth.limits.take(token.name, token.rate, exempt=exempt)
        return body, listed, exempt

    def _fits(self, listed: list[Command]) -> None:
        """Refuse, for good, a list longer than the command door admits at once: it would be
        refused ``503 overloaded`` on an idle server too, and its client told to retry for
        ever. (A list of risk-reducing commands only is never shed, whatever its length.)"""
        capacity = self.commands.door.capacity
        if len(listed) > capacity:
            raise Problem(
                "invalid_request",
                f"this server admits at most {capacity} commands at once "
                f"(--command-capacity), so a list of {len(listed)} can never run here; send "
                f"at most {capacity} per list",
                details={"limit": capacity, "count": len(listed)},
            )

    async def _run(
        self,
        token: Token,
        exempt: bool,
        request_id: str,
        key: str,
        listed: list[Command],
        work: Any,
    ) -> Any:
        """``work`` (a coroutine), admitted for every command of the list (``exempt``: every
        one reduces risk, never shed), with the key marked in progress; a refusal becomes a
        ``Problem``. Such a list, let in over the token's rate, whose every command is
        refused is counted (``RateLimits.take``)."""
        commands = self.commands
        entered = 0
        try:
            with commands.in_progress(request_id, key):
                for _ in listed:
                    commands.door.enter(always=exempt)
                    entered += 1
                done = await work
        except DomainError as error:
            raise Problem.of(error) from None
        except LedgerClosed:
            raise commands.closed() from None
        finally:
            work.close()  # not awaited when refused (a no-op once it ran)
            for _ in range(entered):
                commands.door.leave()
        if (
            exempt
            and isinstance(done, list)
            and any(isinstance(outcome, DomainError) for outcome in done)
            and not any(isinstance(outcome, Receipt) for outcome in done)
        ):
            commands.auth.limits.wasted(token.name, token.rate)  # a batch: every one refused
        return done

    async def _check_batch(self, token: str, key: str, submitted: list[Command]) -> bool:
        """Refuse a batch whose key was used for another list (one this list does not begin
        with, an item recorded with another payload, or an item past this one's end) or for a
        single command or linked list, then claim the key for this list: a record under the
        key itself (``_claim``), which a single command or linked list sent with the key
        later finds, and is refused by. Items without a record are not refused: like a
        single command's, a retry runs them (they left none because they were not applied);
        nor are items appended past the end of the list that claimed the key: they are new
        commands (the claim stays the first list's, and the items' own records answer for
        them from then on).

        True when the key holds the claim of a batch an earlier daybook ran, whose items are
        recorded under ``<token>/<key>/<i>`` (``EARLIER_BATCH_CLAIM``): this list must run under
        those ids, to be answered as that batch's retry. Records under those ids with no
        claim are refused: single commands keyed ``<key>/<i>`` leave them, and so did a
        batch sent to a daybook from before batches claimed their keys, which cannot be
        told apart (replayed, a new batch would never be applied; run, an old one would be
        applied twice)."""
        service = self.commands.ledger.service
        scope = f"{token}/{key}"
        claim = _claim(scope, submitted)
        count = len(submitted)
        ids = [command.request_id for command in submitted]
        beyond = f"{item_ids(token, key)}/{count}"
        earlier = [f"{scope}/{index}" for index in range(count + 1)]
        while True:
            records = await asyncio.to_thread(service.recorded, [*ids, beyond, *earlier, scope])
            claimed = records.pop(scope, None)
            ran_before = claimed is not None and claimed.command == EARLIER_BATCH_CLAIM
            mine, past = (earlier[:count], earlier[count]) if ran_before else (ids, beyond)
            changed = [
                index
                for index, (request_id, command) in enumerate(zip(mine, submitted, strict=True))
                if request_id in records and records[request_id].fingerprint != command.fingerprint
            ]
            held = [f"{key}/{index}" for index, old in enumerate(earlier) if old in records]
            if changed:
                which = ", ".join(map(str, changed))
                raise _conflict(key, f"for another batch (items {which} differ)", changed)
            if past in records:
                raise _conflict(key, "for a batch of more items (this list has fewer)")
            if claimed is not None and claimed.command not in (BATCH_CLAIM, EARLIER_BATCH_CLAIM):
                raise _conflict(key, "for a single command or a linked list")
            if claimed is not None and ran_before:
                if claimed.fingerprint != _fingerprint(EARLIER_BATCH_CLAIM, submitted):
                    raise _conflict(
                        key,
                        "for another batch (one sent before this server was upgraded, which "
                        "is answered for the same list only: send items appended to it with "
                        "a new key)",
                    )
            elif claimed is not None:
                first = _claimed_items(claimed, count)
                if first > count:
                    raise _conflict(key, "for a batch of more items (this list has fewer)")
                if claimed.fingerprint != _fingerprint(BATCH_CLAIM, submitted[:first]):
                    raise _conflict(key, "for another batch")
            if claimed is None and held:
                raise _conflict(
                    key,
                    f"for no batch here, but {', '.join(map(repr, held))} were: for single "
                    "commands, or by a batch sent with this key to a daybook from before "
                    "batches claimed their keys, which cannot be told apart. If this is that "
                    "batch, its items may have been applied and no retry can answer it: look "
                    "their effects up rather than send it again",
                )
            if claimed is not None:
                return ran_before
            if await asyncio.to_thread(service.claim, claim) is None:
                return False
            # Claimed meanwhile, by this batch sent again or by another request: look again.


def item_ids(token: str, key: str) -> str:
    """What a batch's item ids are made of: item ``i`` of a batch sent with ``key`` is
    ``<token>:<key>/<i>``. A single command's request id, ``<token>/<key>``, never
    has that form (a token's name has no ``:``), whatever its key: the batch's items and
    single commands are told apart whatever keys a client chooses."""
    return f"{token}:{key}"


def _conflict(key: str, used: str, changed: list[int] | None = None) -> Problem:
    return Problem.of(
        IdempotencyConflict(
            f"Idempotency-Key {key!r} was already used {used}; use a new key for a new batch",
            changed=changed or [],
        )
    )


#: The ``command`` of a batch's claim on its key (its items' ids: ``item_ids``).
BATCH_CLAIM = "http_batch"


def _claim(scope: str, submitted: list[Command]) -> RequestRecord:
    """The record of a batch's claim on its key: its fingerprint is the list's (the same
    list sent again, or with items appended, begins with it; a single command's or a linked
    list's never matches), and it says how many items the list had (``_claimed_items``)."""
    outcome = {"receipt": {"command": BATCH_CLAIM, "request_id": scope, "items": len(submitted)}}
    return RequestRecord(scope, BATCH_CLAIM, _fingerprint(BATCH_CLAIM, submitted), outcome)


def _claimed_items(claimed: RequestRecord, count: int) -> int:
    """How many items the list that claimed a key had (those a list sent with the key must
    begin with); ``count``, the whole list, for a claim that does not say."""
    items = claimed.outcome.get("receipt", {}).get("items")
    return items if isinstance(items, int) else count


def _fingerprint(claim: str, submitted: list[Command]) -> str:
    """A claim's fingerprint: the list's, under the claim's name. An earlier daybook's claim
    (``EARLIER_BATCH_CLAIM``) was made this way, and a server of that daybook, running beside
    this one, finds this one's claims differ from every list (it would run their items again
    under its own ids): it refuses the batch, which this server answers."""
    listed = orjson.dumps([claim, [command.fingerprint for command in submitted]])
    return hashlib.sha256(listed).hexdigest()


def _batch_response(key: str, outcomes: list[Any], closed: Callable[[], Problem]) -> Response:
    answers: list[dict[str, Any]] = []
    full: list[BaseException] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Receipt):
            answers.append({"index": index, "status": 200, **receipt_body(outcome)})
            continue
        if isinstance(outcome, DomainError):
            problem = Problem.of(outcome)
        elif isinstance(outcome, LedgerClosed):
            problem = closed()
        elif (out_of_space := out_of_storage(outcome)) is not None:
            problem = out_of_space
            full.append(outcome)
        elif is_outage(outcome):
            problem = unavailable(outcome)
        else:
            log.error("batch item %d failed", index, exc_info=outcome)
            problem = Problem("internal_error", "the server failed this command; its log says why")
        answers.append({"index": index, "status": problem.status, "problem": problem.body()})
    if full:  # one line for the batch, not one per command
        log.error("a batch met a database out of disk space (%d of its commands): %s",
                  len(full), first_line(full[0]))  # fmt: skip
    receipts = [outcome for outcome in outcomes if isinstance(outcome, Receipt)]
    position = max((receipt.position for receipt in receipts), default=None)
    body = {
        "idempotency_key": key,
        "position": position,
        "applied": sum(not r.replayed for r in receipts),
        "refused": len(outcomes) - len(receipts),
        "outcomes": answers,
    }
    headers = {}
    if position is not None:
        headers["Daybook-Position"] = str(position)
    if receipts and len(receipts) == len(outcomes) and all(r.replayed for r in receipts):
        headers["Idempotent-Replayed"] = "true"
    return Response(orjson.dumps(body, default=str), media_type="application/json", headers=headers)


# -- OpenAPI --------------------------------------------------------------------------------

_ITEM = {
    "type": "object",
    "properties": {
        "command": {"type": "string", "description": "a command's name, as in /v1/commands/"},
        "fields": {
            "type": "object",
            "description": "its arguments, as the body of /v1/commands/<name>",
        },
    },
    "required": ["command"],
    "additionalProperties": False,
}
_PROBLEM = {"content": {PROBLEM_JSON: {"schema": {"type": "object"}}}}
_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "maxLength": 130},
}


def _request(limit: int) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {
            "commands": {"type": "array", "items": _ITEM, "minItems": 1, "maxItems": limit}
        },
        "required": ["commands"],
        "additionalProperties": False,
    }
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _refusals() -> dict[str, Any]:
    return {
        "400": {"description": "Malformed request", **_PROBLEM},
        "409": {"description": "Refused by the ledger's state, or the key in use", **_PROBLEM},
        "422": {
            "description": "A bad item (details.index), or the key used for another list",
            **_PROBLEM,
        },
        "503": {"description": "Overloaded or stopping; see Retry-After", **_PROBLEM},
        "507": {
            "description": "The database is out of disk space: nothing was applied",
            **_PROBLEM,
        },
    }


#: What the OpenAPI descriptions say of the command door's bound on a list.
_CAPACITY = (
    ", and at most as many as the server admits at once (`--command-capacity`; a longer list "
    "is `422 invalid_request` with `details.limit`, unless every command of it reduces risk)"
)


def _openapi_atomic() -> dict[str, Any]:
    return {
        "tags": ["commands"],
        "summary": "Apply a list of commands all-or-nothing, in one transaction",
        "description": (
            "Linked commands (`ledger.atomic`): in order, each seeing the effects of those "
            "before it; if one is refused, none is applied, and the refusal is that "
            "command's own code with `details.index` and every command's code in "
            f"`details.outcomes` (the others: `linked_command_failed`). At most {MAX_LINKED} "
            f"commands{_CAPACITY}. The Idempotency-Key is the list's request id: the same key "
            "and list replay its outcome; the same key with another list is `422 "
            "idempotency_conflict`."
        ),
        "operationId": "atomic",
        "parameters": [{**_KEY, "description": "A fresh key per list; resend it to retry safely."}],
        "requestBody": _request(MAX_LINKED),
        "responses": {
            "200": {
                "description": "The list's receipt; `linked` holds one receipt per command",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Receipt"}}
                },
            },
            **_refusals(),
        },
    }


def _openapi_batch() -> dict[str, Any]:
    outcome = {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "status": {"type": "integer", "description": "the HTTP status of this command"},
            "problem": {"type": "object", "description": "the refusal, as problem+json"},
        },
        "description": "The command's receipt fields (status 200), or its problem",
        "required": ["index", "status"],
    }
    return {
        "tags": ["commands"],
        "summary": "Submit many commands, each applied on its own; one outcome each, in order",
        "description": (
            "A submission (`ledger.submit`), not all-or-nothing: a refusal does not stop the "
            "others; commands are applied in order, each seeing those before it. At most "
            f"{MAX_BATCH} commands{_CAPACITY}. Idempotency: item `i` gets the request id "
            "`<token>:<Idempotency-Key>/<i>`, so each command keeps its own idempotency "
            "(a single command's is `<token>/<Idempotency-Key>`: a batch keyed `K` and a "
            "command keyed `K/0` sent after it are two operations; a command keyed `K/<i>` "
            "(`i` from 0 to the batch's length) sent before a batch keyed `K` makes it `422 "
            "idempotency_conflict`, as an item of a batch an earlier daybook ran would). "
            "The same key and list answer every item's original outcome (`replayed`); the "
            "same key with another list (an item changed, or fewer items) or already used "
            "for a single command or linked list is `422 idempotency_conflict` and nothing "
            "is applied. Items that left no record (refused `concurrency_conflict`, or status "
            "500/503: not applied) run again on a retry, as a single command's would, and "
            "items appended at the end are new commands. A list that cannot be read is "
            "refused as a whole (400/422, `details.index`) before anything runs."
        ),
        "operationId": "batch",
        "parameters": [
            {**_KEY, "description": "A fresh key per batch; resend it with the same list."}
        ],
        "requestBody": _request(MAX_BATCH),
        "responses": {
            "200": {
                "description": "One outcome per command, in order",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "idempotency_key": {"type": "string"},
                                "position": {
                                    "type": ["integer", "null"],
                                    "description": "the highest position of the receipts",
                                },
                                "applied": {"type": "integer"},
                                "refused": {"type": "integer"},
                                "outcomes": {"type": "array", "items": outcome},
                            },
                        }
                    }
                },
            },
            **_refusals(),
        },
    }
