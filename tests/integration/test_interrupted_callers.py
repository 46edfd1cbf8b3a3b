"""A caller interrupted (Ctrl-C: ``KeyboardInterrupt`` in the main thread) while the ledger
works in its thread: the ledger must stay usable afterwards (an interactive session, a
notebook or a service that catches the interrupt goes on with the same ledger)."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest

from daybook import open_ledger


def _interrupt_main_thread_at_random(stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    main = threading.main_thread().ident
    assert main is not None
    while not stop.is_set():
        time.sleep(rng.random() * 0.005)
        if not stop.is_set():
            signal.pthread_kill(main, signal.SIGINT)


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
    signal.signal(signal.SIGINT, signal.default_int_handler)
    killer.start()
    try:
        started = time.monotonic()  # one interrupt in the wrong place was enough
        while time.monotonic() - started < 3 and len(failures) < 3:
            try:
                ledger.account(a)
                ledger.head()
                ledger.transfer(a, b, 1, request_id=f"t{done}")
                done += 1
            except KeyboardInterrupt:
                pass
            except Exception as error:  # what a caller meets after the interrupts
                failures.append(error)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop.set()
        killer.join()
        time.sleep(0.05)
        signal.signal(signal.SIGINT, previous)
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
