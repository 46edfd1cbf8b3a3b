"""Tests that define commands, aggregates, events or refusals of their own leave daybook's
registries, and ``sys.modules``, as they found them: the registries are process-wide, and
other tests take every class of a ``daybook.`` module for daybook's own."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from eventsourcing import utils as topics

from daybook.domain import commands, events
from daybook.domain.errors import DomainError


@contextlib.contextmanager
def registries_restored(*, modules: str | tuple[str, ...] = ()) -> Iterator[None]:
    """The registries as they are now, once the block ends; and the modules added meanwhile
    whose names start with ``modules`` removed."""
    saved = [
        (registry, dict(registry))
        for registry in (
            commands._REGISTRY,
            events._READABLE,
            events._EVENT_TYPES,
            DomainError._by_code,
        )
    ]
    before = set(sys.modules)
    try:
        yield
    finally:
        for registry, entries in saved:
            registry.clear()
            registry.update(entries)  # type: ignore[attr-defined]
        for name in set(sys.modules) - before:
            if modules and name.startswith(modules):
                del sys.modules[name]
        _forget_topics(modules)


def _forget_topics(modules: str | tuple[str, ...]) -> None:
    """eventsourcing caches each class it has named by its topic and refuses another class
    under the same topic: without this, a module defined again (a module-scoped fixture set up
    a second time in one process) fails its first command."""
    if not modules:
        return
    prefixes = (modules,) if isinstance(modules, str) else modules
    with topics._topic_cache_lock:
        for topic in [t for t in topics._topic_cache if t.startswith(prefixes)]:
            del topics._topic_cache[topic]
        for obj in [o for o, t in topics._type_cache.items() if t.startswith(prefixes)]:
            del topics._type_cache[obj]
