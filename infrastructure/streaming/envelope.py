"""The message format on the events topic: a versioned orjson envelope per event.

The key is the aggregate id (16 raw UUID bytes as text), so an aggregate's events always
land in one partition, in log order. Besides the event itself, every envelope carries
``prev``: the log position of the previous event the relay published to the same partition
(0 for the first). The relay derives it deterministically from the log and the partition
count, so a re-published event carries the same ``prev`` as the original. A consumer that
has applied position ``p`` of a partition knows an envelope is

- a duplicate when ``position <= p``;
- the next one when ``prev == p``;
- past a gap when ``prev > p``: something the broker acknowledged was lost (a broker that
  lost its data, a produce request that failed after a later one succeeded). It must not be
  applied; the relay re-publishes the missing part and the chain resumes.

That chain is what makes "redelivered messages change nothing" hold even when the broker
loses data and the relay re-publishes from the log: Kafka offsets alone cannot say it.

Positions and chains are only comparable within one event store, so every envelope (marks
included) also names the ``store`` it comes from: the event store's identity (see
``eventstore.identity``). A consumer that meets two stores on one topic refuses. Envelopes
an older relay sent have none, and are read as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.utils import TopicError, resolve_topic

from daybook.domain.values import MAX_BIGINT
from daybook.infrastructure import topics  # noqa: F401  (old topics resolve before any decode)
from daybook.infrastructure.codec import event_class_of, upcast

#: Version of the envelope layout itself (not of the event payloads).
ENVELOPE_VERSION = 1

#: The type of a mark: no event, but the relay's word that the partition gets nothing else
#: up to the mark's ``position`` after its ``prev`` (sent to every partition after every
#: batch, so that a consumer knows an idle partition is complete up to there).
MARK = "daybook.mark"
_NO_AGGREGATE = UUID(int=0)

_HEADER_FIELDS = ("originator_id", "originator_version", "timestamp", "meta")


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event on the wire."""

    type: str
    schema: int
    aggregate_id: UUID
    aggregate_version: int
    position: int
    prev: int
    occurred_at: str
    metadata: dict[str, Any]
    payload: dict[str, Any]
    #: The schema version ``payload`` is at, as the relay read it from the log (None: a relay
    #: of an older daybook sent it, whose ``schema`` named its own code's version even for
    #: a payload newer code wrote, so nothing can be told from it).
    payload_schema: int | None = None
    #: The identity of the event store the relay published it from (None: an older relay).
    store: str | None = None

    @property
    def key(self) -> bytes:
        return partition_key(self.aggregate_id)

    @property
    def is_mark(self) -> bool:
        return self.type == MARK

    def to_state(self) -> dict[str, Any]:
        """The event's state as ``ContractMapper.decode_state`` gives it: a payload of an
        older schema than this code's (published by a relay running older code) is upcast
        here, as the mapper upcasts a stored event."""
        payload = self.payload
        if self.payload_schema is not None:
            payload = _upcast(self.type, self.payload_schema, payload)
        return {
            **payload,
            "originator_id": self.aggregate_id,
            "originator_version": self.aggregate_version,
            "timestamp": self.occurred_at,
            "meta": self.metadata,
        }

    def to_domain_event(self) -> Any:
        """The pydantic domain event (validated against its contract)."""
        return resolve_topic(self.type).model_validate(self.to_state())


