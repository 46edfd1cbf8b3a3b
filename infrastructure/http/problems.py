"""Errors over HTTP: RFC 9457 problem details (``application/problem+json``) that carry the
refusal's stable ``code``.

Every refusal, the domain's and the HTTP layer's own (a missing idempotency key, a body that
is not JSON, an expired token, a full queue), is answered the same way: ``type`` (a relative
URI, ``/problems/<code>``, that the server answers with the code's description), ``title``,
``status``, ``detail`` (the message a person reads), ``code`` (what a program branches on) and
``details`` (the numbers that broke the rule). ``STATUS`` is the code -> HTTP status table the
README repeats; tests hold the two to each other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

from daybook.domain.errors import DomainError, reserve_codes
from daybook.infrastructure.transient import is_transient, storage_full

PROBLEM_JSON = "application/problem+json"

#: HTTP status of each code. Codes not listed (a refusal added by an embedding service) are
#: answered 422: the request was understood and refused by a rule.
STATUS: dict[str, int] = {
    # The request itself is malformed or incomplete.
    "malformed_json": 400,
    "idempotency_key_missing": 400,
    "idempotency_key_invalid": 400,
    "invalid_cursor": 400,
    "invalid_parameter": 400,
    "unknown_parameter": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    # Well-formed, refused by a rule about the values.
    "invalid_amount": 422,
    "invalid_currency": 422,
    "invalid_sku": 422,
    "invalid_request": 422,
    "currency_mismatch": 422,
    "same_account": 422,
    "invalid_timeout": 422,
    # The idempotency-key draft: another payload under a used key is 422, a key whose first
    # request is still being processed is 409.
    "idempotency_conflict": 422,
    "idempotency_key_in_use": 409,
    # Something the command names does not exist.
    "account_not_found": 404,
    "sku_not_found": 404,
    "reservation_not_found": 404,
    "hold_not_found": 404,
    "saga_not_found": 404,
    # Refused by the state of the ledger: valid input, wrong moment.
    "insufficient_funds": 409,
    "balance_overflow": 409,
    "account_closed": 409,
    "account_not_empty": 409,
    "out_of_stock": 409,
    "stock_below_reserved": 409,
    "stock_overflow": 409,
    "reservation_resolved": 409,
    "reservation_exists": 409,
    "account_exists": 409,
    "id_taken": 409,
    "concurrency_conflict": 409,
    "hold_exists": 409,
    "hold_resolved": 409,
    "hold_expired": 409,
    "hold_not_expired": 409,
    "reservation_expired": 409,
    "reservation_not_expired": 409,
    "saga_exists": 409,
    "saga_finished": 409,
    "saga_moved_on": 409,
    "finding_recorded": 409,
    "linked_command_failed": 409,
    # Not a rule about the request: an earlier answer to this very request was lost in an
    # outage and the ledger can no longer tell whether it committed. Sent again, it gets the
    # same answer; the client checks the accounts and sends a new request.
    "outcome_unknown": 409,
    # Try again later (each with Retry-After).
    "rate_limited": 429,
    "internal_error": 500,
    "overloaded": 503,
    "shutting_down": 503,
    "stale_read": 503,
    "read_model_changed": 503,
    "unavailable": 503,
    # The database is out of disk space: nothing was applied, and nothing will be until an
    # operator frees space (WebDAV's status, which says just that).
    "storage_full": 507,
}

# The codes of this face that are no refusal: no refusal class may take one (a client would
# take a business refusal for an outage, a rate limit, a missing route).
reserve_codes(
    (
        code
        for code in STATUS
        if not (
            (known := DomainError._by_code.get(code)) is not None
            and known.__module__.startswith("daybook.")
        )
    ),
    "the HTTP face",
)


def status_of(code: str) -> int:
    return STATUS.get(code, 422)


class Problem(Exception):
    """An HTTP answer that is a refusal; raise it anywhere in a request."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        status: int | None = None,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status or status_of(code)
        self.details = dict(details or {})
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, error: DomainError) -> Problem:
        return cls(error.code, error.message, details=error.details)

    def response(self) -> Response:
        return Response(
            _encoded(self.body()),
            status_code=self.status,
            headers=self.headers,
            media_type=PROBLEM_JSON,
        )

    def body(self) -> dict[str, Any]:
        """The problem details as a JSON object."""
        body: dict[str, Any] = {
            "type": f"/problems/{self.code}",
            "title": title_of(self.code),
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _encoded(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body, default=str)
    except TypeError:
        # The refusal repeats a lone surrogate the request sent (JSON may escape one, as a
        # member's name say): orjson writes only valid UTF-8, the standard library escapes it.
        return json.dumps(body, default=str).encode()


def title_of(code: str) -> str:
    """``insufficient_funds`` -> ``Insufficient funds``."""
    return code.replace("_", " ").capitalize()


#: What each HTTP-layer code means (the domain's codes are described by their classes).
DESCRIPTIONS: dict[str, str] = {
    "malformed_json": "The body is not valid JSON (or repeats a member, or holds NaN).",
    "idempotency_key_missing": "Every POST needs an Idempotency-Key header.",
    "idempotency_key_invalid": (
        "The Idempotency-Key is not one key of 1-128 printable ASCII characters."
    ),
    "idempotency_key_in_use": "A request with this Idempotency-Key is still being processed.",
    "invalid_cursor": "The cursor was not one this server handed out.",
    "invalid_parameter": "A query parameter or header has a value that cannot be used.",
    "unknown_parameter": (
        "The query has a parameter this route does not define (misspelt, say); the detail "
        "names it and those the route takes."
    ),
    "unauthorized": "No valid bearer token: missing, unknown or revoked.",
    "forbidden": "The token lacks the scope this endpoint needs.",
    "not_found": "Nothing is at this path, or the read model has no such row.",
    "method_not_allowed": "This path does not take this method; Allow lists those it takes.",
    "payload_too_large": "The body is larger than the server accepts.",
    "request_timeout": (
        "The body stopped arriving (no part of it for --body-timeout, 30 s by default); "
        "nothing was done: send the request again."
    ),
    "unsupported_media_type": "Bodies must be application/json.",
    "rate_limited": "This token sent more requests than its rate allows; see Retry-After.",
    "internal_error": "A bug in daybook; the server log has the details.",
    "overloaded": (
        "The server's queue is full, or no read-model connection came free within the "
        "server's longest read wait; retry after Retry-After seconds."
    ),
    "shutting_down": "The server is stopping; retry against another or after a restart.",
    "stale_read": (
        "The read model did not reach min_position within the read's timeout (or no "
        "version of it serves yet); see Retry-After."
    ),
    "read_model_changed": (
        "The read model's serving version has tables this server's code cannot read (a "
        "deploy is under way): another server, or this one upgraded, answers."
    ),
    "unavailable": (
        "A database daybook needs did not answer (restarting, out of reach, or it cancelled a "
        "statement: its statement_timeout); retry after "
        "Retry-After seconds, a command with the same Idempotency-Key."
    ),
    "storage_full": (
        "The database daybook writes to is out of disk space: nothing was applied. Retry "
        "with the same Idempotency-Key once its operator has freed space."
    ),
}


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` means a database daybook needs did not answer (``is_transient``)
    rather than a bug. ``is_transient`` counts every ``OSError`` as the network's, for the
    services that retry; but the database drivers raise their own errors, so a bare one
    that is no lost connection (a file missing from an install, a timeout of daybook's
    own) reaching a request is a bug: 500, with its traceback in the log."""
    if isinstance(error, OSError) and not isinstance(error, ConnectionError):
        return False
    return is_transient(error)


def unavailable(error: BaseException) -> Problem:
    """The answer to a request that met a database outage (``is_outage``): not a bug, so
    no traceback; a command retried with its Idempotency-Key is replayed if it did commit."""
    return Problem(
        "unavailable",
        f"a database daybook needs did not answer ({type(error).__name__}); retry after "
        "Retry-After seconds (a command with the same Idempotency-Key: it is never applied "
        "twice)",
        headers={"Retry-After": "1"},
    )


def out_of_storage(error: BaseException) -> Problem | None:
    """The answer to a request that met a database out of disk space (``storage_full``),
    or None for any other error. Not a bug, so no traceback; nothing was applied."""
    if not storage_full(error):
        return None
    return Problem(
        "storage_full",
        "the database daybook writes to is out of disk space, and nothing was applied; "
        "retry with the same Idempotency-Key once space is freed",
        headers={"Retry-After": "60"},
    )


def describe(code: str) -> str | None:
    """What ``code`` means, or None if no refusal has it."""
    if code in DESCRIPTIONS:
        return DESCRIPTIONS[code]
    error_class = DomainError._by_code.get(code)
    if error_class is None:
        return None
    return (error_class.__doc__ or title_of(code)).strip().splitlines()[0]
