"""Supervised services: transient failures restart with backoff, others stop visibly."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
from typing import Any

import pytest

from daybook.domain.accounts import InsufficientFunds
from daybook.infrastructure.lifecycle import (
    Health,
    Refused,
    RestartPolicy,
    ServiceState,
    Stopping,
    SupervisedTask,
    SupervisedThread,
)
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.observability.logs import RateLimit

QUICK = RestartPolicy(initial=0.001, ceiling=0.002)


class Flaky:
    """A body that fails ``failures`` times with ``error``, then works until stopped (and
    says so to its ``service``'s supervisor, as every body does)."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.runs = 0
        self.working = threading.Event()
        self.service: SupervisedThread | None = None

    def __call__(self, stopping: Stopping) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise self.error
        if self.service is not None:
            self.service.supervisor.recovered()
        self.working.set()
        stopping.wait()


def test_every_state_moves_only_as_its_transitions_allow() -> None:
    moves = {(a, b) for a in ServiceState for b in ServiceState if a is not b and a.can_become(b)}
    assert (ServiceState.CREATED, ServiceState.RUNNING) in moves
    assert (ServiceState.RUNNING, ServiceState.RETRYING) in moves
    assert (ServiceState.RETRYING, ServiceState.RUNNING) in moves
    assert not any(a in (ServiceState.STOPPED, ServiceState.FAILED) for a, _ in moves)
    assert (ServiceState.CREATED, ServiceState.FAILED) not in moves


def test_a_transient_failure_restarts_the_body_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = Flaky(3, ConnectionRefusedError("the store is down"))
    service = body.service = SupervisedThread("flaky", body, policy=QUICK)
    with caplog.at_level(logging.WARNING, logger="daybook.services"):
        service.start()
        assert body.working.wait(30)
        health = service.health()
        # Three failed attempts, one recovery: restarts counts recoveries, not attempts.
        assert health.state is ServiceState.RUNNING and health.restarts == 1
        assert health.error is None
        service.stop()
    assert service.health().state is ServiceState.STOPPED
    assert body.runs == 4
    assert sum("the store is down" in r.getMessage() for r in caplog.records) == 3


def test_any_other_failure_stops_the_service_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = Flaky(1, ValueError("a bug"))
    service = SupervisedThread("buggy", body, policy=QUICK)
    with caplog.at_level(logging.ERROR, logger="daybook.services"):
        service.start()
        service.join(30)
    health = service.health()
    assert health.state is ServiceState.FAILED and health.error == "ValueError: a bug"
    assert not health.ok and body.runs == 1
    assert any("buggy failed and stopped" in r.getMessage() for r in caplog.records)


def test_a_refusal_stops_the_service_with_its_code_in_one_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refusal is the operator's to fix: its code and message, not a traceback, which
    is for bugs (above)."""

    class Owned(Refused):
        code = "not_owner"

    body = Flaky(1, Owned("projection p v1 is owned by runner: hand it over first"))
    service = SupervisedThread("refused", body, policy=QUICK)
    with caplog.at_level(logging.ERROR, logger="daybook.services"):
        service.start()
        service.join(30)
    health = service.health()
    assert health.state is ServiceState.FAILED and body.runs == 1
    assert (
        health.error
        == "refused (not_owner): projection p v1 is owned by runner: hand it over first"
    )
    [record] = [r for r in caplog.records if r.name == "daybook.services"]
    assert record.getMessage() == f"refused stopped: {health.error}"
    assert record.exc_info is None


def test_a_domain_refusal_inside_a_service_is_a_failure_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A domain error raised by a service's own work (a conflict that outlasted its
    retries, a command built wrong) is not the operator's mistake: it keeps its traceback."""
    body = Flaky(1, InsufficientFunds("account a has 5 EUR available, not 7"))
    service = SupervisedThread("worker", body, policy=QUICK)
    with caplog.at_level(logging.ERROR, logger="daybook.services"):
        service.start()
        service.join(30)
    health = service.health()
    assert health.state is ServiceState.FAILED
    assert health.error == "InsufficientFunds: account a has 5 EUR available, not 7"
    [record] = [r for r in caplog.records if r.name == "daybook.services"]
    assert record.exc_info is not None


def test_a_failure_after_too_many_restarts_stops_the_service() -> None:
    body = Flaky(10, TimeoutError("no answer"))
    service = SupervisedThread(
        "hopeless", body, policy=RestartPolicy(initial=0.001, ceiling=0.001, max_restarts=2)
    )
    service.start()
    service.join(30)
    assert service.health().state is ServiceState.FAILED
    assert "gave up after 2 restarts" in (service.health().error or "")
    assert body.runs == 3


def test_cleanup_runs_after_each_failed_run() -> None:
    cleaned: list[str] = []
    body = Flaky(2, OSError("lost"))
    service = SupervisedThread(
        "cleaned", body, policy=QUICK, on_failure=lambda error: cleaned.append(str(error))
    )
    service.start()
    assert body.working.wait(30)
    service.stop()
    assert cleaned == ["lost", "lost"]


def test_backoff_grows_to_its_ceiling_with_full_jitter() -> None:
    policy = RestartPolicy(initial=0.1, ceiling=1.0)
    highest = [policy.delay(n, draw=lambda low, high: high) for n in range(1, 7)]
    assert highest == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(policy.delay(n, draw=lambda low, high: low) == 0.0 for n in range(1, 7))


def test_backoff_stays_at_its_ceiling_however_long_the_outage() -> None:
    """The 1,025th restart in a row (some 40 minutes of outage at the default policy) once
    overflowed a float computing its delay, and ended the service's thread."""
    policy = RestartPolicy(initial=0.1, ceiling=5.0)
    assert policy.delay(1_025, draw=lambda low, high: high) == 5.0
    assert policy.delay(10**9, draw=lambda low, high: high) == 5.0


def test_a_failure_to_judge_a_failure_fails_the_service_visibly() -> None:
    """Whatever goes wrong while a failure is judged, the service ends FAILED with a
    reason: never a dead thread whose health still says it runs."""

    class Broken(RestartPolicy):
        def delay(self, attempt: int, draw: Any = None) -> float:
            raise OverflowError("int too large to convert to float")

    service = SupervisedThread("misjudged", Flaky(5, ConnectionResetError("lost")), policy=Broken())
    service.start()
    service.join(30)
    health = service.health()
    assert health.state is ServiceState.FAILED and not health.ok
    assert health.error is not None and "OverflowError" in health.error


def test_a_second_service_that_fails_for_good_is_logged() -> None:
    """Each service's final line (``"%s failed and stopped: %s"``) was rate-limited by its
    template alone: a second service failing within 30 s of the first was held back, and,
    as it never repeats, never written. A line saying a service stopped for good is always
    written."""

    def broken(stopping: Stopping) -> None:
        raise ValueError("the read-model schema is not what this code expects")

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RateLimit(interval=3600))
    logger = logging.getLogger("daybook.services")
    logger.addHandler(handler)
    services = [SupervisedThread(name, broken) for name in ("expiry sweeper", "projections")]
    try:
        for service in services:
            service.start()
            service.join(30)
    finally:
        logger.removeHandler(handler)
    assert [s.health().state for s in services] == [ServiceState.FAILED] * 2
    lines = stream.getvalue().splitlines()
    for name in ("expiry sweeper", "projections"):
        assert any(line.startswith(f"{name} failed and stopped: ") for line in lines), lines


