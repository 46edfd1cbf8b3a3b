"""Stand-ins for ``rebuild_jobs._rebuild_share`` that spawned processes import by name
(tests/projections/test_rebuild_jobs_faults.py): a process that dies at a chosen point."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import signal
import time
from pathlib import Path
from typing import Any

from daybook.infrastructure.readmodels import rebuild_jobs


def dies_holding_the_write_lock(index: int, *args: Any) -> None:
    """Share 0 is killed while it holds the lock its reports are written under (as when the
    OOM killer takes it while its queue's feeder thread writes a report); the others rebuild
    their share as ever."""
    reports = args[-1]
    if index == 0:
        lock = getattr(reports, "_wlock", None)  # multiprocessing.Queue's writers' lock
        if lock is not None:
            lock.acquire()
        Path(os.environ["DAYBOOK_TEST_MARK"]).write_text("held")
        os.kill(os.getpid(), signal.SIGKILL)
    while not Path(os.environ["DAYBOOK_TEST_MARK"]).exists():  # share 0 holds it first
        time.sleep(0.01)
    rebuild_jobs._rebuild_share(index, *args)


def killed_at_once(index: int, *args: Any) -> None:
    """Share 0 is killed before it builds anything; the others rebuild their share."""
    if index == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    rebuild_jobs._rebuild_share(index, *args)


class InterruptedSecondStart(multiprocessing.context.SpawnProcess):
    """A spawned process whose start is interrupted (Ctrl-C) for the second one started."""

    starts = 0

    def start(self) -> None:
        type(self).starts += 1
        if type(self).starts == 2:
            raise KeyboardInterrupt
        super().start()


class StartInterrupted:
    """A spawn context whose second process's start is interrupted."""

    def __init__(self) -> None:
        self.real = multiprocessing.get_context("spawn")
        InterruptedSecondStart.starts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def Process(self, **options: Any) -> Any:
        return InterruptedSecondStart(**options)
