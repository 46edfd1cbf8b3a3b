"""The saga processor: a supervised service that drives sagas to their end.

It finds sagas with something to do in the ``sagas`` read model (``wake_at`` due) and drives
each, in a pool of worker threads, until it must wait: it reads the saga from the ledger
(strongly consistent), asks it for its next move, does it, records the outcome, and asks
again. Decisions are the saga's; this module only carries them out:

- a local step is one ledger command (``RunLocalStep``) that applies the step and records it
  in one transaction, with a request id derived from the saga and the step, so a repeated
  delivery (after a crash, or from a second processor) is replayed, not applied twice;
- a remote step is a call through its port with an idempotency key derived the same way.
  A failure that a retry may cure is recorded with the time of the next attempt (exponential
  backoff, full jitter); a call whose outcome is unknown is looked up by its key, and every
  retry looks the key up before calling again: nothing is guessed. A circuit breaker per
  dependency stops calls while it is open; the sagas wait (no attempt is spent). Its
  cooldown, and those waits, are timed on the monotonic clock, not the wall clock: they
  live only in this process, and a step of the wall clock (NTP) must not stretch them;
- deadlines and compensations come from the saga (``next_move``); a compensation that keeps
  failing moves the saga to ``needs_attention`` after the policy's limit. A deadline is
  sent without a request id of its own (the saga fires it at most once), so one the ledger
  judges not passed yet fires when sent again;
- a move refused because the saga is not at it, the saga unchanged, ends that saga's drive
  (it is driven again at the next pass), rather than being made again at once.

Crash points (``DAYBOOK_FAULTS``) sit at every step boundary: before and after each local
command, before and after each remote call, and between compensations.

Seen from outside: each move runs in a span (``saga step charge``, ``saga compensate hold``,
``saga deadline charge``) continuing the trace of the command that started the saga, with a
client span per remote call; ``daybook_saga_compensations_total{step}`` and
``daybook_saga_deadlines_fired_total`` count the moves this processor recorded (a replayed
delivery is not counted again); ``daybook_sagas{state}`` is set from the ``sagas`` read
model at most once a second; each breaker sets ``daybook_circuit_breaker_state``.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from opentelemetry.trace import SpanKind

from daybook.domain.commands import Command, Receipt
from daybook.domain.errors import ConcurrencyConflict, DomainError
from daybook.domain.sagas import (
    Compensate,
    CompleteRemoteCompensation,
    CompleteRemoteStep,
    FailStep,
    FireDeadline,
    FireSagaDeadline,
    Local,
    Remote,
    RetryLater,
    RunLocalCompensation,
    RunLocalStep,
    RunStep,
    Saga,
    SagaState,
    Wait,
)
from daybook.domain.values import as_text
from daybook.infrastructure.gateway import (
    Charge,
    ChargeStatus,
    GatewayError,
    OutcomeUnknown,
    PaymentGateway,
    Refused,
)
from daybook.infrastructure.ledger.application import aware_clock
from daybook.infrastructure.ledger.facade import Ledger
from daybook.infrastructure.lifecycle import (
    Health,
    RestartPolicy,
    ServiceState,
    Stopping,
    SupervisedThread,
)
from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.observability.logs import log_context
from daybook.infrastructure.readmodels.queries import ReadModelChanged, ReadModels, StaleRead
from daybook.infrastructure.sagas.breaker import BreakerState, CircuitBreaker
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.transient import first_line, is_transient
from daybook.projections.model import iso_time
from daybook.projections.sagas import SAGA_LIST, SAGA_STATES, SAGAS

log = logging.getLogger("daybook.sagas")

#: Refusals that mean another delivery got there first, or the saga is not at that move:
#: read the saga again (``drive`` ends if it did not change). (A local compensation's
#: attempt answered ``idempotency_conflict`` is recorded failed instead: ``_compensate``.)
_MOVED_ON = frozenset({"saga_moved_on", "saga_finished", "idempotency_conflict"})


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter between attempts of one step."""

    initial: float = 0.05
    ceiling: float = 5.0

    def delay(self, attempt: int, draw: Callable[[float, float], float]) -> float:
        # The exponent stops growing long after the ceiling is reached: uncapped, attempt
        # 1,025 overflowed a float and stopped the processor (as ``RestartPolicy.delay``).
        return draw(0.0, min(self.ceiling, self.initial * 2 ** min(attempt - 1, 64)))


