"""opentelemetry-api's internals that daybook relies on (written against 1.3x).

``daybook.infrastructure.observability.tracing.enabled`` runs for every command. Without an
SDK, ``trace.get_tracer_provider()`` looks its environment variable up on each call (a
raised ``KeyError``, microseconds on the write path); the API keeps the provider it was given
in the module global ``_TRACER_PROVIDER`` (None until one is set), which is read instead.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from daybook.infrastructure.compat import Internal

_UNKNOWN = object()


def provider_unset() -> bool:
    """Whether the API certainly has no tracer provider set yet (False when it cannot tell:
    then ask ``trace.get_tracer_provider()``)."""
    provider: Any = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
    return provider is None


#: Every opentelemetry name daybook uses beyond its documented interface.
RELIED_ON: tuple[Internal, ...] = (
    Internal(
        "opentelemetry-api",
        "opentelemetry.trace",
        "_TRACER_PROVIDER",
        provider_unset,
        "the module global holding the provider set by set_tracer_provider (None until then)",
    ),
)
