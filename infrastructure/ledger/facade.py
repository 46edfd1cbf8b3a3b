"""The ledger as callers see it: ``Ledger`` (blocking) and ``AsyncLedger`` (asyncio).

Both have one method per registered command and per readable aggregate (generated into
``methods``, so the two cannot drift apart), ``submit`` for any command object, ``read``,
``head``, ``close``, and are context managers. Commands go to the service's committer: with
group commit, concurrent callers share transactions; asyncio callers wait on their own event
loop, without a thread each.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from daybook.domain.commands import Command, Receipt, command_named, registered, reserve
from daybook.domain.errors import DomainError, InvalidRequest
from daybook.domain.events import LedgerAggregate, readable
from daybook.domain.linked import Atomic
from daybook.infrastructure.ledger.application import LedgerService, refusal_counted
from daybook.infrastructure.ledger.group_commit import GroupCommitter
from daybook.infrastructure.ledger.methods import AsyncLedgerMethods, LedgerMethods, envelope
from daybook.infrastructure.ledger.retention import RequestPurge
from daybook.infrastructure.lifecycle import Health
from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.observability.tracing import command_span
from daybook.infrastructure.settings import Settings

A = TypeVar("A", bound=LedgerAggregate)

#: The most commands one ``submit`` takes.
MAX_SUBMISSION = 10_000

#: What ``submit`` answers for each command: its receipt, its refusal (a ``DomainError``),
#: or the error that stopped it (the store unreachable, say).
Outcome = Receipt | DomainError | Exception


def _submission(commands: object) -> list[Command]:
    """``commands`` as a list, or ``InvalidRequest`` (nothing is run)."""
    if not isinstance(commands, list | tuple):
        msg = f"submit takes a list of commands, got {type(commands).__name__}"
        raise InvalidRequest(msg, field="commands")
    if len(commands) > MAX_SUBMISSION:
        msg = (
            f"submit takes at most {MAX_SUBMISSION:,} commands, got {len(commands):,}; "
            "split them over several calls"
        )
        raise InvalidRequest(msg, field="commands", limit=MAX_SUBMISSION, count=len(commands))
    for index, command in enumerate(commands):
        if not isinstance(command, Command):
            msg = f"item {index} of the submission is a {type(command).__name__}, not a command"
            raise InvalidRequest(msg, field="commands", index=index)
    return list(commands)


def _atomic(
    commands: Sequence[Command],
    request_id: str | None,
    correlation_id: str | None,
    causation_id: str | None,
    actor: str | None,
    traceparent: str | None,
) -> Atomic:
    """The ``Atomic`` command ``atomic`` executes (for ``Ledger`` and ``AsyncLedger``)."""
    meta = envelope(
        request_id=request_id,
        correlation_id=correlation_id,
        causation_id=causation_id,
        actor=actor,
        traceparent=traceparent,
    )
    with refusal_counted(Atomic.name):
        # The check turns the list into the tuple the field declares.
        return Atomic(commands, **meta)  # type: ignore[arg-type]


def _command(command: object) -> Command:
    """``command`` if it is a command, or ``InvalidRequest`` (nothing is run). Checked before
    it is queued: what reaches the committer must be a command."""
    if not isinstance(command, Command):
        msg = f"execute takes a command, got {type(command).__name__}"
        raise InvalidRequest(msg, field="command")
    return command


R = TypeVar("R")

#: Threads an ``AsyncLedger`` reads the store in: its own, not the event loop's default
#: executor, which the service's own ``to_thread`` work and ``getaddrinfo`` share (reads
#: waiting out an outage held every one of its few workers); fewer than the event store's
#: pool holds connections, so that reads cannot take every one the writer needs.
_ASYNC_READ_THREADS = 8

#: Seconds after a held-back Ctrl-C from which another one interrupts the call at once.
_PRESSED_AGAIN = 1.0


def _shielded(work: Callable[..., R], *args: Any) -> R:
    """``work(*args)``, with Ctrl-C held back until it is done.

    Python raises ``KeyboardInterrupt`` in the main thread between any two bytecodes,
    inside the drivers' and pools' code too: just after SQLite's ``BEGIN`` it left the
    connection inside a transaction (every later ``BEGIN`` on it failed, for good), and
    while waiting for one of psycopg_pool's connections it left the connection handed to a
    caller that was gone. So in the main thread the SIGINT handler only notes the signal
    while the store works, and the handler that was there runs once the work is done (it
    raises ``KeyboardInterrupt``, as before). Ctrl-C then takes effect when the call
    returns: at once for a read, at most the call's own timeouts in an outage or behind a
    lock; pressed again a second or more later, it interrupts the call at once, as before
    (psycopg cancels the statement it waits for).

    (The work could run in another thread instead, answering Ctrl-C at once, but the hop
    cost 45 µs on every read of the main thread, four times a read of the memory store,
    and a thread pool does not survive a fork or run in ``atexit`` handlers; holding the
    signal back costs 15 to 20 µs.)"""
    if threading.current_thread() is not threading.main_thread():
        return work(*args)
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # ignored, or the default (the process ends): nothing to hold
        return work(*args)
    held: list[float] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if held and now - held[0] >= _PRESSED_AGAIN:
            held.clear()  # (answered here, not again once the work ends)
            handler(signum, frame)  # pressed again, a second later: the person means it
            return
        held.append(now)

    signal.signal(signal.SIGINT, hold)
    try:
        return work(*args)
    finally:
        signal.signal(signal.SIGINT, handler)
        if held:
            handler(signal.SIGINT, None)


def _observe_latency(name: str, started: float) -> None:
    """Observe one command's time from submission to answer (receipt or refusal): added to
    ``daybook_command_duration_seconds`` in bulk, not one lock per command (see
    ``metrics.observe_command_seconds``)."""
    metrics.observe_command_seconds(name, time.perf_counter() - started)


def _built(command_class: type[Command], args: Any, kwargs: Any) -> Command:
    """``command_class`` made from a late method's arguments (see ``_late_method``), a
    refusal counted as the generated methods count theirs."""
    with refusal_counted(command_class.name):
        return command_class(*args, **kwargs)


def _late_method(name: str) -> tuple[type[Command] | None, type[LedgerAggregate] | None]:
    """The command or readable aggregate registered as ``name`` after the methods were
    generated (an embedding service's own), if any."""
    try:
        return command_named(name), None
    except KeyError:
        return None, readable().get(name)


class Ledger(LedgerMethods):
    """The blocking ledger: ``ledger.transfer(a, b, 500)`` returns a ``Receipt`` once the
    command is durable, or raises its refusal (a ``DomainError``). Thread-safe."""

    def __init__(self, service: LedgerService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

    def execute(self, command: Command) -> Receipt:
        command = _command(command)
        self.service.refuse_if_forked()
        started = time.perf_counter()
        submit = self.service.committer.submit
        try:
            if not tracing.enabled():  # no span to make: skip the context manager's cost
                return self._committed(submit, command)
            with command_span(command):
                return self._committed(submit, command)
        finally:
            _observe_latency(command.name, started)

    def atomic(
        self,
        commands: Sequence[Command],
        *,
        request_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        actor: str | None = None,
        traceparent: str | None = None,
    ) -> Receipt:
        """Apply ``commands`` all-or-nothing in one transaction; ``receipt.linked`` holds
        their receipts in order. A refusal is the failing command's own error, naming its
        index; ``details["outcomes"]`` gives every command's code (the others:
        ``linked_command_failed``). Idempotent as a whole, by ``request_id``. Every event
        carries the list's metadata (``actor``, ``traceparent``...), not its commands'."""
        return self.execute(
            _atomic(commands, request_id, correlation_id, causation_id, actor, traceparent)
        )

    def submit(self, commands: Sequence[Command]) -> list[Outcome]:
        """Run up to ``MAX_SUBMISSION`` commands in one call; one outcome per command, in
        order: its ``Receipt``, its refusal (a ``DomainError``, returned, not raised), or the
        error that stopped it. Each command keeps its own request id and idempotency. Not
        all-or-nothing: a refusal does not stop the others. Commands are applied in order,
        so a command sees the effect of those before it. Raises ``InvalidRequest`` (and runs
        nothing) for a malformed submission. Each command is counted in
        ``daybook_commands_total``; none is timed in ``daybook_command_duration_seconds``
        (they are answered together, when the submission is)."""
        self.service.refuse_if_forked()
        outcomes = self._committed(self.service.committer.submit_many, _submission(commands))
        return outcomes  # type: ignore[return-value]

    def _committed(self, work: Callable[..., R], *args: Any) -> R:
        """``work(*args)``, a committer's: the group committer does the store's work in its
        own threads (the caller only waits, and Ctrl-C may end the wait at once); any other
        does it in the caller's (``_shielded``)."""
        if isinstance(self.service.committer, GroupCommitter):
            return work(*args)
        return _shielded(work, *args)

    def read(self, kind: type[A], key: Any) -> A:
        found: A = _shielded(self.service.read, kind, key)
        return found

    def _view(self, kind: type[LedgerAggregate], key: Any) -> Any:
        return _shielded(self.service.view, kind, key)

    def head(self) -> int:
        """The log position of the newest event (0 for an empty log)."""
        return _shielded(self.service.head)

    def health(self) -> Health:
        """The committer's health: running, stopped, or failed with the reason (in a child
        forked after the ledger was opened, failed)."""
        return self.service.health()

    @property
    def request_purge(self) -> RequestPurge:
        """The service deleting expired request records (its ``health()``, ``purge()``)."""
        return self.service.request_purge

    def close(self) -> None:
        """Finish the commands already submitted, then release the store."""
        self.service.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    if not TYPE_CHECKING:  # for type checkers, a misspelt method stays an error

        def __getattr__(self, name: str) -> Callable[..., Any]:
            command_class, kind = _late_method(name)
            if command_class is not None:
                return functools.wraps(command_class)(
                    lambda *args, **kwargs: self.execute(_built(command_class, args, kwargs))
                )
            if kind is not None:
                return lambda key: self._view(kind, key)
            raise AttributeError(name)


class AsyncLedger(AsyncLedgerMethods):
    """The asyncio ledger: ``await ledger.transfer(a, b, 500)``, the same methods and outcomes
    as ``Ledger``, always with group commit."""

    def __init__(self, service: LedgerService, settings: Settings) -> None:
        if not isinstance(service.committer, GroupCommitter):
            service.install_committer(GroupCommitter)
        assert isinstance(service.committer, GroupCommitter)
        self.service = service
        self.settings = settings
        self._committer = service.committer
        self._reads = ThreadPoolExecutor(
            _ASYNC_READ_THREADS, thread_name_prefix="daybook-async-read"
        )

    async def _in_thread(self, work: Callable[..., R], *args: Any) -> R:
        """``work(*args)`` in one of the ledger's read threads (a forked child is refused
        first: the parent's threads do not exist in it). Once closed, in the loop's default
        executor (a closed ledger's reads are refused, or, in memory, still answered)."""
        self.service.refuse_if_forked()
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, work, *args)
        try:
            future = loop.run_in_executor(self._reads, call)
        except RuntimeError:  # closed: the threads are gone
            return await asyncio.to_thread(work, *args)
        return await future

    async def execute(self, command: Command) -> Receipt:
        command = _command(command)
        self.service.refuse_if_forked()
        started = time.perf_counter()
        try:
            if not tracing.enabled():  # no span to make: skip the context manager's cost
                return await self._committer.submit_async(command)
            with command_span(command):
                return await self._committer.submit_async(command)
        finally:
            _observe_latency(command.name, started)

    async def atomic(
        self,
        commands: Sequence[Command],
        *,
        request_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        actor: str | None = None,
        traceparent: str | None = None,
    ) -> Receipt:
        """Apply ``commands`` all-or-nothing in one transaction (see ``Ledger.atomic``)."""
        return await self.execute(
            _atomic(commands, request_id, correlation_id, causation_id, actor, traceparent)
        )

    async def submit(self, commands: Sequence[Command]) -> list[Outcome]:
        """``Ledger.submit`` from a coroutine."""
        self.service.refuse_if_forked()
        outcomes = await self._committer.submit_many_async(_submission(commands))
        return outcomes  # type: ignore[return-value]

    async def read(self, kind: type[A], key: Any) -> A:
        return await self._in_thread(self.service.read, kind, key)

    async def _view(self, kind: type[LedgerAggregate], key: Any) -> Any:
        return await self._in_thread(self.service.view, kind, key)

    async def head(self) -> int:
        """The log position of the newest event (0 for an empty log)."""
        return await self._in_thread(self.service.head)

    async def health(self) -> Health:
        """The committer's health: running, stopped, or failed with the reason (in a child
        forked after the ledger was opened, failed)."""
        return self.service.health()

    @property
    def request_purge(self) -> RequestPurge:
        """The service deleting expired request records (its ``health()``, ``purge()``)."""
        return self.service.request_purge

    async def close(self) -> None:
        """Finish the commands already submitted, then release the store."""
        try:
            await asyncio.to_thread(self.service.close)
        finally:
            self._reads.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    if not TYPE_CHECKING:

        def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
            command_class, kind = _late_method(name)
            if command_class is not None:
                return functools.wraps(command_class)(
                    lambda *args, **kwargs: self.execute(_built(command_class, args, kwargs))
                )
            if kind is not None:

                async def read(key: Any) -> Any:
                    return await self._view(kind, key)

                return read
            raise AttributeError(name)


def _faces_own_names() -> set[str]:
    """The public names of ``Ledger`` and ``AsyncLedger`` that are not a command's or an
    aggregate's read method (theirs are checked by their registries)."""
    own = {"service", "settings"}  # set per instance
    for face in (Ledger, AsyncLedger):
        own |= {name for name in dir(face) if not name.startswith("_")}
    return own - {command.name for command in registered()} - set(readable())


# A command named like one of them would be shadowed by it: its method would never run.
reserve(_faces_own_names(), "a method of the ledger's own")