def idempotency_key(saga_id: UUID, step: str) -> str:
    """The key a remote step (and its compensation) is called with."""
    return f"{saga_id}:{step}"


#: How many batches of skipped sagas (waiting for a breaker, or being driven) a pass reads
#: past, at most, to find the sagas due for anything else (see ``run_due``).
_SKIPPED_READ = 8


class SagaProcessor:
    """Drives sagas (see the module docstring). ``start``/``stop``/``health`` as a service;
    ``drive(saga_id)`` and ``run_due()`` for one saga or one pass.

    Two clocks: ``clock`` (the ledger's by default) for the instants stored in sagas and
    judged by every process (deadlines, retry times); ``monotonic`` (``time.monotonic`` by
    default, seconds) for what lives only in this process (its breakers' cooldowns, the
    waits of sagas for an open breaker), which no step of the wall clock may stretch."""

    def __init__(
        self,
        ledger: Ledger,
        views: ReadModels,
        ports: Mapping[str, PaymentGateway],
        *,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        workers: int = 8,
        poll: float = 0.05,
        batch: int = 256,
        backoff: Backoff | None = None,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 2.0,
        name: str = "saga processor",
        seed: int | None = None,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.ledger = ledger
        self.views = views
        self.ports = dict(ports)
        self.clock = aware_clock(clock) if clock else ledger.service.clock
        self.monotonic = monotonic
        self.poll = poll
        self.batch = batch
        self.backoff = backoff or Backoff()
        self.name = name
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self.breakers = {
            dependency: CircuitBreaker(
                dependency, monotonic, threshold=breaker_threshold, cooldown=breaker_cooldown
            )
            for dependency in self.ports
        }
        self._pool = _Workers(workers, "daybook-saga")
        self._lock = threading.Lock()
        self._in_flight: set[UUID] = set()
        #: The workers' futures not yet done (``stop`` waits for them, within its bound).
        self._futures: set[Future[None]] = set()
        #: Sagas waiting for an open breaker: not driven before then (``monotonic``).
        self._not_before: dict[UUID, float] = {}
        self._failure: BaseException | None = None
        #: Why the last drive to end failed, if it met an outage (see ``_run``).
        self._stalled: str | None = None
        #: How many moves this processor made (steps, compensations, deadlines, retries).
        self.moves = 0
        #: When ``run_due`` next sets ``daybook_sagas`` (monotonic seconds).
        self._observe_at = 0.0
        self.service = SupervisedThread(name, self._run, policy=policy, on_stop=self._on_stop)

    # -- the service ----------------------------------------------------------------------

    def start(self) -> None:
        self.service.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new sagas, let each worker finish the move in hand, and wait up to
        ``timeout`` seconds in all. Sagas handed out but not started are left for the next
        pass of any processor. A move still running then (a gateway call that hangs) is
        left to its thread and said in the log: its saga is as safe as after a crash (each
        move is recorded once, a call is looked up before it is repeated), and the next
        processor to start takes it up. Unbounded, one hung call held the stop for ever."""
        deadline = time.monotonic() + timeout
        self.service.stop(timeout)
        self._pool.shutdown()
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.cancel()  # the queued ones (a running one goes on)
        _, undone = wait(futures, max(0.0, deadline - time.monotonic()))
        running = [future for future in undone if not future.cancelled()]
        if running:
            with self._lock:
                sagas = ", ".join(sorted(str(saga_id) for saga_id in self._in_flight))
            log.warning("%s: stopped with %d saga move(s) still running after %gs (sagas %s);"
                        " the next processor to start takes them up",
                        self.name, len(running), timeout, sagas)  # fmt: skip

    def _on_stop(self) -> None:
        """Finish the sagas in hand; take no new ones."""

    def health(self) -> Health:
        return self.service.health()

    def _run(self, stopping: Stopping) -> None:
        while not stopping:
            try:
                handed = self.run_due()
            except StaleRead as error:
                # The sagas read model is not there yet (its runner is starting, or
                # stopped): nothing can be seen to be due. Say so in health, and look again.
                self.service.supervisor.move(ServiceState.RETRYING, str(error))
            else:
                # The read models answered; the sagas themselves may not move (the event
                # store away, with the read models elsewhere): health says so while the
                # last drive to end failed on an outage and sagas are still due.
                stalled = self._stalled
                if stalled is not None and (handed or self._in_flight):
                    reason = f"sagas cannot move: {stalled}"
                    self.service.supervisor.move(ServiceState.RETRYING, reason)
                else:
                    self._stalled = None
                    self.service.supervisor.succeeded()
            stopping.wait(self.poll)

    def run_due(self) -> int:
        """One pass: hand every due saga to a worker; how many were handed out. Raises the
        failure of a worker that met something a retry cannot cure."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        now = self.clock()
        moment = self.monotonic()
        with self._lock:  # forget breaker waits that are over (bounded by the sagas waiting)
            self._not_before = {s: t for s, t in self._not_before.items() if t > moment}
            # The sagas this pass skips (waiting for a breaker, or in a worker now) are due
            # in the read model, and the oldest there: read past them, or ``batch`` of them
            # filled every pass and the sagas due for anything else (a deadline, a local
            # compensation) were never handed out while a breaker stayed open.
            # Bounded: in a long outage with orders still coming, thousands may wait, and
            # every pass reading them all would load the read models when least welcome;
            # past ``_SKIPPED_READ`` batches of them, sagas due for anything else wait.
            skipped = min(len(self._not_before) + len(self._in_flight), _SKIPPED_READ * self.batch)
        rows = self.views.rows(
            SAGA_LIST,
            SAGAS.name,
            where="state IN ('running', 'compensating') AND wake_at <= %s",
            params=[iso_time(now)],
            order="wake_at",
            limit=self.batch + skipped,
            timeout=0.0,  # not built yet: StaleRead at once (see _run)
        ).value
        handed = 0
        for row in rows:
            if handed >= self.batch:
                break
            if self.wake(UUID(str(row["saga_id"]))) is not None:
                handed += 1
        if time.monotonic() >= self._observe_at:
            self._observe_at = time.monotonic() + self.observe_every
            self.observe_states()
        return handed

    #: How often (seconds) ``run_due`` counts the sagas by state for ``daybook_sagas``.
    observe_every = 1.0

    def observe_states(self) -> dict[str, int]:
        """Set ``daybook_sagas{state}`` from the ``sagas`` read model (its row per state;
        as current as that read model), every state included, and return the counts."""
        counts = saga_counts(self.views)
        for state, count in counts.items():
            metrics.SAGAS.labels(state).set(count)
        return counts

    def wake(self, saga_id: UUID) -> Future[None] | None:
        """Drive ``saga_id`` in a worker now (unless one is at it already, or it waits for
        an open breaker)."""
        with self._lock:
            if saga_id in self._in_flight:
                return None
            not_before = self._not_before.get(saga_id)
            if not_before is not None:
                if self.monotonic() < not_before:
                    return None
                del self._not_before[saga_id]
            self._in_flight.add(saga_id)
        # Handed out and recorded as one step: a stop (which shuts the workers, then reads
        # the futures under this lock) either sees the future, to cancel or wait for, or
        # finds the workers shut.
        with self._lock:
            try:
                future = self._pool.submit(lambda: self._drive_in_worker(saga_id))
            except RuntimeError:  # the workers shut down: the processor is stopping
                self._in_flight.discard(saga_id)
                return None
            self._futures.add(future)
        future.add_done_callback(lambda done: self._forget(done, saga_id))
        return future

    def _forget(self, future: Future[None], saga_id: UUID) -> None:
        with self._lock:
            self._futures.discard(future)
            if future.cancelled():  # never started: its worker's cleanup never ran
                self._in_flight.discard(saga_id)

    def _drive_in_worker(self, saga_id: UUID) -> None:
        with log_context(saga_id=str(saga_id)):  # on every line logged about it
            self._drive_logged(saga_id)

    def _drive_logged(self, saga_id: UUID) -> None:
        try:
            self.drive(saga_id)
            self._stalled = None
        # Not only Exception: a BaseException (SystemExit from a port's SDK, a
        # CancelledError) ended the move in its worker's future, which nobody reads.
        except BaseException as error:
            transient = is_transient(error)
            if transient:
                self._stalled = first_line(error)
            if transient or isinstance(error, ConcurrencyConflict):
                # The store or a port is out, or other writers kept the saga's accounts or
                # SKUs busy past the ledger's retries (nothing was applied): the saga is
                # due again at the next pass.
                log.warning("%s: saga %s: %s; retrying", self.name, saga_id, error)
            else:
                log.exception("%s: saga %s failed", self.name, saga_id)
                self._failure = error
        finally:
            with self._lock:
                self._in_flight.discard(saga_id)

    # -- driving one saga ---------------------------------------------------------------------

    def drive(self, saga_id: UUID, *, max_moves: int = 1000) -> Saga:
        """Make the saga's moves until it must wait, or until a move changed nothing; its
        state then.

        Every move that goes ahead records something in the saga (its version grows), by
        this processor or by another delivery that got there first. A move answered as moved
        on while the saga stayed as it was (a deadline refused as not passed yet by the
        ledger's clock, a refusal replayed for its request id) would only be made again at
        once, up to ``max_moves`` times: the drive ends instead, and the saga, still due, is
        driven again at the next pass."""
        before: int | None = None
        for _ in range(max_moves):
            saga = self.ledger.read(Saga, saga_id)
            if saga.version == before:
                log.debug("%s: saga %s: its last move changed nothing; due again at the next"
                          " pass", self.name, saga_id)  # fmt: skip
                return saga
            before = saga.version
            now = self.clock()
            move = saga.next_move(now)
            if isinstance(move, Wait) or self.service.stopping:
                return saga  # (stopping: the move in hand was the last; the rest is due)
            self.moves += 1
            if isinstance(move, FireDeadline):
                with _step_span(saga, "deadline", move.step):
                    # No request id of its own, as the expiry sweeper sends expiries: the
                    # saga fires a generation's deadline at most once, and a refusal is then
                    # not recorded. With one, a deadline judged not passed yet by the
                    # ledger's clock (a moment behind this processor's) pinned that answer
                    # to the id, and every later send of it was answered so for the
                    # request retention window: the deadline never fired.
                    fired = self._send(
                        FireSagaDeadline(
                            saga_id,
                            move.step,
                            move.generation,
                            decided_by=self.name,
                            correlation_id=str(saga_id),
                        )
                    )
                if _new(fired):
                    metrics.SAGA_DEADLINES.inc()
            elif isinstance(move, RunStep):
                with _step_span(saga, "step", move.step.name):
                    if isinstance(move.step.action, Local):
                        crash_point("saga.before_local")
                        self._send(
                            RunLocalStep(
                                saga_id,
                                move.step.name,
                                decided_by=self.name,
                                request_id=f"saga:{saga_id}:{move.step.name}",
                                correlation_id=str(saga_id),
                            )
                        )
                        crash_point("saga.after_local")
                        moved = True
                    else:
                        moved = self._remote_step(saga, move)
                if not moved:
                    return saga
            elif isinstance(move, Compensate):
                crash_point("saga.between_compensations")
                with _step_span(saga, "compensate", move.step.name):
                    moved = self._compensate(saga, move)
                if not moved:
                    return saga
        return self.ledger.read(Saga, saga_id)

    def _send(self, command: Command) -> Receipt | None:
        """Execute a recording command: its receipt (``replayed`` if another delivery
        recorded it first), or None if it was refused as one for a step, attempt or
        deadline the saga is not at (a refusal replayed for its request id, or the id used
        with another payload, included): ``drive`` reads the saga again, and ends if
        nothing changed."""
        try:
            return self.ledger.execute(command)
        except DomainError as refusal:
            if refusal.code in _MOVED_ON:
                return None
            raise

    def _retry_at(self, attempt: int, now: datetime, at_least: float | None = None) -> datetime:
        """When to try again after ``attempt``: the backoff's delay, or the ``at_least``
        seconds the remote asked for (``Retry-After``), whichever is longer."""
        with self._random_lock:
            delay = self.backoff.delay(attempt, self._random.uniform)
        return now + timedelta(seconds=max(delay, at_least or 0.0))

    def _breaker_open(self, saga: Saga, dependency: str) -> bool:
        breaker = self.breakers[dependency]
        if breaker.allow():
            return False
        # Wait for the breaker, spending no attempt; the deadline still applies. While its
        # trial call is out (half open), for a cooldown at most: the trial's success wakes
        # them (``_succeeded``). Due again at once, every saga waiting was read and parked
        # again at every poll for as long as a slow trial call took.
        wait = breaker.reopens_in()
        if wait is None:
            wait = breaker.cooldown.total_seconds()
        reopens = self.monotonic() + wait
        with self._lock:
            self._not_before[saga.id] = reopens
        return True

    def _succeeded(self, breaker: CircuitBreaker) -> None:
        """Answer a call that went through; a breaker that closes wakes its waiting sagas."""
        closing = breaker.state is not BreakerState.CLOSED
        breaker.succeeded()
        if closing:
            with self._lock:
                self._not_before.clear()

    def _remote_step(self, saga: Saga, move: RunStep) -> bool:
        """Call a remote step and record what happened; False when the saga must wait for
        its dependency's breaker."""
        step, attempt = move.step, move.attempt
        remote = step.action
        assert isinstance(remote, Remote)
        if self._breaker_open(saga, remote.dependency):
            return False
        port = self.ports[remote.dependency]
        breaker = self.breakers[remote.dependency]
        key = idempotency_key(saga.id, step.name)
        request = remote.build(saga.context)
        charge: Charge | None = None
        try:
            if attempt > 1:
                # An earlier try may have been done without our hearing of it: ask first.
                with _remote_span(remote.dependency, "lookup"):
                    charge = port.lookup(key)
            if charge is None:
                crash_point("saga.before_remote")
                with _remote_span(remote.dependency, remote.operation):
                    charge = self._call(port, remote.operation, key, request)
                crash_point("saga.after_remote")
        except Refused:
            # The remote answered: up, but it will not take this processor's requests as
            # they are (credentials, a URL where no gateway answers its routes). No retry
            # cures that, and guessing would fail orders that did nothing wrong: raised, it
            # stops the processor visibly until a person looks.
            self._succeeded(breaker)
            raise
        except OutcomeUnknown as unknown:
            breaker.failed()
            try:
                with _remote_span(remote.dependency, "lookup"):
                    charge = port.lookup(key)
            except Refused:
                raise  # as for the charge itself: stops the processor, no attempt spent
            except GatewayError as error:
                return self._retry(
                    saga,
                    step.name,
                    attempt,
                    f"outcome unknown ({error})",
                    at_least=error.retry_after,
                )
            if charge is None:
                # Looked up: definitely not done. Try again (same key) after a backoff.
                return self._retry(saga, step.name, attempt, f"not done ({unknown})")
        except GatewayError as error:
            breaker.failed()
            return self._retry(saga, step.name, attempt, str(error), at_least=error.retry_after)
        except BaseException:
            # A port of the deployment's own raised something else (a bug; it stops the
            # processor): whichever call took the breaker's one trial, it is answered, or
            # the breaker would let no call through again (``drive`` may be called again).
            breaker.failed()
            raise
        self._succeeded(breaker)
        if charge.status is ChargeStatus.SUCCEEDED and not charge.is_for(
            int(request["amount"]), str(request["currency"])
        ):
            # Made, but not the charge asked for (a partial approval, another currency): the
            # order must not move its full total for it. Failed, the saga compensates, and
            # its compensation refunds the charge by its key.
            self._send(
                FailStep(
                    saga.id,
                    step.name,
                    "charge_mismatch",
                    as_text(
                        f"the gateway charged {charge.amount} {charge.currency}, not the "
                        f"{request['amount']} {request['currency']} asked for"
                    ),
                    decided_by=self.name,
                    request_id=f"saga:{saga.id}:{step.name}:failed",
                    correlation_id=str(saga.id),
                )
            )
        elif charge.status is ChargeStatus.SUCCEEDED:
            result = {"charge_id": charge.charge_id, "amount": charge.amount}
            self._send(
                CompleteRemoteStep(
                    saga.id,
                    step.name,
                    result,
                    request_id=f"saga:{saga.id}:{step.name}:done",
                    correlation_id=str(saga.id),
                )
            )
        elif charge.status is not ChargeStatus.DECLINED:
            # A port of the deployment's own answered a state it cannot judge: not done as
            # far as anyone knows, and not declined either. Asked again, after a backoff.
            return self._retry(
                saga, step.name, attempt, f"the charge is {charge.status}: {charge.detail}"
            )
        else:
            self._send(
                FailStep(
                    saga.id,
                    step.name,
                    "payment_declined",
                    as_text(f"the gateway declined the charge ({charge.decline_code})"),
                    decided_by=self.name,
                    request_id=f"saga:{saga.id}:{step.name}:failed",
                    correlation_id=str(saga.id),
                )
            )
        return True

    def _call(
        self, port: PaymentGateway, operation: str, key: str, request: Mapping[str, Any]
    ) -> Charge:
        if operation != "charge":
            msg = f"the payment port has no forward operation {operation!r}"
            raise ValueError(msg)
        return port.charge(
            key,
            amount=int(request["amount"]),
            currency=str(request["currency"]),
            customer=str(request["customer"]),
            reference=str(request["reference"]),
        )

    def _retry(
        self, saga: Saga, step: str, attempt: int, error: str, *, at_least: float | None = None
    ) -> bool:
        """Record a failed try; ``at_least``: the seconds the remote asked to be left alone
        (``Retry-After``), waited before the next try however short the backoff."""
        now = self.clock()
        if attempt >= saga.definition.policy.max_attempts:
            self._send(
                FailStep(
                    saga.id,
                    step,
                    "remote_unavailable",
                    as_text(f"gave up after {attempt} attempts: {error}"),
                    decided_by=self.name,
                    request_id=f"saga:{saga.id}:{step}:failed",
                    correlation_id=str(saga.id),
                )
            )
            return True
        self._send(
            RetryLater(
                saga.id,
                step,
                attempt,
                as_text(error),
                self._retry_at(attempt, now, at_least),
                request_id=f"saga:{saga.id}:{step}:retry:{attempt}",
                correlation_id=str(saga.id),
            )
        )
        return True

    def _compensate(self, saga: Saga, move: Compensate) -> bool:
        step, attempt = move.step, move.attempt
        compensation = step.compensation
        if isinstance(compensation, Local):
            try:
                undone = self.ledger.execute(
                    RunLocalCompensation(
                        saga.id,
                        step.name,
                        attempt,
                        decided_by=self.name,
                        request_id=_undo_id(saga, step.name, str(attempt)),
                        correlation_id=str(saga.id),
                    )
                )
            except ConcurrencyConflict:
                raise  # not applied, not failed: the next pass tries it again
            except DomainError as refusal:
                if refusal.code == "idempotency_conflict":
                    # This attempt's id was sent before by a processor of another name (the
                    # name is in the command) that has not recorded the outcome (it stopped).
                    # Had it been applied, the step would be compensated and the failure
                    # recorded below refused (it names the attempt): so it was refused, and
                    # the attempt is recorded failed; the next one has an id of its own.
                    # Taken for progress, it was sent again until the id's record expired.
                    why = self._first_refusal(_undo_id(saga, step.name, str(attempt)), attempt)
                    self._compensation_failed(saga, step.name, attempt, why)
                    return True
                if refusal.code in _MOVED_ON:
                    return True
                self._compensation_failed(saga, step.name, attempt, f"{refusal.code}: {refusal}")
            else:
                if _new(undone):
                    metrics.SAGA_COMPENSATIONS.labels(step.name).inc()
            return True
        assert isinstance(compensation, Remote)
        if self._breaker_open(saga, compensation.dependency):
            return False
        port = self.ports[compensation.dependency]
        breaker = self.breakers[compensation.dependency]
        key = idempotency_key(saga.id, step.name)
        try:
            crash_point("saga.before_remote")
            with _remote_span(compensation.dependency, "refund"):
                refund = port.refund(key)
            crash_point("saga.after_remote")
        except Refused:
            self._succeeded(breaker)  # as for a forward call: stops the processor visibly
            raise
        except GatewayError as error:
            breaker.failed()
            self._compensation_failed(
                saga, step.name, attempt, str(error), at_least=error.retry_after
            )
            return True
        except BaseException:
            breaker.failed()  # as for a forward call: the trial is answered
            raise
        self._succeeded(breaker)
        # The id names the attempt, as a local compensation's does: the saga records one
        # attempt's success at most once, and a success refused because the saga moved past
        # its attempt (another processor recorded it failed meanwhile) is recorded under
        # that attempt's id only. With one id for every attempt, each later attempt's
        # success was answered idempotency_conflict: the refund was never recorded.
        compensated = self._send(
            CompleteRemoteCompensation(
                saga.id,
                step.name,
                attempt,
                {"status": refund.status, "amount": refund.amount},
                decided_by=self.name,
                request_id=_undo_id(saga, step.name, f"done:{attempt}"),
                correlation_id=str(saga.id),
            )
        )
        if _new(compensated):
            metrics.SAGA_COMPENSATIONS.labels(step.name).inc()
        return True

    def _first_refusal(self, request_id: str, attempt: int) -> str:
        """Why a compensation's attempt sent by another processor was refused, as its
        request record says (``code: message``, as for one of this processor's own)."""
        record = self.ledger.service.recorded([request_id]).get(request_id)
        error = record.outcome.get("error") if record is not None else None
        if isinstance(error, dict) and "code" in error:
            return f"{error['code']}: {error.get('message', '')}"
        return f"attempt {attempt} was refused for a processor of another name"

    def _compensation_failed(
        self, saga: Saga, step: str, attempt: int, error: str, *, at_least: float | None = None
    ) -> None:
        self._send(
            RetryLater(
                saga.id,
                step,
                attempt,
                as_text(error),
                self._retry_at(attempt, self.clock(), at_least),
                compensating=True,
                decided_by=self.name,
                request_id=_undo_id(saga, step, f"retry:{attempt}"),
                correlation_id=str(saga.id),
            )
        )


class _Workers:
    """A fixed pool of daemon threads running the processor's sagas. Not
    ``concurrent.futures.ThreadPoolExecutor``: the interpreter joins its threads on exit,
    so one gateway call that never returns held the process for ever after a stop that
    had given up on it. A saga's move is as safe to cut short as a crash: each is recorded
    once, and a remote call is looked up before it is repeated."""

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future[None], Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, work: Callable[[], None]) -> Future[None]:
        """Run ``work`` in a worker; its future. Raises RuntimeError once shut down."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the saga workers are shut down")
            if not self._threads:  # started at the first saga, as the processor's users
                for number in range(self._count):  # may only ever drive sagas themselves
                    thread = threading.Thread(
                        target=self._work, name=f"{self._name}-{number}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
            future: Future[None] = Future()
            self._queue.put((future, work))
        return future

    def shutdown(self) -> None:
        """Take no more work; each worker ends once the queue before it is done (cancel
        the futures of what should not start)."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, work = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                work()
            except BaseException as error:  # handed to whoever waits on the future
                future.set_exception(error)
            else:
                future.set_result(None)


