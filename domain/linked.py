"""Linked commands: a list applied all-or-nothing, in one transaction (a payment with its fee
and tax legs).

``Atomic`` runs its commands in order, each seeing the effects of those before it, on copies
of the aggregates: if one is refused, the copies are dropped, so nothing of the list is
written, and the refusal names the failing command by its index and code while the others
report ``linked_command_failed``. The list is one request: its request id makes it idempotent
as a whole (a listed command with a request id of its own is refused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar
from uuid import UUID

from daybook.domain.commands import Aggregates, Check, Command
from daybook.domain.errors import DomainError, InvalidRequest
from daybook.domain.events import LedgerAggregate, id_held_by_another_kind
from daybook.domain.values import shown

A = TypeVar("A", bound=LedgerAggregate)

#: The most commands one list may hold.
MAX_LINKED = 1000

#: What the commands of a refused list report, besides the one that was refused.
LINKED_COMMAND_FAILED = "linked_command_failed"


class LinkedCommandFailed(DomainError):
    """Another command of the same linked list was refused, so this one was not applied."""

    code = LINKED_COMMAND_FAILED


def check_linked(value: object, what: str = "commands") -> tuple[Command, ...]:
    """A non-empty list of at most MAX_LINKED commands, none of them a list itself."""
    if isinstance(value, Command) or not isinstance(value, Sequence) or isinstance(value, str):
        raise InvalidRequest(f"{what} must be a list of commands, got {shown(value)}", field=what)
    commands = tuple(value)
    if not 0 < len(commands) <= MAX_LINKED:
        raise InvalidRequest(
            f"{what} must hold 1 to {MAX_LINKED} commands, got {len(commands)}", field=what
        )
    for index, command in enumerate(commands):
        if not isinstance(command, Command) or isinstance(command, Atomic):
            raise InvalidRequest(
                f"{what}[{index}] must be a command (not a linked list), got {shown(command)}",
                field=what,
                index=index,
            )
        if command.caller_request_id:
            # Not used (the list is the request): kept, the command applied twice when
            # sent again on its own with the id its caller took for its protection.
            raise InvalidRequest(
                f"{what}[{index}] has a request id of its own ({command.request_id!r}): a "
                "linked list is one request, made idempotent by the list's request id; give "
                "the id to the list, not to its commands",
                field=what,
                index=index,
            )
    return commands


LinkedCommands = Annotated[tuple[Command, ...], Check(check_linked)]


class Staged:
    """Aggregates staged for a group of changes: copies of the batch's, handed back (with
    their new events) only when every change was accepted; dropped otherwise."""

    def __init__(self, aggregates: Aggregates) -> None:
        self._aggregates = aggregates
        self._copies: dict[UUID, LedgerAggregate] = {}
        self.now = aggregates.now

    def find(self, kind: type[A], key: Any) -> A | None:
        aggregate_id = kind.id_for(key)
        copy = self._copies.get(aggregate_id)
        if copy is None:
            original = self._aggregates.find(kind, key)
            if original is None:
                return None
            copy = self._copies[aggregate_id] = original.clone()
        return copy if isinstance(copy, kind) else None

    def get(self, kind: type[A], key: Any) -> A:
        aggregate = self.find(kind, key)
        if aggregate is None:
            raise kind.not_found(key)
        return aggregate

    def taken(self, kind: type[A], key: Any) -> bool:
        return kind.id_for(key) in self._copies or self._aggregates.taken(kind, key)

    def add(self, aggregate: A) -> A:
        # Replacing a staged aggregate would drop the changes the list made to it while
        # their receipts stand: a command creates an aggregate only after looking it up.
        held = self._copies.get(aggregate.id)
        if held is not None and not isinstance(held, type(aggregate)):
            # An aggregate of another kind (an account an earlier command opened on a SKU's
            # id): a refusal, as outside a list (``find_to_create``).
            raise id_held_by_another_kind(aggregate, held)
        if held is not None:
            msg = f"a command of the list created {aggregate.id}, which the list holds already"
            raise ValueError(msg)
        self._keep(aggregate)
        return aggregate

    def _keep(self, aggregate: LedgerAggregate) -> None:
        aggregate.as_of = self.now
        self._copies[aggregate.id] = aggregate

    def confirm_refusal(self) -> None:
        self._aggregates.confirm_refusal()

    def hand_back(self) -> None:
        outer = self._aggregates
        # A list inside a list (a saga step that is one): its copies replace the outer
        # list's, rather than being created there again.
        keep = outer._keep if isinstance(outer, Staged) else outer.add
        for aggregate in self._copies.values():
            keep(aggregate)


class Atomic(Command):
    """Apply ``commands`` all-or-nothing, in one transaction."""

    #: Offered as ``ledger.atomic([...])``, written by hand in the ledgers (its argument is
    #: a list of commands, and its receipt lists theirs).
    generated_method = False

    commands: LinkedCommands

    def payload(self) -> dict[str, Any]:
        return {"commands": [[command.name, command.payload()] for command in self.commands]}

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        linked = Staged(aggregates)
        receipts = []
        for index, command in enumerate(self.commands):
            try:
                fields = command.handle(linked)
            except DomainError as refusal:
                raise _refused(self.commands, index, refusal) from None
            receipts.append({"command": command.name, "request_id": self.request_id, **fields})
        linked.hand_back()
        return {"linked": receipts}


def _refused(commands: Sequence[Command], index: int, refusal: DomainError) -> DomainError:
    """The refusal of a list: the failing command's own error (same class and code), saying
    which command it was, with every command's outcome in ``details["outcomes"]``."""
    outcomes = [
        {
            "index": number,
            "command": command.name,
            "code": refusal.code if number == index else LINKED_COMMAND_FAILED,
        }
        for number, command in enumerate(commands)
    ]
    message = (
        f"command {index} of {len(commands)} in the linked list ({commands[index].name}) was "
        f"refused, so none was applied: {refusal.message}"
    )
    details = {**refusal.details, "index": index, "outcomes": outcomes}
    return type(refusal)(message, **details)
