"""A benchmark's client threads: one that dies fails the run (it would otherwise print a
figure measured by the clients left, and exit 0)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scripts import services

ROOT = Path(__file__).resolve().parents[2]


def test_a_client_that_raised_fails_the_join_after_every_client_ended() -> None:
    ended: list[int] = []

    def client(number: int) -> None:
        if number == 1:
            raise ConnectionError("the server went away")
        ended.append(number)

    threads = [services.Client(target=client, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    with pytest.raises(RuntimeError, match="the server went away") as raised:
        services.join_clients(threads)
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert sorted(ended) == [0, 2]
    fine = services.Client(target=ended.clear)
    fine.start()
    services.join_clients([fine])  # none failed: no error
    assert ended == []


def test_ctrl_c_ends_a_run_whose_clients_are_still_sending() -> None:
    """Ctrl-C during a benchmark ended it only once every client had sent all its commands
    (20 s of bench_write.py's default run): its clients are daemon threads, so the
    interrupt ends the run; here they would never have ended by themselves."""
    script = textwrap.dedent(
        """
        import threading, time
        from scripts import services

        def client() -> None:
            while True:
                time.sleep(0.01)

        threads = [services.Client(target=client) for _ in range(2)]
        for thread in threads:
            thread.start()
        print("sending", flush=True)
        services.join_clients(threads)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=services.sigint_as_default,  # Ctrl-C reaches it as it would a user's
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "sending"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the run went on after Ctrl-C: its clients kept the process alive")
    assert process.returncode != 0 and "KeyboardInterrupt" in err, err
