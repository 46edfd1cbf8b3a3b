"""Named crash points for fault tests: ``DAYBOOK_FAULTS=relay.after_send:3`` makes the
process SIGKILL itself the third time it passes ``relay.after_send``.

Crash tests need to kill a process at an exact point (after the broker acknowledged a batch,
before the cursor moved) rather than at a lucky moment. Unset, a crash point costs one dict
lookup.
"""

from __future__ import annotations

import os
import signal

_COUNTS: dict[str, int] = {}


def _parse(spec: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, nth = item.partition(":")
        points[name] = int(nth or 1)
    return points


_ARMED = _parse(os.environ.get("DAYBOOK_FAULTS", ""))


def crash_point(name: str) -> None:
    """SIGKILL this process if ``name`` is armed and this is its n-th passage."""
    if name not in _ARMED:
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _COUNTS[name] >= _ARMED[name]:
        os.kill(os.getpid(), signal.SIGKILL)
