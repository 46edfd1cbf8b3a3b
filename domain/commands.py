"""Commands: a caller's request to change the ledger, checked when it is built, applied by its
handler.

A command is one class: its fields are what the caller asks for, each annotated with the
check that refuses a bad value (``Amount``, ``Currency``, ``AccountId``...), and its
``handle`` method applies it to aggregates and says what the receipt names. Defining the
class registers it: the ledger's blocking and asyncio methods, and everything else that
offers commands, are derived from the registry (``registered()``), so a new command needs
nothing else.

Every command carries an envelope: ``request_id`` (chosen by the caller, or generated),
``correlation_id``, ``causation_id`` and ``actor`` (who asked), stored as metadata on every
event it writes. Fields
the ledger can generate (an account id, a reservation id) are ``generated``: the caller may
choose them, and then they are part of what a retry must repeat; otherwise the ledger picks a
fresh one, which is not.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, MISSING, asdict, dataclass, field, fields
from datetime import datetime
from typing import (
    Annotated,
    Any,
    ClassVar,
    Protocol,
    TypeVar,
    dataclass_transform,
    get_args,
    get_origin,
    get_type_hints,
)
from uuid import UUID

import orjson

from daybook.domain.errors import DomainError, same_class
from daybook.domain.events import _READABLE, LedgerAggregate, Metadata
from daybook.domain.ids import new_request_id
from daybook.domain.values import (
    check_amount,
    check_currency,
    check_delta,
    check_instant,
    check_limit,
    check_request_text,
    check_sku,
    check_text,
    check_timeout,
    check_uuid,
    shown,
)

A = TypeVar("A", bound=LedgerAggregate)


@dataclass(frozen=True, slots=True)
class Check:
    """How a field's value is checked: ``check(value, what)`` returns the value to keep
    (perhaps converted, as a UUID from its text) or raises the refusal; ``what`` names the
    value in the message (the field's name unless ``label`` says otherwise)."""

    check: Callable[[object, str], Any]
    optional: bool = False
    label: str | None = None

    def __call__(self, value: object, name: str) -> Any:
        if value is None and self.optional:
            return None
        return self.check(value, self.label or name)


Amount = Annotated[int, Check(check_amount)]
OptionalAmount = Annotated[int | None, Check(check_amount, optional=True)]
Delta = Annotated[int, Check(check_delta, label="adjustment")]
Limit = Annotated[int, Check(check_limit)]
Currency = Annotated[str, Check(check_currency)]
Sku = Annotated[str, Check(check_sku, label="SKU")]
Text = Annotated[str, Check(check_text)]
Uuid = Annotated[UUID, Check(check_uuid)]
OptionalUuid = Annotated[UUID | None, Check(check_uuid, optional=True)]
Timeout = Annotated[int, Check(check_timeout)]
OptionalTimeout = Annotated[int | None, Check(check_timeout, optional=True)]
AccountId = Uuid
RequestText = Annotated[str, Check(check_request_text)]
Instant = Annotated[datetime, Check(check_instant)]


def generated(*, factory: Callable[[], object], kw_only: bool = True) -> Any:
    """A field the ledger fills with ``factory()`` unless the caller chooses its value.
    (Keyword arguments named as ``dataclass_transform`` field specifiers name them, so type
    checkers know the field has a default and comes after the payload.)"""
    return field(default=None, kw_only=kw_only, metadata={"generated": factory})


class Aggregates(Protocol):
    """The aggregates a handler works on (the ledger's unit of work provides them)."""

    #: The instant the command is judged at, from the ledger's clock (every aggregate handed
    #: out carries it as ``as_of``); None outside a ledger.
    now: datetime | None

    def get(self, kind: type[A], key: Any) -> A:
        """The aggregate of ``kind`` for ``key``; raises ``kind.not_found(key)`` if none."""
        ...

    def find(self, kind: type[A], key: Any) -> A | None:
        """The aggregate of ``kind`` for ``key``, or None."""
        ...

    def add(self, aggregate: A) -> A:
        """A new aggregate, written with the command's other events. Refused (``IdTaken``)
        if its id names an aggregate of another kind found already: a command that creates
        one looks it up first, with ``find_to_create``."""
        ...

    def taken(self, kind: type[A], key: Any) -> bool:
        """Whether ``kind``'s id for ``key`` names an aggregate already, of any kind: a
        command that creates one with an id its caller chose refuses a taken id."""
        ...

    def confirm_refusal(self) -> None:
        """Before a command records a refusal it caught as its outcome (a saga step that
        failed) instead of being refused: raise unless that refusal was judged on the
        latest committed state, so the command is run again on fresh state (as a refused
        command is)."""
        ...


def find_to_create(aggregates: Aggregates, kind: type[A], key: Any) -> A | None:
    """The aggregate of ``kind`` for ``key``, or None if its id is free to create one with;
    refused (``kind.id_taken``) if the id names an aggregate of another kind. Ids derived
    from a key (a SKU's, an order's saga) are public and a caller may open an account on
    any: the store would refuse the creation on every attempt, so the command is refused
    now, before it changes anything, rather than retried as a conflict."""
    found = aggregates.find(kind, key)
    if found is None and aggregates.taken(kind, key):
        raise kind.id_taken(key)
    return found


@dataclass(frozen=True, slots=True)
class _Spec:
    """What building and fingerprinting a command class needs, worked out once per class."""

    #: (field name, check) for every field with a check, in field order.
    checks: tuple[tuple[str, Check], ...]
    #: (field name, factory) for every generated field.
    generated: tuple[tuple[str, Callable[[], object]], ...]
    #: Fields a retry must repeat: the payload (generated fields only when chosen).
    payload: tuple[str, ...]


#: Verbs whose commands reduce risk unless their class says otherwise (``reduces_risk``).
RISK_REDUCING_VERBS = frozenset({"release", "void", "expire", "cancel", "compensate"})

_REGISTRY: dict[str, type[Command]] = {}
#: Names the ledger's faces use for methods of their own (``execute``, ``submit``...), with
#: what they are: no command may take one (see ``reserve``).
_RESERVED: dict[str, str] = {}


def reserve(names: Iterable[str], what: str) -> None:
    """Keep ``names`` from commands (the ledger's faces reserve their own methods)."""
    for name in names:
        _RESERVED.setdefault(name, what)


_SPECS: dict[type[Command], _Spec] = {}
_ENVELOPE = ("request_id", "correlation_id", "causation_id", "actor", "traceparent")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass_transform(frozen_default=True, field_specifiers=(field, generated))
@dataclass(frozen=True)
class Command:
    """Base of every command. Subclasses are frozen dataclasses, registered by ``name`` (their
    class name in snake case unless they set one): ``Transfer`` is ``ledger.transfer``."""

    name: ClassVar[str] = "command"
    #: True for commands that lower exposure (release a reservation, void a hold, cancel,
    #: compensate): services under load never shed them. By default, commands whose names
    #: start with one of ``RISK_REDUCING_VERBS`` do; a class may say otherwise.
    reduces_risk: ClassVar[bool] = False
    #: False when the ledgers offer no generated method for the command: one written by hand
    #: (``atomic``: its argument is a list of commands), or none (the saga processor's own
    #: commands, sent with ``execute``).
    generated_method: ClassVar[bool] = True
    #: False for commands that only daybook's own services send (the saga processor's
    #: steps, the payment reconciler's records): the HTTP API does not offer them, alone or
    #: in a list. Python callers, who run those services, still can (``execute``).
    public: ClassVar[bool] = True

    _: KW_ONLY
    #: The caller's id for this request; a retry with the same id and payload is replayed.
    request_id: str = generated(factory=new_request_id)
    correlation_id: str | None = None
    causation_id: str | None = None
    #: Who asks (recorded on every event; not part of what a retry must repeat).
    actor: str | None = None
    #: The caller's trace (a W3C ``traceparent``), recorded on every event; set by the
    #: ledger from the active span when the caller leaves it out.
    traceparent: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(frozen=True)(cls)
        if "name" not in cls.__dict__:
            cls.name = _snake(cls.__name__)
        if "reduces_risk" not in cls.__dict__:
            cls.reduces_risk = cls.name.split("_", 1)[0] in RISK_REDUCING_VERBS
        if cls.handle is Command.handle:
            return  # an abstract intermediate class
        taken = _RESERVED.get(cls.name) or (
            f"the read method of {_READABLE[cls.name].__qualname__}"
            if cls.name in _READABLE
            else None
        )
        if taken is not None:
            # The ledger's own method of that name would win over the command's: called by
            # its name, it would read (or do what that method does) and apply nothing.
            msg = (
                f"command name {cls.name!r} is {taken} on the ledger; give "
                f"{cls.__module__}.{cls.__qualname__} another name (its class attribute `name`)"
            )
            raise TypeError(msg)
        known = _REGISTRY.get(cls.name)
        if known is not None and not same_class(known, cls):
            msg = (
                f"command name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}; "
                f"give {cls.__module__}.{cls.__qualname__} another name (its class attribute "
                "`name`)"
            )
            raise TypeError(msg)
        _REGISTRY[cls.name] = cls

    def __post_init__(self) -> None:
        spec = _spec(type(self))
        setter = object.__setattr__
        for name, check in spec.checks:
            value = getattr(self, name)
            checked = check(value, name)
            if checked is not value:
                setter(self, name, checked)
        chosen = []
        for name, factory in spec.generated:
            if getattr(self, name) is None:
                setter(self, name, factory())
            else:
                chosen.append(name)
        if self.request_id is not None:
            chosen.append("request_id")
        setter(self, "_chosen", frozenset(chosen))
        for name in _ENVELOPE:
            value = getattr(self, name)
            if value is None:
                if name == "request_id":
                    setter(self, name, new_request_id())
            else:
                check_request_text(value, name)

    @property
    def caller_request_id(self) -> bool:
        """True when the caller chose ``request_id`` (only those refusals are recorded)."""
        return "request_id" in self.__dict__["_chosen"]

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        """Apply the command; return what its receipt names (``account_id``, ``sku``...).
        Raises a ``DomainError`` when a rule refuses it, having changed nothing."""
        raise NotImplementedError

    def payload(self) -> dict[str, Any]:
        """What the caller asked for: the fields a retry must repeat exactly."""
        spec = _spec(type(self))
        chosen: frozenset[str] = self.__dict__["_chosen"]
        names = spec.payload + tuple(name for name, _ in spec.generated if name in chosen)
        return {name: getattr(self, name) for name in names}

    @property
    def fingerprint(self) -> str:
        """A stable digest of the command name and payload, for idempotency checks.

        Fingerprints are stored with request records: changing how they are computed would
        turn retries of requests recorded before the change into idempotency conflicts.
        """
        # Computed once per command (frozen: cached in its __dict__ directly, as
        # functools.cached_property would, without its per-call lock).
        cached: str | None = self.__dict__.get("_fingerprint")
        if cached is None:
            text = orjson.dumps([self.name, self.payload()], option=orjson.OPT_SORT_KEYS)
            cached = self.__dict__["_fingerprint"] = hashlib.sha256(text).hexdigest()
        return cached

    @property
    def metadata(self) -> Metadata:
        # The validating constructor, not ``model_construct``: the values are checked in
        # pydantic-core's compiled code, while ``model_construct`` is pure Python and costs
        # about three times as much (this runs for every command on the write path).
        return Metadata(
            request_id=self.request_id,
            correlation_id=self.correlation_id or self.request_id,
            causation_id=self.causation_id,
            actor=self.actor,
            traceparent=self.traceparent,
        )


def _spec(command_class: type[Command]) -> _Spec:
    spec = _SPECS.get(command_class)
    if spec is None:
        spec = _SPECS[command_class] = _build_spec(command_class)
    return spec


def _build_spec(command_class: type[Command]) -> _Spec:
    hints = get_type_hints(command_class, include_extras=True)
    checks: list[tuple[str, Check]] = []
    made: list[tuple[str, Callable[[], object]]] = []
    payload: list[str] = []
    for spec_field in fields(command_class):
        name = spec_field.name
        if name in _ENVELOPE:
            continue
        hint = hints.get(name)
        check = _check_of(hint)
        factory = spec_field.metadata.get("generated")
        if factory is not None:
            made.append((name, factory))
            if check is not None:
                checks.append((name, Check(check.check, optional=True, label=check.label)))
            continue
        if check is not None:
            checks.append((name, check))
        payload.append(name)
    return _Spec(tuple(checks), tuple(made), tuple(payload))


def _check_of(hint: object) -> Check | None:
    if get_origin(hint) is Annotated:
        for extra in get_args(hint)[1:]:
            if isinstance(extra, Check):
                return extra
    return None


def registered() -> Iterator[type[Command]]:
    """Every registered command class, in registration order."""
    return iter(list(_REGISTRY.values()))


def command_named(name: str) -> type[Command]:
    """The command registered as ``name``; ``KeyError`` names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        msg = f"no command is called {shown(name)}; known: {known}"
        raise KeyError(msg) from None


@dataclass(frozen=True, slots=True)
class Parameter:
    """One argument of a command as callers pass it (for generated methods, routes, CLI)."""

    name: str
    annotation: Any
    required: bool
    #: Positional (the payload) or keyword-only (generated fields and the envelope).
    positional: bool
    default: Any = None


def parameters(command_class: type[Command]) -> list[Parameter]:
    """The arguments of ``command_class``, in calling order (positional first)."""
    hints = get_type_hints(command_class)
    result = []
    for spec_field in fields(command_class):
        required = spec_field.default is MISSING and spec_field.default_factory is MISSING
        default = None if spec_field.default is MISSING else spec_field.default
        annotation = hints[spec_field.name]
        if spec_field.metadata.get("generated") is not None or spec_field.name == "request_id":
            annotation = annotation | None
        result.append(
            Parameter(spec_field.name, annotation, required, not spec_field.kw_only, default)
        )
    # Positional (the payload) first, then the fields the ledger can generate, the envelope last.
    return sorted(result, key=lambda p: (not p.positional, p.name in _ENVELOPE))


@dataclass(frozen=True)
class Receipt:
    """Proof that a command was applied: where its last event sits in the log."""

    command: str
    request_id: str
    position: int
    replayed: bool = False
    account_id: UUID | None = None
    transfer_id: UUID | None = None
    sku: str | None = None
    reservation_id: str | None = None
    hold_id: UUID | None = None
    saga_id: UUID | None = None
    #: A linked list's receipt (``ledger.atomic``): one receipt per command, in order. They
    #: committed together, so each carries the list's position and ``replayed``.
    linked: tuple[Receipt, ...] = ()

    def __post_init__(self) -> None:
        if any(
            not isinstance(part, Receipt)
            or (part.position, part.replayed) != (self.position, self.replayed)
            for part in self.linked
        ):
            parts = tuple(
                Receipt.from_record(
                    {**(asdict(part) if isinstance(part, Receipt) else part), "position": 0},
                    replayed=self.replayed,
                    position=self.position,
                )
                for part in self.linked
            )
            object.__setattr__(self, "linked", parts)

    @classmethod
    def from_record(
        cls, record: Mapping[str, Any], *, replayed: bool, position: int | None = None
    ) -> Receipt:
        """A receipt from its recorded form (JSON values: ids as text)."""
        return cls(
            command=record["command"],
            request_id=record["request_id"],
            position=record["position"] if position is None else position,
            replayed=replayed,
            account_id=_uuid(record.get("account_id")),
            transfer_id=_uuid(record.get("transfer_id")),
            sku=record.get("sku"),
            reservation_id=record.get("reservation_id"),
            hold_id=_uuid(record.get("hold_id")),
            saga_id=_uuid(record.get("saga_id")),
            linked=tuple(record.get("linked", ())),
        )


def _uuid(value: UUID | str | None) -> UUID | None:
    return value if value is None or isinstance(value, UUID) else UUID(value)


__all__ = [
    "AccountId",
    "Aggregates",
    "Amount",
    "Check",
    "Command",
    "Currency",
    "Delta",
    "DomainError",
    "Limit",
    "OptionalAmount",
    "OptionalTimeout",
    "OptionalUuid",
    "Parameter",
    "Receipt",
    "RequestText",
    "Sku",
    "Text",
    "Timeout",
    "Uuid",
    "command_named",
    "generated",
    "parameters",
    "registered",
]
