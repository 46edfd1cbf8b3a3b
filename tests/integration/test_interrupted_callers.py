"""A caller interrupted (Ctrl-C: ``KeyboardInterrupt`` in the main thread) while the ledger
works in its thread: the ledger must stay usable afterwards (an interactive session, a
notebook or a service that catches the interrupt goes on with the same ledger)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from daybook import open_ledger
from scripts import services
from tests.pg_locks import events_table

if TYPE_CHECKING:
    from sys import UnraisableHookArgs


def _interrupt_main_thread_at_random(stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    main = threading.main_thread().ident
    assert main is not None
    while not stop.is_set():
        time.sleep(rng.random() * 0.005)
        if not stop.is_set():
            signal.pthread_kill(main, signal.SIGINT)


def _stop_interrupting(stop: threading.Event, killer: threading.Thread) -> None:
    """Stop the interrupts, taking those that land meanwhile (one sent last is handled
    within the pause)."""
    while True:
        try:
            stop.set()
            killer.join()
            time.sleep(0.05)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue


def _ignoring_interrupts(
    hook: Callable[[UnraisableHookArgs], object],
) -> Callable[[UnraisableHookArgs], object]:
    def ignoring(unraisable: UnraisableHookArgs) -> object:
        if unraisable.exc_type is KeyboardInterrupt:
            return None
        return hook(unraisable)

    return ignoring


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "direct"])
def test_a_ledger_interrupted_by_ctrl_c_stays_usable(group_commit: bool, tmp_path: Path) -> None:
    """Reads through the ledger (and, with ``group_commit=False``, commands too) run in the
    caller's thread; a ``KeyboardInterrupt`` raised there at any point must leave no
    connection of the ledger inside a transaction. On SQLite one landing just after
    eventsourcing's ``BEGIN`` (before its context manager is entered) left the connection in
    the pool mid-transaction: every later ``BEGIN`` on it failed with "cannot start a
    transaction within a transaction", and so did every read and command of the ledger,
    for good, while its health said ``running``. (On PostgreSQL an interrupt that landed
    while its caller waited for a pooled connection lost that connection; the pool ran dry
    after twenty, too seldom in seconds of interrupts for a test to count on it.)"""
    assert threading.current_thread() is threading.main_thread()
    ledger = open_ledger(f"sqlite:///{tmp_path}/ctrl-c.db", group_commit=group_commit)
    a = ledger.open_account("a", "EUR").account_id
    b = ledger.open_account("b", "EUR").account_id
    ledger.deposit(a, 1_000_000, request_id="seed")
    stop = threading.Event()
    killer = threading.Thread(target=_interrupt_main_thread_at_random, args=(stop, 1))
    failures: list[BaseException] = []
    done = 0
    previous = signal.getsignal(signal.SIGINT)
    previous_hook = sys.unraisablehook
    # An interrupt that lands in a finalizer the collector runs (anyone's object) is
    # "ignored" by Python, through this hook: pytest's would hand it on to pytest, which
    # takes a KeyboardInterrupt for the user's and ends the whole run.
    sys.unraisablehook = _ignoring_interrupts(previous_hook)
    # Raised only while the ledger works: one landing in this test's own loop, between two
    # of its tries, would escape the test and end the whole pytest process. (Setting the
    # flag is no point where Python runs a signal handler; calls and loops are.)
    armed = [False]

    def interrupt(signum: int, frame: object) -> None:
        if armed[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    killer.start()
    try:
        started = time.monotonic()  # one interrupt in the wrong place was enough
        while time.monotonic() - started < 3 and len(failures) < 3:
            try:
                armed[0] = True
                ledger.account(a)
                ledger.head()
                ledger.transfer(a, b, 1, request_id=f"t{done}")
                armed[0] = False
                done += 1
            except KeyboardInterrupt:
                armed[0] = False
            except Exception as error:  # what a caller meets after the interrupts
                armed[0] = False
                failures.append(error)
    finally:
        armed[0] = False
        _stop_interrupting(stop, killer)
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
    # The interrupts are over: the ledger answers as before, and applied each transfer once
    # (the last one, interrupted or not, is sent again with its request id: replayed if it
    # was applied).
    try:
        assert failures == []
        ledger.transfer(a, b, 1, request_id=f"t{done}")
        assert ledger.account(b).balance == done + 1
        assert ledger.transfer(a, b, 1, request_id="after").position > 0
    finally:
        ledger.close()


def test_ctrl_c_pressed_again_ends_a_command_that_waits_on_a_lock(pg_url: str) -> None:
    """The first Ctrl-C is held back while the main thread works in the store; a command
    waiting behind a lock another session holds would then go on until its lock timeout
    (30 s). Pressed again a second later, it interrupts the command at once (psycopg
    cancels the statement), as a single Ctrl-C did before it was held back."""
    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
    script = textwrap.dedent(
        f"""
        import os, signal, threading
        from uuid import UUID
        from daybook import open_ledger
        ledger = open_ledger({pg_url!r}, group_commit=False)
        ledger.head()
        print("ready", flush=True)
        input()
        for seconds in (1.0, 2.5):
            threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            ledger.deposit(UUID({str(account)!r}), 1)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        """
    )
    with psycopg.connect(pg_url) as blocker:
        table = events_table(blocker)
        process = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=services.sigint_as_default,  # Ctrl-C reaches it as it would a user's
        )
        assert process.stdout is not None and process.stdin is not None
        try:
            assert process.stdout.readline() == "ready\n"
            blocker.commit()
            blocker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            process.stdin.write("\n")
            process.stdin.flush()
            out, _ = process.communicate(timeout=20)  # the lock timeout is 30 s
        except subprocess.TimeoutExpired:
            pytest.fail("a Ctrl-C pressed again did not end the command waiting on a lock")
        finally:
            blocker.rollback()
            process.kill()
    assert out == "interrupted\n"


def test_a_ledger_answers_in_an_atexit_handler() -> None:
    """An embedding that records a last command (and reads) at exit, from an ``atexit``
    handler of its main thread: a Ctrl-C held back must not need anything the interpreter
    has shut down by then (a thread pool refused: "cannot schedule new futures after
    shutdown")."""
    script = textwrap.dedent(
        """
        import atexit
        from daybook import open_ledger
        ledger = open_ledger("memory://", group_commit=False)
        account = ledger.open_account("ann", "EUR").account_id
        def final():
            ledger.deposit(account, 5, request_id="at-exit")
            print("balance", ledger.account(account).balance, flush=True)
            ledger.close()
        atexit.register(final)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.stdout == "balance 5\n", result.stderr.strip().splitlines()[-1:]