def _undo_id(saga: Saga, step: str, move: str) -> str:
    """The request id of a compensation move. Attempts are numbered anew after a person's
    retry, so each round's ids name the round (none for the first, as before rounds had
    them): with the first round's ids, the retry replayed that round's outcomes, a refusal
    its cause had since been fixed for, or a failure recorded already, and nothing moved."""
    round_ = f":round:{saga.retries}" if saga.retries else ""
    return f"saga:{saga.id}:undo:{step}:{move}{round_}"


def _new(receipt: Receipt | None) -> bool:
    """Whether a recording command was recorded now (not replayed, nor moved on): what the
    saga counters count, so that a second delivery does not count a move twice."""
    return receipt is not None and not receipt.replayed


@contextmanager
def _step_span(saga: Saga, move: str, step: str) -> Iterator[None]:
    """The span of one saga move (``saga step charge``, ``saga compensate hold``, ``saga
    deadline charge``), continuing the trace of the command that started the saga; its
    commands' spans and commits are its children. Nothing when no tracing SDK is set up."""
    if not tracing.enabled():
        yield
        return
    attributes = {"daybook.saga_id": str(saga.id), "daybook.saga": saga.kind, "daybook.step": step}
    with tracing.span(f"saga {move} {step}", parent=saga.traceparent, attributes=attributes):
        yield


@contextmanager
def _remote_span(dependency: str, operation: str) -> Iterator[None]:
    """The span of one call to a remote dependency (a child of the saga move's span)."""
    if not tracing.enabled():
        yield
        return
    attributes = {"daybook.dependency": dependency, "daybook.operation": operation}
    with tracing.span(f"{dependency} {operation}", kind=SpanKind.CLIENT, attributes=attributes):
        yield


def saga_counts(views: ReadModels) -> dict[str, int]:
    """How many sagas are in each state, every state included, from the ``sagas`` read model
    (a row per state, whatever the history)."""
    try:
        rows = views.rows(SAGA_LIST, SAGA_STATES.name, timeout=0.0).value
        counted = {str(row["state"]): int(row["sagas"] or 0) for row in rows}
    except ReadModelChanged:
        # Version 1 serves while this code's version is built (a deploy): it has no counts
        # table, so its sagas are counted, once a second until the switch.
        found = views.count(SAGA_LIST, SAGAS.name, by="state", timeout=0.0).value
        counted = {str(state): count for state, count in found.items()}
    return {state.value: counted.get(state.value, 0) for state in SagaState}
