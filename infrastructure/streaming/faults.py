"""Named fault points for fault tests: ``DAYBOOK_FAULTS=relay.after_send:3`` makes the
process SIGKILL itself the third time it passes ``relay.after_send``;
``DAYBOOK_FAULTS=log.read:3:pause`` makes it stop there instead, the third time, until the
test lets it go on (it writes ``<name>.paused`` in ``DAYBOOK_FAULTS_DIR`` and waits until
that file is gone): an outage can then start at exactly that point.

Crash tests need to kill a process at an exact point (after the broker acknowledged a batch,
before the cursor moved) rather than at a lucky moment. Unset, a fault point costs one dict
lookup.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

_COUNTS: dict[str, int] = {}


def _parse(spec: str) -> dict[str, tuple[int, str]]:
    points: dict[str, tuple[int, str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = item.partition(":")
        nth, _, action = rest.partition(":")
        points[name] = (int(nth or 1), action or "kill")
    return points


_ARMED = _parse(os.environ.get("DAYBOOK_FAULTS", ""))
_DIRECTORY = Path(os.environ.get("DAYBOOK_FAULTS_DIR") or tempfile.gettempdir())


def arm(spec: str, directory: Path | None = None) -> None:
    """Arm fault points in this process (as ``DAYBOOK_FAULTS`` does for a new one)."""
    global _DIRECTORY
    _ARMED.update(_parse(spec))
    if directory is not None:
        _DIRECTORY = directory


def disarm() -> None:
    _ARMED.clear()
    _COUNTS.clear()


def paused_file(name: str, directory: Path) -> Path:
    return directory / f"{name}.paused"


def crash_point(name: str) -> None:
    """SIGKILL this process (or pause it) if ``name`` is armed and this is its n-th
    passage; the process's stderr says which point did it."""
    if name not in _ARMED:
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    nth, action = _ARMED[name]
    if _COUNTS[name] < nth:
        return
    if action == "pause":
        if _COUNTS[name] == nth:
            marker = paused_file(name, _DIRECTORY)
            marker.write_text(str(os.getpid()))
            print(f"daybook: fault point {name}: paused", file=sys.stderr, flush=True)
            while marker.exists():
                time.sleep(0.01)
        return
    print(f"daybook: fault point {name}: SIGKILL", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
