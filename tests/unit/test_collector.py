"""``settle_collector`` sets the process's garbage collector once, and never switches it off.

Run in a child process: the collector is process-wide, and freezing the test process's objects
would change every test after this one."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import gc
from daybook.infrastructure.collector import settle_collector
youngest = gc.get_threshold()[0]
kept = [object() for _ in range(10)]
assert settle_collector() is True
assert gc.get_freeze_count() > 0, "start-up objects are frozen"
assert gc.isenabled()
assert gc.get_threshold()[0] >= max(youngest, 10_000)
frozen = gc.get_freeze_count()
assert settle_collector() is False, "only the first call does anything"
assert gc.get_freeze_count() == frozen, "nothing allocated later is frozen"

import weakref

class Cycle:
    pass

a, b = Cycle(), Cycle()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None, "cycles made after start-up are still collected"
"""

_OFF = """
import gc
from daybook.infrastructure.collector import settle_collector
gc.set_threshold(0)
settle_collector()
assert gc.get_threshold()[0] == 0, "a collector switched off stays off"
"""


def _run(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_it_freezes_start_up_once_and_enlarges_the_youngest_generation() -> None:
    _run(_CHILD)


def test_a_collector_switched_off_stays_off() -> None:
    _run(_OFF)
