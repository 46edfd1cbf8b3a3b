"""One lifecycle for every long-running part: start, stop (draining), health, supervision.

A service's work is a *body*: a function that runs until asked to stop (its ``Stopping``
says when) and raises when something goes wrong. A ``Supervisor`` runs the body and decides
what a failure means:

- a transient failure (``is_transient``: a lost connection, a store or broker outage) is
  logged and the body is started again after a backoff with full jitter, growing to a
  ceiling, and reset once the body has run well for a while; the service is ``RETRYING``
  meanwhile, with the error in its health. It stays ``RETRYING`` through its next
  attempts until its body says that a unit of work went through (``Supervisor.recovered``
  or ``succeeded``): an attempt that is still connecting, perhaps to time out again, is
  no recovery, and health must not say it runs (nor the log "recovered", nor the
  restart count move) at each attempt of a long outage. So every body calls one of them
  after each unit of work (both are cheap);
- any other failure is a bug or bad data that a retry would only hide: the service stops
  with state ``FAILED`` and the reason, logged once, visible in ``health()``. Nothing dies
  silently. A ``Refused`` (a service refusing to go on for a reason its operator must fix:
  an ownership, a configuration) is logged as one line with its code; a bug keeps its
  traceback.

``stop()`` asks the body to finish what it has in hand and waits for it. Thread services
(``SupervisedThread``) run the body in a thread of their own; asyncio services
(``SupervisedTask``) as a task on the running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from daybook.infrastructure.observability import metrics
from daybook.infrastructure.observability.logs import LIMITED_AT_SOURCE, SUBJECT
from daybook.infrastructure.transient import denied, first_line, is_transient

log = logging.getLogger("daybook.services")

#: A service's final line (stopped, or failed for good) is said once per stop: it always
#: passes the log's rate limit, which would otherwise hold back a second service's (of the
#: same template) for good, as it never repeats.
_FINAL = {LIMITED_AT_SOURCE: True}


class ServiceState(enum.Enum):
    """Where a service is in its life; ``can_become`` lists the moves it may make."""

    CREATED = "created"
    RUNNING = "running"
    #: A transient failure: waiting to start the body again.
    RETRYING = "retrying"
    STOPPING = "stopping"
    STOPPED = "stopped"
    #: A failure a retry would not cure; the reason is in ``Health.error``.
    FAILED = "failed"

    def can_become(self, other: ServiceState) -> bool:
        return other in _MOVES[self]


_MOVES: dict[ServiceState, frozenset[ServiceState]] = {
    ServiceState.CREATED: frozenset({ServiceState.RUNNING, ServiceState.STOPPED}),
    ServiceState.RUNNING: frozenset(
        {ServiceState.RETRYING, ServiceState.STOPPING, ServiceState.STOPPED, ServiceState.FAILED}
    ),
    ServiceState.RETRYING: frozenset(
        {ServiceState.RUNNING, ServiceState.STOPPING, ServiceState.STOPPED, ServiceState.FAILED}
    ),
    ServiceState.STOPPING: frozenset({ServiceState.STOPPED, ServiceState.FAILED}),
    ServiceState.STOPPED: frozenset(),
    ServiceState.FAILED: frozenset(),
}


@dataclass(frozen=True)
class Health:
    """A service's state, since when, how often it restarted, and its last failure."""

    name: str
    state: ServiceState
    since: datetime
    restarts: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state in (ServiceState.CREATED, ServiceState.RUNNING, ServiceState.STOPPED)


