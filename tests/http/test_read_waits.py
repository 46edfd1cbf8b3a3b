"""The read pool's waits for a position, and the token cache's clock, on fakes: which look
answers a read, and when (no server, no database: the order of events decides)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from daybook.infrastructure.http import reads
from daybook.infrastructure.http.admission import RateLimits
from daybook.infrastructure.http.auth import Authenticator
from daybook.infrastructure.http.reads import ReadPool
from daybook.infrastructure.http.tokens import Token
from daybook.infrastructure.readmodels import StaleRead


class _Views:
    """A read-model connection whose position is ``real[0]``."""

    def __init__(self, real: list[int]) -> None:
        self.real = real

    def position(self, projection: str) -> int:
        return self.real[0]

    def close(self) -> None:
        pass


def _reader(real: list[int]) -> Any:
    """A query answering at ``real[0]``, or ``StaleRead`` short of its ``min_position``."""

    def read(views: Any, wait: dict[str, Any]) -> Any:
        if wait.get("min_position", 0) > real[0]:
            raise StaleRead("p", wait["min_position"], real[0], 0)
        return SimpleNamespace(as_of_position=real[0])

    return read


def _held(gate: threading.Event, real: list[int]) -> Any:
    """A query that holds its connection until ``gate`` opens, then answers at ``real[0]``."""

    def held(views: Any, wait: dict[str, Any]) -> Any:
        gate.wait(30)
        return SimpleNamespace(as_of_position=real[0])

    return held


def test_a_read_for_a_position_not_reached_answers_within_its_timeout() -> None:
    """The only connection is busy. A read for a position the read model has not reached
    waited its turn for a connection past its own timeout (until the busy one ended, or
    --max-read-wait): it answers stale_read while the busy read still runs."""
    real = [1]
    pool = ReadPool([_Views(real)])  # type: ignore[list-item]
    gate = threading.Event()
    slow = _held(gate, real)

    async def scenario() -> bool:
        busy = asyncio.ensure_future(pool.read(slow, {"timeout": 30}, projection="p", turn=60))
        await asyncio.sleep(0.05)
        with pytest.raises(StaleRead):
            wait = {"min_position": 50, "timeout": 0.3}
            await pool.read(_reader(real), wait, projection="p", turn=60)
        still_busy = not busy.done()
        gate.set()
        await busy
        return still_busy

    try:
        assert asyncio.run(scenario()), "the read waited for the busy one to end"
    finally:
        pool.close()


def test_a_read_whose_position_is_reached_is_answered_while_others_wait() -> None:
    """Another read waits for a far position, so the watcher runs (it saw 50). The read
    model reaches 51 and a read with min_position=51 and timeout=0 comes: it was refused
    stale_read at 50, from what the watcher last saw, without a look of its own."""
    real = [50]
    pool = ReadPool([_Views(real), _Views(real)])  # type: ignore[list-item]

    async def scenario() -> Any:
        wait = {"min_position": 1000, "timeout": 0.5}
        far = asyncio.ensure_future(pool.read(_reader(real), wait, projection="p", turn=5))
        await asyncio.sleep(0.1)  # the watcher has looked
        real[0] = 51
        try:
            wait = {"min_position": 51, "timeout": 0}
            return await pool.read(_reader(real), wait, projection="p", turn=5)
        finally:
            with pytest.raises(StaleRead):
                await far

    try:
        assert asyncio.run(scenario()).as_of_position == 51
    finally:
        pool.close()


def test_waiting_reads_are_woken_only_by_news(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher looks every 20 ms: each look woke every waiting read, news or not (with
    hundreds waiting, the event loop was kept busy for nothing)."""
    real = [50]
    pool = ReadPool([_Views(real)])  # type: ignore[list-item]
    wakes: list[int] = []
    wake = reads._Watcher._wake

    def counted(self: Any) -> None:
        wakes.append(1)
        wake(self)

    monkeypatch.setattr(reads._Watcher, "_wake", counted)

    async def scenario() -> int:
        wait = {"min_position": 1000, "timeout": 0.5}
        with pytest.raises(StaleRead):
            await pool.read(_reader(real), wait, projection="p", turn=5)
        return len(wakes)

    try:
        looks_without_news = asyncio.run(scenario())
    finally:
        pool.close()
    assert looks_without_news <= 2, looks_without_news  # the first look's position, at most


def test_a_token_is_trusted_from_its_look_not_from_the_answer() -> None:
    """The lookup reads the token's row (valid) at 0, it is revoked at once, and the answer
    arrives at 4: it was trusted until 4 + cache_seconds, not 0 + cache_seconds."""
    now = [0.0]
    token = Token("reader", frozenset({"read"}), "2026-01-01")
    revoked = [False]

    class Store:
        def verify(self, secret: str) -> Token | None:
            answer = None if revoked[0] else token
            revoked[0] = True
            now[0] = 4.0  # the answer comes late
            return answer

    class Request:
        headers = {"authorization": "Bearer dbk_secret"}

    auth = Authenticator(Store(), RateLimits(100.0), cache_seconds=5.0, clock=lambda: now[0])  # type: ignore[arg-type]

    async def scenario() -> None:
        assert await auth.identify(Request()) is token  # type: ignore[arg-type]
        now[0] = 6.0  # past cache_seconds after the look and the revocation
        with pytest.raises(Exception, match=r"unknown|revoked|invalid|token"):
            await auth.identify(Request())  # type: ignore[arg-type]

    try:
        asyncio.run(scenario())
    finally:
        auth.close()