def test_run_in_the_calling_thread_returns_the_final_health() -> None:
    service = SupervisedThread("foreground", Flaky(1, KeyError("k")), policy=QUICK)
    assert service.run().state is ServiceState.FAILED


def test_an_asyncio_service_restarts_on_transient_failures_and_stops_on_others() -> None:
    """Retrying (not running) through its attempts until work goes through, as a thread's."""

    async def scenario() -> tuple[Health, Health, ServiceState, str | None]:
        runs = 0
        connected = asyncio.Event()

        async def flaky(stopping: Stopping) -> None:
            nonlocal runs
            runs += 1
            if runs <= 2:
                raise ConnectionResetError("broker gone")
            await connected.wait()
            service.supervisor.recovered()
            while not stopping:
                await asyncio.sleep(0.001)

        service = SupervisedTask("async flaky", flaky, policy=QUICK)
        task = asyncio.create_task(service.run())
        while runs < 3:
            await asyncio.sleep(0.001)
        attempting = service.health()
        connected.set()
        while service.health().state is not ServiceState.RUNNING:
            await asyncio.sleep(0.001)
        running = service.health()
        service.stop()
        await task

        async def buggy(stopping: Stopping) -> None:
            raise RuntimeError("bad state")

        failing = SupervisedTask("async buggy", buggy, policy=QUICK)
        await failing.run()
        return attempting, running, failing.health().state, failing.health().error

    attempting, running, failed, reason = asyncio.run(scenario())
    assert (attempting.state, attempting.restarts) == (ServiceState.RETRYING, 0)
    assert (running.state, running.restarts) == (ServiceState.RUNNING, 1)
    assert failed is ServiceState.FAILED and reason == "RuntimeError: bad state"


