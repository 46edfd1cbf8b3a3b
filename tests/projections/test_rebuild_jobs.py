"""``daybook projections rebuild --all --jobs N``: several projections rebuilt in one pass, or
spread over processes; the tables equal a replay of the log, a process killed mid-build is
reported and resumed by the next run, and stopping the command stops its processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psycopg
import pytest

from daybook import Ledger, open_ledger, projections
from daybook.infrastructure.readmodels.catalog import VersionState
from daybook.infrastructure.readmodels.rebuild_jobs import shares
from scripts.bench_projections import write_log
from tests.projections.helpers import (
    assert_tables_match,
    ctrl_c_handled,
    version_record,
    workload,
)

pytestmark = pytest.mark.postgres

#: Log events in the kill tests' log, and per batch: each process commits a few dozen times.
EVENTS, BATCH = 20_000, 500


def daybook(*args: str, **options: object) -> subprocess.Popen[str]:
    """The command, started in a session of its own (its processes are found by it), its
    output to files: read once it has exited, whatever else may still hold them."""
    out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by _output)
    err = tempfile.TemporaryFile("w+")  # noqa: SIM115
    with ctrl_c_handled():
        process = subprocess.Popen(
            [sys.executable, "-m", "daybook.infrastructure.cli", *args],
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
            **options,  # type: ignore[call-overload]
        )
    OUTPUT[process.pid] = (out, err)
    return process


#: Each command's output files, by pid.
OUTPUT: dict[int, tuple[IO[str], IO[str]]] = {}


def finished(process: subprocess.Popen[str], marker: Path | None = None) -> tuple[int, str, str]:
    """The command's exit code and output, once it and every process it started have ended;
    ``marker``: a fault point's pause file, removed whenever a process stops there (each
    process of the command passes it once)."""
    deadline = time.monotonic() + 240
    while process.poll() is None:
        if marker is not None:
            marker.unlink(missing_ok=True)
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"the command did not end: {_output(process)}")
        time.sleep(0.05)
    left = left_running(process.pid)
    assert not left, f"the command's processes still run after it ended: {left}"
    return (process.returncode, *_output(process))


def _output(process: subprocess.Popen[str]) -> tuple[str, str]:
    texts = []
    for file in OUTPUT.pop(process.pid):
        file.seek(0)
        texts.append(file.read())
        file.close()
    return texts[0], texts[1]


def left_running(session: int, seconds: float = 60) -> str:
    """The processes of ``session`` still running (not yet ended) after up to ``seconds``:
    ``ps`` lines, empty if none."""
    deadline = time.monotonic() + seconds
    while True:
        listed = subprocess.run(
            ["ps", "-o", "pid=,stat=,args=", "-s", str(session)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        running = [line for line in listed.splitlines() if line.split()[1:2] != ["Z"]]
        if not running or time.monotonic() > deadline:
            return "\n".join(running)
        time.sleep(0.1)


def states(url: str) -> dict[str, VersionState | None]:
    """Each projection's code version's state; None if not registered (or no catalog)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT to_regclass('daybook_projection_versions')").fetchone()
    if row is None or row[0] is None:
        return {projection.name: None for projection in projections.ALL}
    found = {}
    for projection in projections.ALL:
        record = version_record(url, projection.name, projection.version)
        found[projection.name] = None if record is None else record.state
    return found


@pytest.fixture
def big_log(pg_url: str) -> Iterator[Ledger]:
    with open_ledger(pg_url) as ledger:
        workload(ledger, 30)  # a few holds, reservations and refusals besides
        write_log(pg_url, ledger, EVENTS, 200)
        yield ledger


def paused_rebuild(url: str, faults: Path, **options: object) -> tuple[subprocess.Popen[str], int]:
    """``rebuild --all --jobs 2`` started with every process armed to stop before its third
    commit; the command, and the pid of a process stopped there."""
    env = {
        **os.environ,
        "DAYBOOK_FAULTS": "bulk.before_commit:3:pause",
        "DAYBOOK_FAULTS_DIR": str(faults),
    }
    parent = daybook(
        "projections", "rebuild", "--all", "--jobs", "2", "--batch-size", str(BATCH),
        "--no-progress", "--url", url, env=env, **options,
    )  # fmt: skip
    return parent, paused_child(faults, parent)


def paused_child(faults: Path, parent: subprocess.Popen[str]) -> int:
    """The pid of a rebuilding process stopped at its fault point (the marker names it)."""
    marker = faults / "bulk.before_commit.paused"
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        assert parent.poll() is None, parent.communicate()
        assert time.monotonic() < deadline, "no rebuilding process reached its third commit"
        time.sleep(0.02)
    return int(marker.read_text())


def gone(pid: int) -> bool:
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}").exists() else ""
        if "State:\tZ" in status:  # ended, not yet reaped by its parent
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_shares_are_dealt_heaviest_first_to_the_lightest() -> None:
    by_name = {p.name: p for p in projections.ALL}
    weight = {
        "account_balances": 100,
        "account_statement": 100,
        "daily_activity": 100,
        "inventory_levels": 10,
        "open_holds": 1,
        "sagas": 0,
    }
    dealt = shares(list(by_name.values()), weight, 2)
    assert [[p.name for p in share] for share in dealt] == [
        ["account_balances", "daily_activity"],
        ["account_statement", "inventory_levels", "open_holds", "sagas"],
    ]
    # Never more shares than projections, never an empty one; as many as asked for when
    # there are projections enough, weightless ones included (an empty log).
    alone = shares([by_name["sagas"]], weight, 4)
    assert [[p.name for p in share] for share in alone] == [["sagas"]]
    weightless = shares([by_name["sagas"], by_name["open_holds"], by_name["daily_activity"]], {}, 2)
    assert [[p.name for p in share] for share in weightless] == [
        ["sagas", "daily_activity"],
        ["open_holds"],
    ]


