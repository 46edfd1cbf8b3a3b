"""The base of every daybook event: a validated, versioned, immutable contract.

Events are pydantic models, so every payload is checked when it is created and again when it
is read back from the store. ``class_version`` is the schema version of an event's payload;
when it grows, the event class gains an ``upcast_vN_vN+1`` static method that rewrites the
stored state of older events (eventsourcing's mapper calls them in order).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Self
from uuid import UUID

from eventsourcing.domain import BaseAggregate, CanInitAggregate, CanMutateAggregate
from pydantic import BaseModel, ConfigDict, Field

from daybook.domain.errors import DomainError, IdTaken, same_class
from daybook.domain.values import check_uuid


class Metadata(BaseModel):
    """Who asked for the change and why: carried by every event a command triggers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    #: Who asked: the name of the caller's credential (an HTTP token's name), if known.
    actor: str | None = None
    #: The trace of the request that caused the change (a W3C ``traceparent``), so that what
    #: the event causes later, elsewhere (projections, the relay, workers, sagas) continues it.
    traceparent: str | None = None


_NO_METADATA = Metadata()
_current_metadata: ContextVar[Metadata | None] = ContextVar("daybook_metadata", default=None)


def current_metadata() -> Metadata:
    """The metadata of the command being executed (empty outside a command)."""
    return _current_metadata.get() or _NO_METADATA


class metadata_scope:
    """Stamp ``metadata`` on every event triggered inside the block. (A plain class rather
    than a generator context manager: it is entered once per command on the write path.)"""

    __slots__ = ("_metadata", "_token")

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def __enter__(self) -> None:
        self._token = _current_metadata.set(self._metadata)

    def __exit__(self, *_: object) -> None:
        _current_metadata.reset(self._token)


