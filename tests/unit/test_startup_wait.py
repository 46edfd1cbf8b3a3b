"""A service started while something it needs is down waits for it (``wait_until_usable``):
what it waits for, what it says, and when it gives up. A fake clock: no test sleeps."""

from __future__ import annotations

import io
import logging
import types
from collections.abc import Callable

import psycopg
import pytest

from daybook.infrastructure import preflight
from daybook.infrastructure.observability.logs import configure_logging
from daybook.infrastructure.preflight import Unusable, wait_until_usable
from daybook.infrastructure.streaming import app as worker_app

LOG = logging.getLogger("test.startup")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.pauses.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def failing(refusals: list[Unusable], result: str = "settings") -> Callable[[], str]:
    """A check that raises each of ``refusals`` in turn, then passes."""
    left = list(refusals)

    def check() -> str:
        if left:
            raise left.pop(0)
        return result

    return check


DOWN = Unusable("the event store at postgresql://u@db:5432/x: connection refused", transient=True)


def wait(check: Callable[[], str], clock: Clock, limit: float | None) -> str:
    return wait_until_usable(check, limit=limit, log=LOG, sleep=clock.sleep, clock=clock)


def test_a_server_that_comes_back_is_waited_for_saying_so_at_the_start_and_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    with caplog.at_level(logging.WARNING, LOG.name):
        assert wait(failing([DOWN] * 8), clock, None) == "settings"
    assert clock.pauses == [0.5, 1, 2, 4, 5, 5, 5, 5]  # growing, to at most MAX_PAUSE
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("waiting at start: the event store at postgresql://u@db:5432/x")
    assert "--startup-wait" in lines[0]
    # 27.5 s of waiting: no summary yet (one every SAY_EVERY seconds), and one line at the end.
    assert len(lines) == 2 and "answers now, after 27.5 s" in lines[1]


def test_a_long_wait_says_so_every_thirty_seconds_and_when_the_reason_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    starting = Unusable("the event store: the database system is starting up", transient=True)
    with caplog.at_level(logging.WARNING, LOG.name):
        wait(failing([DOWN] * 20 + [starting]), clock, None)
    lines = [r.getMessage() for r in caplog.records]
    summaries = [line for line in lines if "still waiting at start" in line]
    assert len(summaries) == 3, lines  # at 32.5 s and 62.5 s, and when it starts up
    assert "starting up" in summaries[-1] and "starting up" not in summaries[-2]
    assert len(lines) == 5


def test_a_refusal_no_wait_cures_ends_the_service_at_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    wrong = Unusable("the event store: authentication failed (check the user name and password)")
    with pytest.raises(Unusable) as refused, caplog.at_level(logging.WARNING, LOG.name):
        wait(failing([DOWN, wrong]), clock, None)
    assert refused.value is wrong
    assert clock.pauses == [0.5]
    assert not [r for r in caplog.records if "answers now" in r.getMessage()]


def test_a_limit_of_zero_fails_at_once_with_the_refusal_as_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    with pytest.raises(Unusable) as refused, caplog.at_level(logging.WARNING, LOG.name):
        wait(failing([DOWN]), clock, 0)
    assert refused.value is DOWN
    assert clock.pauses == [] and caplog.records == []


def test_a_limit_gives_up_when_it_has_passed_never_sleeping_beyond_it() -> None:
    clock = Clock()
    with pytest.raises(Unusable) as refused:
        wait(failing([DOWN] * 100), clock, 10)
    assert clock.now == 10 and clock.pauses == [0.5, 1, 2, 4, 2.5]
    assert str(refused.value).startswith(str(DOWN))
    assert "gave up after 10.0 s: the startup wait is 10 s" in str(refused.value)
    assert refused.value.transient is False  # giving up is final


_AT = 'connection to server at "10.0.0.5", port 5432 failed: '
_REFUSED = "Connection refused\n\tIs the server running on that host and accepting TCP/IP"


def _several(*failures: str) -> str:
    """psycopg's text for a host whose addresses (``localhost``: ::1, 127.0.0.1) were each
    tried and each failed."""
    attempts = "".join(
        f"\n- host: 'localhost', port: '5432', hostaddr: '{address}': connection failed: "
        f'connection to server at "{address}", port 5432 failed: {failure}'
        for address, failure in zip(("::1", "127.0.0.1"), failures, strict=True)
    )
    several = "\nMultiple connection attempts failed. All failures were:"
    return f"connection failed: {_AT}{failures[-1]}{several}{attempts}"


