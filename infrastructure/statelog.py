"""Logs for states that can last: one line when a state starts, a summary every so often
while it lasts, one line when it ends. A worker waiting for a gap meets the state once per
message; the log must not (one line per message floods it while the wait lasts)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from daybook.infrastructure.observability.logs import LIMITED_AT_SOURCE

#: Every line here is limited per key already (see ``LIMITED_AT_SOURCE``).
_LIMITED = {LIMITED_AT_SOURCE: True}


@dataclass
class _Open:
    started: float
    last_summary: float
    count: int
    detail: str


class StateLog:
    """Rate-limited lines about states of named things (``key``: a partition, a version)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        summary_every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.summary_every = summary_every
        self.clock = clock
        self._open: dict[Hashable, _Open] = {}

    def during(self, key: Hashable, message: str, level: int = logging.WARNING) -> None:
        """``key`` is in the state (again): the first call logs ``message``; later calls log
        a summary at most every ``summary_every`` seconds."""
        now = self.clock()
        state = self._open.get(key)
        if state is None:
            self._open[key] = _Open(now, now, 1, message)
            self.logger.log(level, "%s", message, extra=_LIMITED)
            return
        state.count += 1
        state.detail = message
        if now - state.last_summary >= self.summary_every:
            state.last_summary = now
            self.logger.log(
                level,
                "%s (still, for %.0fs, %d times; latest: %s)",
                key,
                now - state.started,
                state.count,
                message,
                extra=_LIMITED,
            )

    def ended(self, key: Hashable, message: str, level: int = logging.INFO) -> None:
        """``key`` left the state: one line, if it was in it."""
        state = self._open.pop(key, None)
        if state is not None:
            self.logger.log(
                level, "%s (after %.0fs, %d times)", message, self.clock() - state.started,
                state.count, extra=_LIMITED,
            )  # fmt: skip