def test_a_read_reached_while_it_waits_for_a_connection_waits_its_turn() -> None:
    """Its position was not known to be reached, so it waited for a connection within its
    own timeout; another read's answer showed the position reached meanwhile, yet when that
    timeout came it was answered stale_read, at a position past the one it wanted."""
    real = [100]
    pool = ReadPool([_Views(real)])  # type: ignore[list-item]
    gate = threading.Event()
    slow = _held(gate, real)

    async def scenario() -> Any:
        loop = asyncio.get_running_loop()
        busy = asyncio.ensure_future(pool.read(slow, {"timeout": 30}, projection="q", turn=60))
        await asyncio.sleep(0.05)
        wanted = asyncio.ensure_future(
            pool.read(_reader(real), {"min_position": 50, "timeout": 0.3}, projection="p", turn=60)
        )
        await asyncio.sleep(0.1)
        pool._watchers["p"].saw(100, built=True)  # another read's answer
        loop.call_later(0.5, gate.set)  # the connection frees after the read's timeout
        answer = await wanted
        await busy
        return answer

    try:
        assert asyncio.run(scenario()).as_of_position == 100
    finally:
        pool.close()


def test_a_failure_told_to_many_waiting_reads_keeps_one_traceback() -> None:
    """The watcher's look fails for a reason no retry cures: every waiting read raises it.
    Raised as it was, the one exception gathered every read's frames (600 for 200 reads),
    kept alive while it was the watcher's last failure."""
    real = [10]

    class Broken(_Views):
        def position(self, projection: str) -> int:
            raise LookupError("the read model changed")

    pool = ReadPool([Broken(real)])  # type: ignore[list-item]

    async def scenario() -> list[BaseException]:
        wait = {"min_position": 50, "timeout": 5}
        reads = [pool.read(_reader(real), wait, projection="p", turn=60) for _ in range(50)]
        return [
            error
            for error in await asyncio.gather(*reads, return_exceptions=True)
            if isinstance(error, BaseException)
        ]

    try:
        errors = asyncio.run(scenario())
    finally:
        pool.close()
    assert len(errors) == 50 and all(isinstance(e, LookupError) for e in errors), errors[:3]
    depth = 0
    tb = errors[0].__traceback__
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    assert depth < 20, f"{depth} frames in the traceback"


def test_reads_told_their_position_went_back_wait_for_the_watcher() -> None:
    """The watcher saw 100; the read models answer 60 now (failed over to a replica further
    behind). Each read's own answer was ignored as older than the watcher's, so the reads
    took the position for reached and queried again at once, over and over, taking every
    connection from the watcher, whose look alone could correct it (1,361 queries)."""
    real = [100]
    queries = [0]
    pool = ReadPool([_Views(real), _Views(real)])  # type: ignore[list-item]
    read = _reader(real)

    def counted(views: Any, wait: dict[str, Any]) -> Any:
        queries[0] += 1
        return read(views, wait)

    async def scenario() -> list[BaseException | Any]:
        assert (await pool.read(counted, {"timeout": 1}, projection="p", turn=5)) is not None
        real[0] = 60
        queries[0] = 0
        wait = {"min_position": 80, "timeout": 1}
        reads = [pool.read(counted, wait, projection="p", turn=5) for _ in range(20)]
        return await asyncio.gather(*reads, return_exceptions=True)

    try:
        answers = asyncio.run(scenario())
    finally:
        pool.close()
    assert all(isinstance(answer, StaleRead) for answer in answers), answers[:3]
    assert queries[0] <= 40, f"{queries[0]} queries by 20 reads"


def test_a_failure_the_read_models_recovered_from_is_not_told_to_later_reads() -> None:
    """The watcher's look failed for a reason no retry cures (a read model changed under
    the reads, during a deploy), and the reads waiting then raised it. The deploy is over:
    a read comes and looks for itself (slowly); another comes meanwhile, and waits for the
    watcher. That one raised the old failure at once, before any look was made, and a
    burst of reads after every such episode answered 503 read_model_changed for nothing."""
    real = [10]
    broken = [True]

    class Views(_Views):
        def position(self, projection: str) -> int:
            if broken[0]:
                raise LookupError("the read model changed")
            return self.real[0]

    gate = threading.Event()

    def slow(views: Any, wait: dict[str, Any]) -> Any:
        gate.wait(30)
        return _reader(real)(views, wait)

    pool = ReadPool([Views(real), Views(real)])  # type: ignore[list-item]

    async def scenario() -> Any:
        wait = {"min_position": 50, "timeout": 5}
        with pytest.raises(LookupError):  # during the deploy
            await pool.read(_reader(real), wait, projection="p", turn=60)
        await asyncio.sleep(0.2)  # no read waits: the watch has ended
        assert pool._watchers["p"].task is None
        broken[0] = False  # the deploy is over
        real[0] = 60
        first = asyncio.ensure_future(pool.read(slow, wait, projection="p", turn=60))
        await asyncio.sleep(0.05)  # it looks for itself, slowly
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, gate.set)
        try:
            return await pool.read(_reader(real), wait, projection="p", turn=60)
        finally:
            await first

    try:
        assert asyncio.run(scenario()).as_of_position == 60
    finally:
        pool.close()