def test_a_service_logs_its_start_recovery_and_stop_and_shows_in_the_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from daybook.infrastructure.observability import metrics

    body = Flaky(1, ConnectionResetError("lost"))
    service = body.service = SupervisedThread("logged service", body, policy=QUICK)
    with caplog.at_level(logging.INFO, logger="daybook.services"):
        service.start()
        assert body.working.wait(30)
        assert (
            metrics.REGISTRY.get_sample_value("daybook_service_up", {"service": "logged service"})
            == 1
        )
        service.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert "logged service: started" in lines
    assert "logged service: recovered (restart 1)" in lines
    assert "logged service: stopped" in lines
    assert (
        metrics.REGISTRY.get_sample_value(
            "daybook_service_restarts_total", {"service": "logged service"}
        )
        == 1
    )
    assert (
        metrics.REGISTRY.get_sample_value("daybook_service_up", {"service": "logged service"}) == 0
    )


class Reconnecting:
    """A body that fails ``failures`` times, then on its next run connects until
    ``connected`` is set (a connect that may well time out again), and only then gets a
    unit of work through and says so."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0
        self.connecting = threading.Event()
        self.connected = threading.Event()
        self.service: SupervisedThread | None = None

    def __call__(self, stopping: Stopping) -> None:
        assert self.service is not None
        self.runs += 1
        if self.runs <= self.failures:
            raise ConnectionRefusedError("the store is down")
        self.connecting.set()
        self.connected.wait(30)
        self.service.supervisor.recovered()
        stopping.wait()


def test_a_restart_is_no_recovery_until_the_body_gets_work_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Between an outage's attempts, health said ``running`` (and /health ok), and every
    attempt was logged as a recovery and counted as a restart. A service that confirms
    its recoveries stays ``retrying``, with the reason, until its body gets work through."""
    body = Reconnecting(3)
    service = SupervisedThread("confirming", body, policy=QUICK)
    body.service = service
    with caplog.at_level(logging.INFO, logger="daybook.services"):
        service.start()
        assert body.connecting.wait(30)
        attempting = service.health()
        body.connected.set()
        deadline = time.monotonic() + 30
        while service.health().state is not ServiceState.RUNNING:
            assert time.monotonic() < deadline, service.health()
            time.sleep(0.001)
        recovered = service.health()
        service.stop()
    assert attempting.state is ServiceState.RETRYING and not attempting.ok
    assert attempting.restarts == 0
    assert attempting.error == "ConnectionRefusedError: the store is down"
    assert recovered.restarts == 1 and recovered.error is None
    said = [r.getMessage() for r in caplog.records]
    assert said.count("confirming: recovered (restart 1)") == 1
    assert not any("restart 2" in line for line in said), said