@pytest.mark.parametrize(
    ("message", "waits"),
    [
        (_AT + "Connection refused\n\tIs the server running on that host and accepting", True),
        (_AT + "timeout expired", True),
        (_AT + "FATAL:  the database system is starting up", True),
        (_AT + "FATAL:  sorry, too many clients already", True),
        ("failed to resolve host 'db': [Errno -2] Name or service not known", True),
        ("failed to resolve host 'db': [Errno -3] Try again", True),  # musl's words
        (_AT + "FATAL:  could not fork new process for connection: Resource temporarily", True),
        (_several(_REFUSED, _REFUSED), True),
        (_several(_REFUSED, "fe_sendauth: no password supplied"), False),
        (_several("server does not support SSL, but SSL was required", _REFUSED), False),
        (
            'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: No such '
            "file or directory\n\tIs the server running locally and accepting connections",
            True,
        ),
        (_AT + 'FATAL:  password authentication failed for user "app"', False),
        (_AT + "fe_sendauth: no password supplied", False),
        (_AT + "server does not support SSL, but SSL was required", False),
        (_AT + 'FATAL:  pg_hba.conf rejects connection for host "10.0.0.9"', False),
        (_AT + 'FATAL:  Ident authentication failed for user "app"', False),
        ('could not read root certificate file "/etc/ca.pem": No such file or directory', False),
    ],
)
def test_at_start_only_a_server_down_starting_full_or_out_of_reach_is_waited_for(
    message: str, waits: bool
) -> None:
    """A running service retries more than this (``is_transient``): a refusal of this
    client's settings, met at start, is a mistake to fix, not an outage to wait out."""
    assert preflight.curable_by_waiting(psycopg.OperationalError(message)) is waits


def test_every_change_of_reason_reaches_the_log_past_its_rate_limit() -> None:
    """The service's log holds back repeats of a line for 30 s, one line per reason: a
    database crash-looping (refused, starting up, refused) says both."""
    stream = io.StringIO()
    configure_logging("console", logging.INFO, stream)
    starting = Unusable("the event store: the database system is starting up", transient=True)
    clock = Clock()
    wait_until_usable(
        failing([DOWN, starting, DOWN]),
        limit=None,
        log=logging.getLogger("daybook.startup"),
        sleep=clock.sleep,
        clock=clock,
    )
    lines = stream.getvalue().splitlines()
    said = [line for line in lines if "still waiting at start" in line]
    assert len(said) == 2, lines
    assert "starting up" in said[0] and "connection refused" in said[1]


def test_time_already_spent_counts_against_the_limit() -> None:
    """A worker started again in place has spent part of its startup wait before: it gives
    up when the whole wait has passed, and says how long that was."""
    clock = Clock()
    with pytest.raises(Unusable) as refused:
        wait_until_usable(
            failing([DOWN] * 100), limit=10, log=LOG, waited=7, sleep=clock.sleep, clock=clock
        )
    assert clock.now == 3 and clock.pauses == [0.5, 1, 1.5]
    assert "gave up after 10.0 s: the startup wait is 10 s" in str(refused.value)


class _Restarted(Exception):
    """The worker would exec itself again here."""


class _Clocks:
    """The host's wall clock and its monotonic one; ``step`` moves the wall clock alone (NTP),
    ``elapse`` both (real time passing)."""

    def __init__(self) -> None:
        self.wall = 2_000_000_000.0
        self.mono = 5_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.elapse(seconds)

    def elapse(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_a_worker_whose_starts_keep_failing_stops_after_its_startup_wait_whatever_ntp_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker whose starts the broker keeps failing is started again in place until its
    startup wait (here 60 s) has passed since the first failed start. That interval was
    measured on the wall clock (the first failure's ``time.time()`` carried across the exec):
    NTP stepping the host's clock back an hour made the worker go on restarting for an hour
    more, and a step forward ended a wait it had not spent. The monotonic clock survives an
    exec, and no step moves it."""
    clocks = _Clocks()
    fake_time = types.SimpleNamespace(
        time=clocks.time, monotonic=clocks.monotonic, sleep=clocks.sleep
    )
    monkeypatch.setattr(worker_app, "time", fake_time)
    monkeypatch.setattr(
        worker_app,
        "faust_compat",
        types.SimpleNamespace(
            start_failure=lambda worker: ConnectionError("broker gone"),
            stop_requested=lambda worker: False,
        ),
    )
    monkeypatch.setattr(worker_app, "_broker_failed", lambda error: True)
    monkeypatch.setattr(
        worker_app,
        "signal",
        types.SimpleNamespace(signal=lambda *_: None, SIGTERM=15, SIGINT=2),
    )

    def restart(app: object, reason: str) -> None:
        raise _Restarted(reason)

    monkeypatch.setattr(worker_app, "restart", restart)
    # Set, then taken away: whatever the worker sets is taken away after the test too.
    monkeypatch.setenv(worker_app._STARTS_VARIABLE, "")
    monkeypatch.delenv(worker_app._STARTS_VARIABLE)

    # The first failed start: the worker is started again in place.
    with pytest.raises(_Restarted):
        worker_app._again_if_the_broker_went(None, None, worker_app._FailedStarts(), 60.0)
    # 90 s of real time later (more than the 60 s wait), just after NTP stepped the wall
    # clock back an hour, the next start fails too: the wait is over, and it stops.
    clocks.elapse(90)
    clocks.wall -= 3600
    before = worker_app._FailedStarts.in_environment()
    assert worker_app.waited_at_start() >= 90
    try:
        worker_app._again_if_the_broker_went(None, None, before, 60.0)
    except _Restarted:
        pytest.fail("restarted in place 90 s into a 60 s startup wait (the wall clock stepped)")
