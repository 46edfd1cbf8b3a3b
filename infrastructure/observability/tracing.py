"""OpenTelemetry traces through the API only: no-op until an SDK is configured.

A command's span is the parent of everything it causes, also in other processes and long
after: the trace context (W3C ``traceparent``) is stored in the metadata of every event the
command writes, so the projection batch that applies the event, the relay's publish and the
stream worker's apply continue the command's trace (as links to the batch's span when one
batch carries many traces). ``configure_tracing`` installs the SDK (the optional
``daybook[otel]`` extra) with an exporter; library code never does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from daybook.infrastructure.compat import opentelemetry as opentelemetry_compat

TRACER = trace.get_tracer("daybook")
_PROPAGATOR = TraceContextTextMapPropagator()
#: A version-00 ``traceparent``, the only version daybook writes.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


#: Whether ``enabled`` has seen an SDK installed: the API lets a provider be set once per
#: process, so once seen it stays.
_installed = False
#: Whether the API may load a provider named by its environment variable on first use.
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def enabled() -> bool:
    """Whether an SDK is installed (without one, daybook makes no spans at all: the API's
    no-op spans still cost a little on the write path).

    This runs for every command. Without a provider, ``trace.get_tracer_provider()`` looks
    up its environment variable each call (a raised ``KeyError``, microseconds), so that is
    skipped while the API's global says none is set and the variable was not set when
    daybook was imported; once an SDK is seen, the answer is kept (it cannot be replaced)."""
    global _installed
    if _installed:
        return True
    if not _PROVIDER_FROM_ENV and opentelemetry_compat.provider_unset():
        return False
    provider = trace.get_tracer_provider()
    _installed = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return _installed


@contextmanager
def command_span(command: Any) -> Iterator[None]:
    """The span of one command, from its submission to its answer; the command carries the
    span's traceparent into its events' metadata (unless its caller set one)."""
    if not enabled():
        yield
        return
    attributes = {"daybook.command": command.name, "daybook.request_id": command.request_id}
    with TRACER.start_as_current_span(f"command {command.name}", attributes=attributes) as span:
        if command.traceparent is None:
            object.__setattr__(command, "traceparent", traceparent_of(span))
        yield


def current_traceparent() -> str | None:
    """The active span's context as a W3C ``traceparent`` (None when nothing is traced)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def traceparent_of(current: Span) -> str | None:
    """``current``'s context as a W3C ``traceparent`` (to carry in an event's metadata or a
    message's headers), made directly: this runs once per traced command."""
    span_context = current.get_span_context()
    if not span_context.is_valid:
        return None
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{int(span_context.trace_flags):02x}"
    )


def context_of(traceparent: str | None) -> context.Context | None:
    """The context a stored ``traceparent`` names (None for none, or a malformed one)."""
    if not traceparent:
        return None
    extracted = _PROPAGATOR.extract({"traceparent": traceparent})
    span_context = trace.get_current_span(extracted).get_span_context()
    return extracted if span_context.is_valid else None


def span_context_of(traceparent: str | None) -> SpanContext | None:
    """The span context a stored ``traceparent`` names (None for none, or a malformed one).
    Version 00 is parsed here: the propagator's ``extract`` costs several times as much, and
    a batch asks once per command or event it carries."""
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:  # another version, or junk: as the propagator reads it
        parent = context_of(traceparent)
        return None if parent is None else trace.get_current_span(parent).get_span_context()
    span_context = SpanContext(
        int(match[1], 16),
        int(match[2], 16),
        is_remote=True,
        trace_flags=TraceFlags(int(match[3], 16)),
    )
    return span_context if span_context.is_valid else None


def links_to(traceparents: Iterable[str | None], limit: int = 64) -> list[Link]:
    """Links to the traces of the events a batch applies (at most ``limit``, distinct)."""
    links: list[Link] = []
    seen: set[int] = set()
    for traceparent in traceparents:
        span_context = span_context_of(traceparent)
        if span_context is None:
            continue
        if span_context.span_id in seen:
            continue
        seen.add(span_context.span_id)
        links.append(Link(span_context))
        if len(links) >= limit:
            break
    return links


@contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    links: list[Link] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span named ``name``: a child of the stored ``parent`` traceparent when given, else of
    the current span."""
    with TRACER.start_as_current_span(
        name,
        context=context_of(parent),
        kind=kind,
        links=links,
        attributes=dict(attributes or {}),
    ) as current:
        yield current


def traceparent_in(state: Mapping[str, Any]) -> str | None:
    """The ``traceparent`` stored in an event's metadata (its decoded state's ``meta``)."""
    meta = state.get("meta")
    if isinstance(meta, Mapping):
        found = meta.get("traceparent")
        return found if isinstance(found, str) else None
    return None


@contextmanager
def continued(
    name: str,
    traced: Iterable[tuple[str | None, int]],
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, Span]]:
    """For each distinct traceparent among ``traced`` (``(traceparent, log position)`` of the
    events a batch handles), a span named ``name`` whose parent is that traceparent, open for
    the block: a batch of events from many commands continues each command's trace. Each span
    carries ``attributes``, the number of that trace's events in the batch and their first
    and last positions. Yields the spans by traceparent.

    Without an SDK this is one check: ``traced`` (best a generator) is never iterated."""
    if not enabled():
        yield {}
        return
    grouped: dict[str, list[int]] = {}
    for traceparent, position in traced:
        if traceparent:
            grouped.setdefault(traceparent, []).append(position)
    spans: dict[str, Span] = {}
    common = dict(attributes or {})
    for traceparent, positions in grouped.items():
        parent = context_of(traceparent)
        if parent is None:
            continue
        spans[traceparent] = TRACER.start_span(
            name,
            context=parent,
            kind=kind,
            attributes={
                **common,
                "daybook.events": len(positions),
                "daybook.position.first": positions[0],
                "daybook.position.last": positions[-1],
            },
        )
    try:
        yield spans
    except BaseException as error:
        for current in spans.values():
            current.record_exception(error)
            current.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}"))
        raise
    finally:
        for current in spans.values():
            current.end()


def record_failure(error: BaseException) -> None:
    """Mark the current span failed by ``error`` (its exception event, an ERROR status), as
    the span would be had ``error`` left it: for an error answered within the span."""
    current = trace.get_current_span()
    current.record_exception(error)
    current.set_status(Status(StatusCode.ERROR, type(error).__name__))


def configure_tracing(exporter: Any = None, *, service_name: str = "daybook") -> Any:
    """Install the OpenTelemetry SDK with ``exporter`` (default: OTLP over HTTP, from the
    ``OTEL_*`` variables) and return the tracer provider. Entry points call this; library
    code does not (an embedding service configures its own)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def flush_tracing(timeout_millis: int = 5_000) -> None:
    """Export the spans still batched in the SDK's processor. ``daybook serve`` calls it as
    it stops: uvicorn ends the process by re-raising SIGTERM with its default disposition,
    which runs no ``atexit`` (where the SDK's own shutdown would flush them), so the spans
    of the last requests, those answered during the drain included, were lost."""
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        flush(timeout_millis)