def test_recovered_moves_only_a_retrying_service() -> None:
    """A caller's own step (``run_until_caught_up`` on a runner never started) must not
    log the service as started."""
    service = SupervisedThread("idle", Flaky(0, OSError("x")))
    service.supervisor.recovered()
    assert service.health().state is ServiceState.CREATED


def _up(name: str) -> float:
    return metrics.SERVICE_UP.labels(name)._value.get()


def test_a_cancelled_asyncio_service_does_not_say_it_runs() -> None:
    """``task.cancel()`` (an ``asyncio.timeout``, a ``TaskGroup`` whose sibling failed, a
    caller's shutdown) ends the relay's task: its health and ``daybook_service_up`` must
    not go on saying it runs."""

    async def scenario() -> ServiceState:
        async def body(stopping: Stopping) -> None:
            await asyncio.sleep(3600)

        service = SupervisedTask("cancelled task", body)
        task = asyncio.create_task(service.run())
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return service.health().state

    state = asyncio.run(scenario())
    assert state is not ServiceState.RUNNING, "the task ended, its health says running"
    assert _up("cancelled task") == 0


@pytest.mark.parametrize("transient", [False, True], ids=["as-is", "transient-says-yes"])
def test_an_asyncio_service_whose_body_raises_a_base_exception_fails_visibly(
    transient: bool,
) -> None:
    """Raised on, as asyncio has it, so FAILED whatever the service's ``transient`` says
    (one that said yes left the dead task saying it retried)."""

    class Aborted(BaseException):
        pass

    async def scenario() -> ServiceState:
        async def body(stopping: Stopping) -> None:
            raise Aborted("gone")

        service = SupervisedTask("aborted task", body, transient=lambda _: transient)
        with contextlib.suppress(Aborted):
            await service.run()
        return service.health().state

    assert asyncio.run(scenario()) is ServiceState.FAILED
    assert _up("aborted task") == 0


def test_an_asyncio_service_cancelled_in_its_backoff_does_not_say_it_retries() -> None:
    async def scenario() -> ServiceState:
        async def body(stopping: Stopping) -> None:
            raise ConnectionResetError("broker gone")

        service = SupervisedTask(
            "cancelled in backoff", body, policy=RestartPolicy(initial=60, ceiling=60)
        )
        service.supervisor.policy = RestartPolicy(initial=60, ceiling=60)
        task = asyncio.create_task(service.run())
        while service.health().state is not ServiceState.RETRYING:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return service.health().state

    assert asyncio.run(scenario()) is ServiceState.STOPPED
    assert _up("cancelled in backoff") == 0


def test_start_after_stop_is_refused_with_a_reason() -> None:
    """``start()`` after ``stop()`` ran nothing and said nothing: its caller
    (``sweeper.start()``, ``runner.start()``, ``ledger.request_purge.start()``) was left
    believing the service ran. A second ``start()`` of a running service is still nothing."""
    runs = threading.Semaphore(0)

    def body(stopping: Stopping) -> None:
        runs.release()
        stopping.wait()

    service = SupervisedThread("restarted thread", body)
    service.start()
    assert runs.acquire(timeout=5)
    service.start()  # running: nothing more
    service.stop()
    with pytest.raises(RuntimeError, match="a stopped service cannot start again"):
        service.start()


def test_an_outage_met_while_stopping_ends_the_service_without_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A body cut off by an outage after its stop was asked (the database gone during a
    deploy's stop) logged "restarting in 0.09s" after the stop, then stopped: a line about a
    restart that was never going to happen. It stops, saying what the body met."""
    started = threading.Event()

    def body(stopping: Stopping) -> None:
        started.set()
        stopping.wait()
        raise ConnectionRefusedError("the store is down")

    service = SupervisedThread("stopping", body, policy=QUICK)
    with caplog.at_level(logging.INFO, logger="daybook.services"):
        service.start()
        assert started.wait(30)
        service.stop()
    assert service.health().state is ServiceState.STOPPED
    said = [r.getMessage() for r in caplog.records]
    assert not [line for line in said if "restarting" in line], said
    assert any("the store is down" in line for line in said), said
