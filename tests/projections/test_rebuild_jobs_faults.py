"""``rebuild --jobs`` under faults: a process dying while it holds the report channel's lock, an
interrupt while the processes start, and the code a killed process is reported with."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any

import pytest

from daybook import open_ledger, projections
from daybook.infrastructure.readmodels import rebuild_jobs
from daybook.infrastructure.readmodels.rebuild import RebuildError
from tests.projections import jobs_children
from tests.projections.helpers import ctrl_c_handled, workload


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        workload(ledger, 60)
        yield ledger


def test_a_process_dying_with_the_report_lock_held_does_not_hang_the_command(
    sqlite_ledger: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Share 0 dies holding the lock every process writes its reports under: share 1's
    last report can never be written, and it can never exit (its queue's feeder waits for
    the lock). The command must still end, naming the dead process."""
    monkeypatch.setattr(rebuild_jobs, "_rebuild_share", jobs_children.dies_holding_the_write_lock)
    monkeypatch.setenv("DAYBOOK_TEST_MARK", str(tmp_path / "held"))
    ledger = sqlite_ledger
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(every_projection_in_two(ledger))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)  # a hang detector, not a measure: the build takes a second or two
    hung = thread.is_alive()
    if hung:  # free the command: stop what it waits for
        for child in multiprocessing.active_children():
            child.kill()
        thread.join(60)
    assert not hung, "the command waits forever for a process that cannot report"
    (error,) = outcome
    assert isinstance(error, rebuild_jobs.RebuildJobFailed), error
    assert "ended (exit code -9)" in str(error)


def every_projection_in_two(ledger: Any) -> Any:
    """``rebuild_in_processes`` of every projection, in two processes, with no bar."""
    return rebuild_jobs.rebuild_in_processes(
        ledger.settings,
        ledger.settings.url,
        projections.ALL,
        jobs=2,
        log=ledger_log(ledger),
        progress=False,
    )


def ledger_log(ledger: Any) -> Any:
    from daybook.infrastructure.bootstrap import event_log_of

    return event_log_of(ledger)


def test_ctrl_c_while_the_processes_start_is_an_interrupt_not_a_traceback(
    sqlite_ledger: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = jobs_children.StartInterrupted()
    monkeypatch.setattr(rebuild_jobs.multiprocessing, "get_context", lambda _: context)
    with pytest.raises(KeyboardInterrupt):
        every_projection_in_two(sqlite_ledger)
    assert not multiprocessing.active_children()


def test_a_killed_process_is_not_reported_as_a_refusal(
    sqlite_ledger: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refusal (rebuild_refused) says the command may not build; a process killed midway is
    a failure whose fix is to run the command again: another code."""
    from daybook.infrastructure.cli import main

    monkeypatch.setattr(rebuild_jobs, "_rebuild_share", jobs_children.killed_at_once)
    url = sqlite_ledger.settings.url
    code = main(["projections", "rebuild", "--all", "--jobs", "2", "--no-progress", "--url", url])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "ended (exit code -9)" in err, err
    assert "refused" not in err and "failed (rebuild_failed)" in err, err
    assert isinstance(rebuild_jobs.RebuildJobFailed("x"), RebuildError)


def test_ctrl_c_received_by_another_thread_ends_the_wait(
    sqlite_ledger: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A signal sent to the process is taken by any of its threads (the connection pool's
    among them); Python runs its handler in the main thread, once that thread runs Python
    again. The command waited for its processes' reports with no timeout, so a Ctrl-C that
    another thread took, while the processes were busy, was not seen until a report came
    (never, with them stopped: a CI run hung there)."""
    import signal
    import time

    marker = tmp_path / "bulk.before_commit.paused"
    monkeypatch.setenv("DAYBOOK_FAULTS", "bulk.before_commit:1:pause")  # in the new processes
    monkeypatch.setenv("DAYBOOK_FAULTS_DIR", str(tmp_path))
    released: list[bool] = []

    def interrupt_from_here() -> None:
        while not marker.exists():
            time.sleep(0.02)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # this thread takes it
        # A hang detector, not a measure: with the wait unbounded the main thread sleeps
        # until a report comes, so let the processes go on (their reports wake it).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not outcome:
            time.sleep(0.05)
        if not outcome:
            released.append(True)
            while not outcome:
                marker.unlink(missing_ok=True)
                time.sleep(0.05)

    outcome: list[BaseException] = []
    helper = threading.Thread(target=interrupt_from_here, daemon=True)
    helper.start()
    ledger = sqlite_ledger
    try:
        with ctrl_c_handled():
            every_projection_in_two(ledger)
    except KeyboardInterrupt as interrupted:
        outcome.append(interrupted)
    else:
        outcome.append(AssertionError("not interrupted"))
    helper.join(60)
    marker.unlink(missing_ok=True)
    assert isinstance(outcome[0], KeyboardInterrupt), outcome
    assert not released, "the Ctrl-C was seen only once a process reported"
    assert not multiprocessing.active_children()