def _upcast(event_type: str, schema: int, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` (of schema version ``schema``) at this code's schema version of
    ``event_type``, as the mapper upcasts a stored event (``codec.upcast``); ``payload``
    itself when it is there already, or newer, or of a type this code does not know (no
    handler here reads it)."""
    try:
        event_class = resolve_topic(event_type)
    except TopicError:
        return payload
    if schema >= getattr(event_class, "class_version", 1):
        return payload
    state = dict(payload)
    upcast(event_class, state, schema)
    return state


def partition_key(aggregate_id: UUID | str) -> bytes:
    return str(aggregate_id).encode()


def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2, as the Java client), computed by the relay
    itself so that it knows each event's partition and can chain it (see the module doc)."""
    # Imported here, not with this module: the HTTP server and the reconciler read the
    # envelope's partitions (a handover) without ever talking to a broker, and importing
    # aiokafka costs every process that starts a fifth of a second.
    from daybook.infrastructure.compat.aiokafka import default_partition

    return default_partition(key, partitions)


def encode(
    event_type: str,
    state: dict[str, Any],
    position: int,
    prev: int,
    schema: int | None = None,
    store: str | None = None,
) -> tuple[bytes, bytes]:
    """``(key, value)`` for a decoded stored event (``state`` is consumed) whose state is at
    schema version ``schema`` (``ContractMapper.decode_versioned``; default: this code's),
    read from the event store whose identity is ``store``."""
    aggregate_id = state.pop("originator_id")
    aggregate_version = state.pop("originator_version")
    occurred_at = state.pop("timestamp")
    if isinstance(occurred_at, datetime):
        occurred_at = occurred_at.isoformat()
    metadata = state.pop("meta", None) or {}
    event_class = event_class_of(event_type)
    if event_class is None and schema is None:
        raise TopicError(f"{event_type} is no event type of this code, and no schema is given")
    # A type only newer code defines: under the schema it was written at (decode_versioned).
    code_schema = schema if event_class is None else getattr(event_class, "class_version", 1)
    fields: dict[str, Any] = {
        "v": ENVELOPE_VERSION,
        "type": event_type,
        "schema": code_schema,
        "payload_schema": code_schema if schema is None else schema,
        "aggregate_id": aggregate_id,
        "aggregate_version": aggregate_version,
        "position": position,
        "prev": prev,
        "occurred_at": occurred_at,
        "metadata": metadata,
        "payload": state,
    }
    if store is not None:
        fields["store"] = store
    return partition_key(aggregate_id), orjson.dumps(fields)


def encode_mark(position: int, prev: int, store: str | None = None) -> bytes:
    """A mark: the partition whose last event is ``prev`` gets no other up to ``position``."""
    fields: dict[str, Any] = {
        "v": ENVELOPE_VERSION,
        "type": MARK,
        "position": position,
        "prev": prev,
    }
    if store is not None:
        fields["store"] = store
    return orjson.dumps(fields)


class BadEnvelope(ValueError):
    """A message on the events topic that is not a daybook envelope this version reads."""


def decode(value: bytes) -> Envelope:
    """Parse an envelope; raises ``BadEnvelope`` for anything else."""
    try:
        raw = orjson.loads(value)
        if raw.get("v") != ENVELOPE_VERSION:
            raise BadEnvelope(f"unsupported envelope version {raw.get('v')!r}")
        # Every field is checked for its kind here: a value of another kind (a position
        # as text, a time that is none) once passed, and failed later, outside the parking
        # path, stopping the worker at every start on a message it could never apply.
        position, prev = _whole(raw, "position", 0), _whole(raw, "prev", 0)
        store = _optional(raw, "store", str)
        if raw["type"] == MARK:
            return Envelope(
                MARK, 0, _NO_AGGREGATE, 0, position, prev, "", {}, {}, store=store
            )  # fmt: skip
        occurred_at = _kind(raw, "occurred_at", str)
        datetime.fromisoformat(occurred_at)  # (a ValueError if it is no time)
        return Envelope(
            type=_kind(raw, "type", str),
            schema=_whole(raw, "schema", 1),
            aggregate_id=UUID(_kind(raw, "aggregate_id", str)),
            aggregate_version=_whole(raw, "aggregate_version", 1),
            position=position,
            prev=prev,
            occurred_at=occurred_at,
            metadata=_kind(raw, "metadata", dict),
            payload=_kind(raw, "payload", dict),
            payload_schema=_optional(raw, "payload_schema", int),
            store=store,
        )
    except BadEnvelope:
        raise
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as error:
        raise BadEnvelope(f"not a daybook envelope: {error}") from error


def _kind(raw: dict[str, Any], name: str, kind: type) -> Any:
    value = raw[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadEnvelope(f"not a daybook envelope: {name} is {type(value).__name__}")
    return value


def _whole(raw: dict[str, Any], name: str, least: int) -> int:
    value: int = _kind(raw, name, int)
    if value < least:
        raise BadEnvelope(f"not a daybook envelope: {name} {value} is below {least}")
    # Positions, chains and versions are stored in 64-bit columns (progress rows, dead
    # letters), which refuse anything past it.
    if value > MAX_BIGINT:
        raise BadEnvelope(f"not a daybook envelope: {name} {value} is past {MAX_BIGINT}")
    return value


def _optional(raw: dict[str, Any], name: str, kind: type) -> Any:
    return None if raw.get(name) is None else _kind(raw, name, kind)
