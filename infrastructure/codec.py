"""How events become bytes and back: orjson for speed, pydantic contracts for exactness.

``OrjsonTranscoder`` replaces eventsourcing's ``JSONTranscoder``. orjson writes UUIDs,
datetimes and ints natively (and Decimals through ``default``); it reads them back as JSON
strings and numbers, and ``ContractMapper`` then validates the state against the event's
pydantic contract, which turns them back into exactly the values that were written. Integers
beyond 64 bits are refused with an error rather than rounded (the domain keeps amounts below
2**63 anyway).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, cast

import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder, Transcoding
from eventsourcing.utils import TopicError, get_topic, resolve_topic
from pydantic import BaseModel

from daybook.domain.events import defines_event_type
from daybook.infrastructure import topics  # noqa: F401  (old topics resolve before any decode)


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, BaseModel):  # a nested model (metadata): its fields, as they are
        return obj.__dict__
    msg = f"cannot encode {type(obj).__name__} as JSON"
    raise TypeError(msg)


class OrjsonTranscoder(Transcoder):
    """JSON with orjson: several times faster than the standard library's encoder."""

    def encode(self, obj: Any) -> bytes:
        try:
            return orjson.dumps(obj, default=_default)
        except TypeError:
            # A mapping keyed by something other than str (a snapshot's open holds, keyed by
            # hold id): written with str keys, which the contract parses back. Only then, as
            # the option costs every encode about half again.
            return orjson.dumps(obj, default=_default, option=orjson.OPT_NON_STR_KEYS)

    def decode(self, data: bytes) -> Any:
        return orjson.loads(data)

    def register(self, transcoding: Transcoding) -> None:
        """Types are restored by the events' pydantic contracts, not by transcodings."""


def event_class_of(topic: str) -> type | None:
    """The event class a stored event's ``topic`` names; None for a type this code does not
    define (newer code, deployed beside it, added it: its state is taken as written, and no
    handler here reads it). A type this code defines, under a topic it cannot resolve (a
    module moved), raises ``TopicError``."""
    try:
        found: type = resolve_topic(topic)
    except TopicError:
        if defines_event_type(topic.rpartition(":")[2]):
            raise
        return None
    return found


def upcast(event_class: type, state: dict[str, Any], version: int) -> int:
    """Bring ``state``, at schema version ``version`` of ``event_class``, up to this code's
    version, in place (the class's ``upcast_vN_vN+1`` methods, in order); the version it is
    at then: this code's, or ``version`` when newer code wrote it (nothing here knows how to
    bring it down)."""
    current: int = getattr(event_class, "class_version", 1)
    while version < current:
        getattr(event_class, f"upcast_v{version}_v{version + 1}")(state)
        version += 1
    return version


#: Per event class: (topic, schema version).
_CLASSES: dict[type, tuple[str, int]] = {}


class ContractMapper(Mapper[Any]):
    """Maps pydantic events to stored events and back, upcasting old schema versions."""

    def to_stored_event(self, domain_event: DomainEventProtocol[Any]) -> StoredEvent:
        event_class = type(domain_event)
        known = _CLASSES.get(event_class)
        if known is None:
            known = _CLASSES[event_class] = (
                get_topic(event_class),
                getattr(event_class, "class_version", 1),
            )
        topic, class_version = known
        # The fields as they are (orjson writes UUIDs, datetimes and ints natively; other
        # nested models go through ``_default``): a fraction of the cost of ``model_dump``,
        # on the hot path of every command. The round-trip tests hold it to ``model_dump``.
        state = cast(BaseModel, domain_event).__dict__.copy()
        del state["originator_id"], state["originator_version"]
        meta = state.get("meta")
        if isinstance(meta, BaseModel):  # every event's metadata, without a callback
            fields = meta.__dict__
            if fields.get("traceparent") is None:
                # Written only when there is a trace: events stay as they were before traces
                # existed, and untraced ones pay no bytes for it.
                # (A copy less one key: cheaper than a comprehension over every field.)
                fields = fields.copy()
                fields.pop("traceparent", None)
            state["meta"] = fields
        if class_version > 1:
            state["class_version"] = class_version
        data = self.transcoder.encode(state)
        if self.compressor:
            data = self.compressor.compress(data)
        if self.cipher:
            data = self.cipher.encrypt(data)
        return StoredEvent(
            originator_id=domain_event.originator_id,
            originator_version=domain_event.originator_version,
            topic=topic,
            state=data,
        )

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[Any]:
        event_class = resolve_topic(stored_event.topic)
        return cast(
            DomainEventProtocol[Any], event_class.model_validate(self.decode_state(stored_event))
        )

    def decode_state(self, stored_event: StoredEvent) -> dict[str, Any]:
        """The event's state at the current schema version, as plain JSON values."""
        return self.decode_versioned(stored_event)[0]

    def decode_versioned(self, stored_event: StoredEvent) -> tuple[dict[str, Any], int]:
        """``decode_state``, and the schema version the state is at: this code's version of
        the event, or the stored one when newer code wrote it (its state is as written:
        nothing here knows how to bring it down), also when that code added the event's
        type (a rolling deploy: the relay publishes every event, whether or not this code
        knows it). A type this code defines, under a topic it cannot resolve, raises
        ``TopicError``."""
        state = self._decoded(stored_event)
        written = state.pop("class_version", 1)
        event_class = event_class_of(stored_event.topic)
        version = written if event_class is None else upcast(event_class, state, written)
        state["originator_id"] = stored_event.originator_id
        state["originator_version"] = stored_event.originator_version
        return state, version

    def stored_version(self, stored_event: StoredEvent) -> int:
        """The schema version ``stored_event`` was written at, before any upcast."""
        return int(self._decoded(stored_event).get("class_version", 1))

    def _decoded(self, stored_event: StoredEvent) -> dict[str, Any]:
        data = stored_event.state
        if self.cipher:
            data = self.cipher.decrypt(data)
        if self.compressor:
            data = self.compressor.decompress(data)
        state: dict[str, Any] = self.transcoder.decode(data)
        return state