def test_every_projection_built_in_two_processes_equals_a_replay(big_log: Ledger) -> None:
    url = big_log.settings.url
    code, out, err = finished(
        daybook("projections", "rebuild", "--all", "--jobs", "2", "--url", url)
    )
    assert code == 0, err
    assert f"{len(projections.ALL)} projections built in" in out and "2 processes" in out, out
    assert set(states(url).values()) == {VersionState.LIVE}
    for projection in projections.ALL:
        assert_tables_match(big_log, url, projection)
    # Run again: nothing left to build, and it says so.
    code, out, err = finished(
        daybook("projections", "rebuild", "--all", "--jobs", "2", "--url", url)
    )
    assert code == 0, err
    assert "nothing to rebuild" in out


@pytest.mark.slow
def test_a_process_killed_mid_build_is_reported_and_the_next_run_resumes_it(
    big_log: Ledger, tmp_path: Path
) -> None:
    url = big_log.settings.url
    parent, victim = paused_rebuild(url, tmp_path)
    os.kill(victim, signal.SIGKILL)
    # The other process goes on (past its pause, whether it has reached it yet or not).
    code, out, err = finished(parent, tmp_path / "bulk.before_commit.paused")
    assert code == 1, (out, err)
    assert "ended (exit code -9) before it finished" in err, err
    assert "run the rebuild again to resume it" in err, err
    after_kill = states(url)
    unfinished = {name for name, state in after_kill.items() if state is not VersionState.LIVE}
    # The killed share is unfinished; the other share was finished all the same.
    assert unfinished and unfinished != set(after_kill), after_kill
    assert set(after_kill.values()) <= {VersionState.LIVE, VersionState.REBUILDING}
    # What was built all the same is said, beside the failure.
    for name in set(after_kill) - unfinished:
        assert f"{name} version" in out and "built to position" in out, out
    assert "failed (rebuild_failed)" in err and "refused" not in err, err
    code, out, err = finished(
        daybook("projections", "rebuild", "--all", "--jobs", "2", "--no-progress", "--url", url)
    )
    assert code == 0, err
    for name in set(after_kill) - unfinished:
        assert f"{name} version" in err and "serves reads already" in err, err
    assert set(states(url).values()) == {VersionState.LIVE}
    for projection in projections.ALL:
        assert_tables_match(big_log, url, projection)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_the_command_stops_its_processes(
    big_log: Ledger, tmp_path: Path, how: str
) -> None:
    """Ctrl-C (to the terminal's whole process group), SIGTERM (a service manager, to the
    command alone) and SIGKILL of the command: no rebuilding process is left running on
    its own, and the next run finishes the job."""
    url = big_log.settings.url
    parent, child = paused_rebuild(url, tmp_path)
    if how == "ctrl-c":
        os.killpg(parent.pid, signal.SIGINT)
    else:
        parent.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    code, _, err = finished(parent)
    if how == "sigkill":
        assert code == -signal.SIGKILL
    else:
        assert code == 130, err
        assert "interrupted" in err, err
        assert "Traceback" not in err, err
    assert gone(child), f"rebuilding process {child} still runs after {how} of the command"
    (tmp_path / "bulk.before_commit.paused").unlink(missing_ok=True)
    code, _, err = finished(
        daybook("projections", "rebuild", "--all", "--jobs", "2", "--no-progress", "--url", url)
    )
    assert code == 0, err
    assert set(states(url).values()) == {VersionState.LIVE}
    for projection in projections.ALL:
        assert_tables_match(big_log, url, projection)


def test_a_refusal_builds_nothing_of_the_others(pg_url: str) -> None:
    """Each projection is checked before any process starts: one the command may not build
    leaves the others unregistered, as in one process."""
    with open_ledger(pg_url) as ledger:
        workload(ledger, 40)
    code, _, err = finished(daybook("projections", "rebuild", "account_balances", "--url", pg_url))
    assert code == 0, err
    code, out, err = finished(
        daybook(
            "projections", "rebuild", "daily_activity", "account_balances", "--jobs", "2",
            "--url", pg_url,
        )
    )  # fmt: skip
    assert code == 1, (out, err)
    assert "rebuild_refused" in err and "account_balances version 1 is already live" in err, err
    assert states(pg_url)["daily_activity"] is None


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([], "name the projections to rebuild, or give --all"),
        (["account_balances", "--all"], "name the projections to rebuild, or give --all"),
        (["--all", "--jobs", "0"], "--jobs"),
        (["--all", "--jobs", "two"], "--jobs"),
        (["balances"], "invalid choice: 'balances'"),
    ],
)
def test_bad_arguments_are_refused_with_one_line(pg_url: str, args: list[str], said: str) -> None:
    code, out, err = finished(daybook("projections", "rebuild", *args, "--url", pg_url))
    assert code == 2, (out, err)
    assert said in err and "Traceback" not in err, err
    assert set(states(pg_url).values()) == {None}
