"""Structured logs: JSON lines (or plain lines for a console), with the ids of what caused
them, repeated warnings rate-limited, secrets never written.

``configure_logging`` is for entry points (``daybook serve``, ``project``, ``relay``,
``worker``: ``--log-format json|console``); library code only logs. The ids come from
``log_context`` (a context variable: set around a request, a command, a batch, a saga
step) and from the active trace.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

import orjson
from opentelemetry import trace

from daybook.domain.values import REORDERING

_NONE: Mapping[str, str] = MappingProxyType({})
_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar("daybook_log_context", default=_NONE)


@contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Add ``ids`` (request_id, correlation_id, saga_id...) to every line logged inside."""
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in ids.items() if v}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


# Secrets that may reach a message: passwords in URLs, bearer tokens, daybook's own tokens.
# Each pattern takes time linear in the text, whatever it holds: a line can quote what
# someone else sent (a message on the topic, a request's path). A URL's scheme is its run
# of scheme characters from the run's first letter: matched only from where a run starts
# (skipping its leading digits and ``+.-``). Tried from every letter of a long run, as
# before, it took time quadratic in the run (a 1 MB message quoted in an error: hours, the
# logging lock held). A password is at most 1,024 characters, or one ``user:`` followed by
# no ``@`` could be scanned to the line's end once per such ``user:``.
_URL_PASSWORD = re.compile(
    r"(?<![a-z0-9+.-])(?P<keep>[0-9+.-]*[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]{1,1024}+@", re.I
)
_SECRETS = (
    (_URL_PASSWORD, r"\g<keep>***@"),
    (re.compile(r"(?P<keep>bearer\s+)\S+", re.I), r"\g<keep>***"),
    (re.compile(r"(?P<keep>password=)\S+", re.I), r"\g<keep>***"),
    (re.compile(r"dbk_[A-Za-z0-9_-]{8,}"), "dbk_***"),
)


def redact(text: str) -> str:
    """``text`` with every secret it may hold replaced by ``***``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


#: The most characters of a line's message, and of its exception (traceback), a line
#: carries: one quoting a large input (a 1 MB message a worker parked) would otherwise be
#: as large, once per time it is said.
MAX_EVENT_CHARS = 16_384
MAX_ERROR_CHARS = 65_536


def bounded(text: str, limit: int) -> str:
    """``text`` redacted, then cut to ``limit`` characters, saying how many of ``text``
    went. Only as much is redacted as a secret that shows can reach past the cut (a URL's
    password is at most 1,024 characters): redacting a whole large line costs time the
    logging lock is held for, and what is cut away shows nothing."""
    if len(text) <= limit:
        return redact(text)
    # A secret masked before the cut shortens the text, and what shows then comes from
    # further on: redacted, the text must still reach ``_SECRET_REACH`` past what shows.
    # (Doubling the span each time keeps a line of many secrets linear.)
    end = limit + _SECRET_REACH
    shown = redact(text[:end])
    while len(shown) < limit + _SECRET_REACH and end < len(text):
        end = min(len(text), max(end + limit + _SECRET_REACH - len(shown), 2 * end))
        shown = redact(text[:end])
    return f"{shown[:limit]}... ({len(text) - limit} characters cut)"


#: How far past the cut a secret that begins before it may reach (``_URL_PASSWORD``'s
#: password, 1,024 characters at most, and a short user name before it).
_SECRET_REACH = 4096


def _field(value: Any) -> Any:
    """An extra field's value as a JSON line carries it (see ``JsonFormatter.format``)."""
    if value is None or isinstance(value, int | float):  # bool is an int
        return value
    return bounded(value if isinstance(value, str) else str(value), MAX_EVENT_CHARS)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger, event, the ids in context, the
    trace and span ids, extra fields, and the exception if any; secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": bounded(record.getMessage(), MAX_EVENT_CHARS),
        }
        # The ids in context can be a client's choice (a request's X-Request-Id): as fields.
        line.update({k: _field(v) for k, v in _CONTEXT.get().items()})
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            line["trace_id"] = format(span_context.trace_id, "032x")
            line["span_id"] = format(span_context.span_id, "016x")
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            # A field can quote what a user sent (a request's path) or an error's text (a
            # refusal naming a URL): as the event, redacted and bounded. Numbers, booleans
            # and None are written as they are.
            line.update({k: _field(v) for k, v in fields.items() if k not in line})
        if record.exc_info:
            line["error"] = bounded(self.formatException(record.exc_info), MAX_ERROR_CHARS)
        return orjson.dumps(line, default=str).decode()