class DomainEvent(BaseModel):
    """Common fields of every event: whose, which version, when (UTC), and metadata.

    The log, the read models and the stream workers name an event by its class's qualified
    name without its module (``Account.Opened``: ``LogEvent.type``), so no two event classes
    of different modules may share one: a service's own ``Account.Opened`` would be fed to
    daybook's account projections. The second is refused when it is defined.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    originator_id: UUID
    originator_version: int
    timestamp: datetime
    meta: Metadata = Field(default_factory=current_metadata)

    #: Schema version of this event's payload (see the module docstring).
    class_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        known = _EVENT_TYPES.get(cls.__qualname__)
        if known is not None and not same_class(known, cls):
            msg = (
                f"event type {cls.__qualname__!r} is taken by {known.__module__}."
                f"{known.__qualname__}: the log names events by class name without the "
                f"module, so {cls.__module__}.{cls.__qualname__} could not be told apart "
                "from it; name the aggregate or the event differently"
            )
            raise TypeError(msg)
        _EVENT_TYPES[cls.__qualname__] = cls


#: Every event class by its qualified name (see ``DomainEvent``).
_EVENT_TYPES: dict[str, type[DomainEvent]] = {}


def defines_event_type(name: str) -> bool:
    """Whether this code defines an event class of qualified name ``name``
    (``Account.Opened``): the type of a stored event it cannot resolve is one that newer
    code, running beside it, defines, unless it is one of these."""
    return name in _EVENT_TYPES


class LedgerAggregate(BaseAggregate[UUID]):
    """Base of daybook's aggregates: eventsourcing's aggregate with pydantic events.

    An aggregate is found by a key (``key_name``): its id by default, or something the id is
    derived from (an ``Inventory`` by its SKU). With ``read_as`` set, the ledger offers a
    strongly consistent read of one by key (``ledger.account(account_id)``), answering with
    ``view()``.
    """

    #: True when the aggregate's own state holds no containers (only immutable values), so
    #: ``clone`` need only copy its list of pending events.
    flat_state: ClassVar[bool] = False
    #: Containers in the state that only replaying old events changes (never a command):
    #: copies share them rather than copy them.
    replay_only: ClassVar[frozenset[str]] = frozenset()
    #: Created by one event and never changed (a marker that something happened once). The
    #: write path does not look one up in the store before creating it: the store refuses
    #: a second creation, and the command is then judged again on what the store holds.
    write_once: ClassVar[bool] = False
    #: The names of its events that change what a command may judge of this aggregate when
    #: it reads it without changing it (None: any event). The commit of such a command is
    #: refused if one of them was recorded after the version it was judged at; other changes
    #: (an account credited meanwhile) do not refuse it. A command that judges more of an
    #: aggregate it only reads must add the events that change that here.
    changes_for_readers: ClassVar[tuple[str, ...] | None] = None
    #: The name of the key callers find one by.
    key_name: ClassVar[str] = "id"
    #: The name of the ledger's read method for one aggregate (None: no such method).
    read_as: ClassVar[str | None] = None

    # The instant this copy of the aggregate is judged at: the ledger sets it, from its
    # injectable clock, on every aggregate it hands to a command or a read. Rules that depend
    # on time (a hold that expires) read it here, so the domain never reads a clock. None
    # outside the ledger: nothing has expired.
    if TYPE_CHECKING:
        as_of: datetime | None
    else:
        as_of = None

    @classmethod
    def id_for(cls, key: Any) -> UUID:
        """The aggregate id for ``key`` (checked: a refusal names ``key_name``)."""
        return check_uuid(key, cls.key_name)

    @classmethod
    def not_found(cls, key: Any) -> DomainError:
        """The refusal when no aggregate of this kind has ``key``."""
        return DomainError(f"no {cls.__name__} has {cls.key_name} {key}")

    @classmethod
    def id_taken(cls, key: Any) -> DomainError:
        """The refusal when ``key``'s id names an aggregate of another kind, so none of this
        kind can be created with it (ids are public: a caller may open an account on any)."""
        aggregate_id = cls.id_for(key)
        return IdTaken(
            f"the id {aggregate_id} of {cls.__name__} {cls.key_name} {key} is used by another "
            f"kind of record already; choose another {cls.key_name}",
            id=str(aggregate_id),
            kind=cls.__name__,
        )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("read_as")
        if name is not None:
            commands = sys.modules.get("daybook.domain.commands")  # (it imports this module)
            own = None if commands is None else commands._RESERVED.get(name)
            if own is not None:
                msg = (
                    f"read method {name!r} is {own} on the ledger; give "
                    f"{cls.__module__}.{cls.__qualname__} another read_as"
                )
                raise TypeError(msg)
            command = None if commands is None else commands._REGISTRY.get(name)
            if command is not None:
                msg = (
                    f"read method {name!r} is the name of the command "
                    f"{command.__module__}.{command.__qualname__}; give "
                    f"{cls.__module__}.{cls.__qualname__} another read_as"
                )
                raise TypeError(msg)
            known = _READABLE.get(name)
            if known is not None and not same_class(known, cls):
                msg = (
                    f"read method {name!r} is taken by {known.__module__}.{known.__qualname__}; "
                    f"give {cls.__module__}.{cls.__qualname__} another read_as"
                )
                raise TypeError(msg)
            _READABLE[name] = cls

    def view(self) -> Any:
        """The aggregate's state for a reader: an immutable value."""
        raise NotImplementedError

    def view_given(self, read: Callable[[type[Any], Any], Any]) -> Any:
        """``view()``, for a reader who can also ``read(kind, key)`` other aggregates' current
        state: an aggregate whose state another one can settle (a hold its account
        released) looks there too."""
        return self.view()

    @property
    def settled(self) -> bool:
        """True once no command can change it again (a resolved hold, a finished saga)."""
        return False

    class Event(DomainEvent, CanMutateAggregate[UUID]):
        """An event that changes an existing aggregate."""

    class Created(Event, CanInitAggregate[UUID]):
        """The first event of an aggregate."""

        originator_topic: str

    def __init__(self, **_: Any) -> None:
        """State is set by the Created event's ``apply``."""

    def trigger_event(self, event_class: type[CanMutateAggregate[UUID]], **kwargs: Any) -> None:
        """Number, build and apply the next event, as eventsourcing's ``trigger_event`` does,
        minus its generic preparation (copying the arguments, checking explicit topics) and
        the checks ``mutate`` makes of events read back: this runs for every event on the
        write path, and those were most of its cost."""
        event = event_class(  # type: ignore[call-arg]
            originator_id=self.id,
            originator_version=self.version + 1,
            timestamp=event_class.create_timestamp(),
            **kwargs,
        )
        # ``event.mutate(self)`` minus its checks that the event names this aggregate and
        # its next version: true by construction here (replays from the store still check).
        event.apply(self)
        self.version = event.originator_version
        self.modified_on = event.timestamp
        self.pending_events.append(event)

    def collect_events(self) -> list[CanMutateAggregate[UUID]]:
        """The pending events, oldest first; the aggregate then has none."""
        pending = self.pending_events
        events = pending.copy()
        pending.clear()
        return events

    def clone(self) -> Self:
        """A copy for one command batch. Aggregate state is flat, or containers of immutable
        values, so copying the containers is a deep copy, and many times faster than the
        generic one."""
        clone = object.__new__(type(self))
        state = self.__dict__.copy()
        if self.flat_state:
            # The list behind ``pending_events``, by the name eventsourcing's BaseAggregate
            # gives it (daybook.infrastructure.compat.eventsourcing checks it still does).
            state["_pending_events"] = state["_pending_events"].copy()
        else:
            shared = self.replay_only
            for name, value in state.items():
                if type(value) in _CONTAINERS and name not in shared:
                    state[name] = value.copy()
        clone.__dict__ = state
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        """The repository's cache copies on every read: the same fast copy."""
        return self.clone()


_CONTAINERS = frozenset({dict, list, set})
_READABLE: dict[str, type[LedgerAggregate]] = {}


def readable() -> dict[str, type[LedgerAggregate]]:
    """Every aggregate class the ledger offers a read method for, by that method's name."""
    return dict(_READABLE)


def id_held_by_another_kind(new: LedgerAggregate, holder: LedgerAggregate) -> IdTaken:
    """The refusal of ``new``, whose id ``holder`` (an aggregate of another kind) has: the
    store would refuse to create it on every attempt. A command that creates an aggregate
    refuses this itself, with what the caller should change (``find_to_create``); this is
    the ledger's net for one that does not."""
    return IdTaken(
        f"the id {new.id} is used by another kind of record ({type(holder).__name__}) "
        f"already, so no {type(new).__name__} can be created with it; choose another "
        f"{type(new).key_name}",
        id=str(new.id),
        kind=type(new).__name__,
    )