@dataclass(frozen=True)
class RestartPolicy:
    """How a transient failure is retried: exponential backoff with full jitter."""

    initial: float = 0.1
    ceiling: float = 5.0
    #: After running this long without failing, the next failure starts from ``initial``.
    healthy_after: float = 60.0
    #: Give up (``FAILED``) after this many restarts in a row; None: never.
    max_restarts: int | None = None

    def delay(self, attempt: int, draw: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds to wait before attempt ``attempt`` (1 for the first retry). The exponent
        stops growing long after the ceiling is reached: unbounded, the 1,025th attempt in a
        row (some 40 minutes into an outage) overflowed a float and ended the service."""
        return draw(0.0, min(self.ceiling, self.initial * 2 ** min(attempt - 1, 64)))


class Stopping:
    """Tells a body that its service is stopping; a body checks it between units of work
    and may wait on it instead of sleeping."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early when stopping; True if stopping."""
        return self._event.wait(timeout)


@dataclass
class Supervisor:
    """The restart policy and health bookkeeping shared by thread and asyncio services."""

    name: str
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    transient: Callable[[BaseException], bool] = is_transient
    #: Called after a failed run of the body, before the next (release connections...).
    on_failure: Callable[[BaseException], None] | None = None
    _health: Health = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _attempt: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._health = Health(self.name, ServiceState.CREATED, datetime.now(UTC))

    def health(self) -> Health:
        with self._lock:
            return self._health

    def move(self, state: ServiceState, error: str | None = None, *, recovery: bool = True) -> bool:
        """Enter ``state`` if the current state allows it (a start, a recovery and a stop are
        logged, and every move is in the metrics: ``daybook_service_up``). ``recovery``
        False: a move from RETRYING back to RUNNING that is no recovery (the part gave up
        what it retried, and waits for new work): neither logged nor counted as one."""
        with self._lock:
            current = self._health
            if current.state is state and error == current.error:
                return True
            if not current.state.can_become(state) and current.state is not state:
                return False
            restarted = (
                recovery
                and state is ServiceState.RUNNING
                and current.state is ServiceState.RETRYING
            )
            self._health = replace(
                current,
                state=state,
                since=datetime.now(UTC),
                restarts=current.restarts + restarted,
                error=error,
            )
        up = state in (ServiceState.RUNNING, ServiceState.RETRYING, ServiceState.STOPPING)
        metrics.SERVICE_UP.labels(self.name).set(1 if up else 0)
        metrics.SERVICE_RETRYING.labels(self.name).set(1 if state is ServiceState.RETRYING else 0)
        if restarted:
            metrics.SERVICE_RESTARTS.labels(self.name).inc()
            log.info("%s: recovered (restart %d)", self.name, current.restarts + 1)
        elif state is ServiceState.RUNNING and current.state is ServiceState.CREATED:
            log.info("%s: started", self.name)
        elif state is ServiceState.STOPPED and current.state is not ServiceState.STOPPED:
            log.info("%s: stopped", self.name)
        return True

    def succeeded(self) -> None:
        """A unit of work went through: back to RUNNING (from RETRYING; a waiting note
        cleared), and the next failure starts the backoff from ``initial`` (for services
        that retry one unit at a time)."""
        self._attempt = 0
        if self._health.state in (ServiceState.RUNNING, ServiceState.RETRYING):
            self.move(ServiceState.RUNNING)

    def recovered(self) -> None:
        """The body got a unit of work through after a restart: ``RETRYING`` becomes
        ``RUNNING`` (logged and counted once). Cheap enough to call after every unit; the
        backoff keeps growing until the body has run ``healthy_after`` (see ``ran``)."""
        if self._health.state is ServiceState.RETRYING:
            self.move(ServiceState.RUNNING)

    def ran(self, started: float) -> None:
        """The body ran from ``started`` (monotonic) until now; long enough resets backoff."""
        if time.monotonic() - started >= self.policy.healthy_after:
            self._attempt = 0

    def cut_off_while_stopping(self, error: BaseException) -> bool:
        """Whether ``error``, raised by a body after its stop was asked, is one a restart
        would have retried (an outage): said in one line, and the service stops, rather
        than log a restart that will not come. Work it cut off is the next start's."""
        if not isinstance(error, Exception) or not self.transient(error):
            return False
        log.info("%s: %s while stopping; not restarted", self.name, first_line(error))
        self._clean_up(error)  # as after any failed run
        return True

    def judge(self, error: BaseException) -> float | None:
        """After the body raised ``error``: seconds to wait before restarting it, or None
        when the service has failed for good (already logged and recorded). Never raises:
        a failure to judge (a bug here) fails the service visibly, rather than end its
        thread with its health still saying it runs."""
        try:
            # A BaseException that is no Exception ends the body for good (an asyncio
            # service raises it on; a thread's ends): not for a retry, whatever
            # ``transient`` says of it.
            return self._judge(error, final=not isinstance(error, Exception))
        except Exception as bug:
            log.error("%s: judging a failure failed; stopped", self.name, exc_info=bug,
                      extra=_FINAL)  # fmt: skip
            self.move(ServiceState.FAILED, f"{type(error).__name__}, then {bug!r} judging it")
            return None

    def _judge(self, error: BaseException, *, final: bool = False) -> float | None:
        lines = str(error).strip().splitlines()
        code = refusal_code(error)
        if code is not None:
            reason = f"refused ({code}): {lines[0]}" if lines else f"refused ({code})"
        else:
            reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        if final or not self.transient(error):
            self._clean_up(error)
            if code is not None:
                log.error("%s stopped: %s", self.name, reason, extra=_FINAL)
            else:
                log.error("%s failed and stopped: %s", self.name, reason, exc_info=error,
                          extra=_FINAL)  # fmt: skip
            self.move(ServiceState.FAILED, reason)
            return None
        self._attempt += 1
        limit = self.policy.max_restarts
        if limit is not None and self._attempt > limit:
            self._clean_up(error)
            log.error("%s failed %d times in a row and stopped: %s", self.name, limit, reason,
                      extra=_FINAL)  # fmt: skip
            self.move(ServiceState.FAILED, f"gave up after {limit} restarts: {reason}")
            return None
        delay = self.policy.delay(self._attempt)
        log.warning("%s: %s; restarting in %.2fs", self.name, reason, delay)
        # Said first: cleaning up may take a while (connections to a server that is away).
        self.move(ServiceState.RETRYING, reason)
        self._clean_up(error)
        return delay

    def _clean_up(self, error: BaseException) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(error)
            except Exception:  # cleaning up after a failure must not hide the failure
                log.warning("%s: cleaning up after a failure failed", self.name, exc_info=True)


class Refused(Exception):
    """A service's refusal to go on that its operator must fix (a projection version owned
    by another writer, new to a group already started): ``code`` names the rule, the message
    says what to do. Opt-in by subclassing: a domain refusal raised inside a service body
    (a conflict that outlasted its retries, a command the code built wrong) is not the
    operator's doing, and keeps its traceback like any other failure."""

    code: str = "refused"


def refusal_code(error: BaseException) -> str | None:
    """The code of a ``Refused``, or ``permission_denied`` for a database that refused a
    statement for the role's privileges (a missing grant, a read-only session): the
    operator's to fix, like a refusal, not a bug whose traceback would help; None for
    anything else."""
    if isinstance(error, Refused):
        return error.code
    return "permission_denied" if denied(error) else None


class SupervisedThread:
    """A service whose body runs in a thread of its own (see the module docstring)."""

    def __init__(
        self,
        name: str,
        body: Callable[[Stopping], None],
        *,
        policy: RestartPolicy | None = None,
        transient: Callable[[BaseException], bool] = is_transient,
        on_failure: Callable[[BaseException], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._body = body
        self._on_stop = on_stop
        self.supervisor = Supervisor(name, policy or RestartPolicy(), transient, on_failure)
        self.stopping = Stopping()
        self._thread: threading.Thread | None = None
        self._started_in = os.getpid()

    def start(self) -> None:
        if self.stopping:
            # Its thread has ended (or is ending) and ``Stopping`` stays set: a start now
            # would run nothing, and say nothing, while its caller believes it runs.
            msg = f"{self.name} was stopped; a stopped service cannot start again: make a new one"
            raise RuntimeError(msg)
        if self._thread is not None:
            return
        self.supervisor.move(ServiceState.RUNNING)
        self._started_in = os.getpid()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Ask the body to finish what it has in hand, and wait up to ``timeout`` seconds."""
        self.supervisor.move(ServiceState.STOPPING, self.supervisor.health().error)
        self.stopping.set()
        if self._on_stop is not None:
            self._on_stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s did not stop within %ss", self.name, timeout,
                            extra={SUBJECT: self.name})  # fmt: skip
                return
        self.supervisor.move(ServiceState.STOPPED)

    def health(self) -> Health:
        health = self.supervisor.health()
        if (
            self._thread is not None
            and self._started_in != os.getpid()
            and health.state in (ServiceState.RUNNING, ServiceState.RETRYING, ServiceState.STOPPING)
        ):
            # A child forked after the start: the thread is the parent's, and the copy of
            # its state would say it runs here.
            return replace(
                health,
                state=ServiceState.FAILED,
                error=f"{self.name} runs in process {self._started_in}, which forked this one",
            )
        return health

    def join(self, timeout: float | None = None) -> None:
        """Wait until the service's thread has ended (stopped or failed)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> Health:
        """Run the body under supervision in the calling thread (a process's main service,
        whose signal handlers call ``stop``); returns the final health."""
        self.supervisor.move(ServiceState.RUNNING)
        self._run()
        return self.health()

    def _run(self) -> None:
        supervisor = self.supervisor
        while not self.stopping:
            started = time.monotonic()
            try:
                self._body(self.stopping)
            except BaseException as error:  # judged: retried, or recorded as FAILED
                supervisor.ran(started)
                if self.stopping and supervisor.cut_off_while_stopping(error):
                    break
                delay = supervisor.judge(error)
                if delay is None:
                    return
                if self.stopping.wait(delay):
                    break
                continue  # RETRYING until the body says work went through
            break
        supervisor.move(ServiceState.STOPPED)


class SupervisedTask:
    """A service whose body is a coroutine on the running event loop."""

    def __init__(
        self,
        name: str,
        body: Callable[[Stopping], Awaitable[None]],
        *,
        policy: RestartPolicy | None = None,
        transient: Callable[[BaseException], bool] = is_transient,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self._body = body
        self.supervisor = Supervisor(name, policy or RestartPolicy(), transient, on_failure)
        self.stopping = Stopping()
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Run the body under supervision until ``stop`` (or a failure that is not transient)."""
        supervisor = self.supervisor
        supervisor.move(ServiceState.RUNNING)
        try:
            await self._supervise()
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            # Ended from outside (cancelled, in its body or its backoff; the process
            # stopping): it runs no more, and its health and ``daybook_service_up`` must
            # not say it does.
            supervisor.move(ServiceState.STOPPED)
            raise

    async def _supervise(self) -> None:
        supervisor = self.supervisor
        while not self.stopping:
            started = time.monotonic()
            try:
                await self._body(self.stopping)
            except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # judged: retried, or recorded as FAILED
                supervisor.ran(started)
                if self.stopping and supervisor.cut_off_while_stopping(error):
                    break
                delay = supervisor.judge(error)
                if not isinstance(error, Exception):
                    raise  # FAILED by then (``judge``), raised on as asyncio would have it
                if delay is None:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                if self.stopping:
                    break
                continue  # RETRYING until the body says work went through
            break
        supervisor.move(ServiceState.STOPPED)

    def stop(self) -> None:
        """Ask the body to finish (call on the loop's thread)."""
        self.supervisor.move(ServiceState.STOPPING, self.supervisor.health().error)
        self.stopping.set()
        self._wake.set()

    def health(self) -> Health:
        return self.supervisor.health()