#: Unicode's line and paragraph separators, and the bidirectional overrides free text
#: refuses (they make one name show as another), as a character class's members.
_ALSO_ESCAPED = "\u2028\u2029" + "".join(sorted(REORDERING))
#: Characters a console line shows escaped: controls (a terminal acts on ESC; a newline
#: would start a line the caller wrote), and ``_ALSO_ESCAPED``.
_NOT_ONE_LINE = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{_ALSO_ESCAPED}]")
#: The same but for the newline and the tab, which a message of daybook's own may hold on
#: purpose (a parked event's traceback): its other controls are escaped all the same.
_NOT_SHOWN = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_ALSO_ESCAPED}]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode()


def one_line(text: str) -> str:
    """``text`` (something a caller sent: a request's path, its X-Request-Id) with every
    character that would break a console line, or restyle it, escaped."""
    return _NOT_ONE_LINE.sub(_escaped, text)


class ConsoleFormatter(logging.Formatter):
    """A readable line: time, level, logger, event, then the ids in context; control
    characters a terminal acts on are escaped (what a caller sent, quoted in a line, is
    also kept on it where it is logged: ``one_line``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _NOT_SHOWN.sub(_escaped, bounded(record.message, MAX_EVENT_CHARS))
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return bounded(super().formatException(ei), MAX_ERROR_CHARS)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = " ".join(f"{k}={one_line(str(v))}" for k, v in _CONTEXT.get().items())
        return redact(f"{text} [{ids}]" if ids else text)


#: A log record's attribute (``extra={LIMITED_AT_SOURCE: True}``) saying its line is limited
#: where it is written, so ``RateLimit`` lets it through: a line said once per thing
#: (``StateLog``: per partition or version), and a line saying a service or a projection
#: version stopped or failed for good (said once per stop; held back, it would never be
#: written, as it does not repeat). Counted by its template, one thing's lines would hide
#: another's.
LIMITED_AT_SOURCE = "daybook_limited_at_source"

#: A log record's attribute (``extra={SUBJECT: ...}``) naming what its line is about when the
#: template does not start with it (a projection version's ``(name, version)``, a service's
#: name): ``RateLimit`` counts the line per subject.
SUBJECT = "daybook_subject"


class RateLimit(logging.Filter):
    """Lets a repeating warning through once, then at most once per ``interval`` seconds
    with how many were held back. A message template counts as one warning per subject,
    whatever its other arguments: the subject is the record's ``SUBJECT``, or, for a
    template starting with the service's name (``"%s: ..."``), its first argument; so one
    service's or projection version's repeats never hide another's. Lines limited where
    they are written (``LIMITED_AT_SOURCE``: among them every line saying a service or a
    version stopped or failed for good) pass. Bounded: it remembers at most ``capacity``
    templates and subjects."""

    def __init__(self, interval: float = 30.0, capacity: int = 1024) -> None:
        super().__init__()
        self.interval = interval
        self.capacity = capacity
        self._last: dict[tuple[str, object, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, LIMITED_AT_SOURCE, False):
            return True
        subject = getattr(record, SUBJECT, None)
        if subject is None and isinstance(record.msg, str) and record.msg.startswith("%s:"):
            subject = record.args[0] if isinstance(record.args, tuple) and record.args else None
        key = (record.name, record.msg, subject)
        now = time.monotonic()
        seen = self._last.get(key)
        if seen is None or now - seen[0] >= self.interval:
            held = seen[1] if seen else 0
            if len(self._last) >= self.capacity and key not in self._last:
                self._last.clear()
            self._last[key] = (now, 0)
            if held:
                record.msg = f"{record.msg} (and {held} more like it since the last)"
            return True
        self._last[key] = (seen[0], seen[1] + 1)
        return False


#: The name of the handler ``configure_logging`` installs.
HANDLER_NAME = "daybook"


def configure_logging(
    log_format: str = "console", level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log line to ``stream`` (stderr) as JSON or as console text, rate-limited
    and redacted. For entry points only: it sets up the root logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx writes a line at INFO for every request it sends (the gateway calls of a saga
    # processor, thousands a minute), saying only that it sent it: kept for debugging.
    logging.getLogger("httpx").setLevel(level if level <= logging.DEBUG else logging.WARNING)
    return handler
