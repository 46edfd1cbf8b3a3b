"""Random ids (RFC 4122 version 4 UUIDs) for requests, accounts, transfers, reservations.

The same randomness as ``uuid.uuid4`` (the operating system's CSPRNG), drawn 4 KiB at a time
rather than 16 bytes per id. Every command needs two ids, and ``os.urandom`` releases the GIL
around its system call: on the write path that hands the interpreter to another thread in
the middle of a caller's turn, twice per command. Drawing in bulk makes that rare, and
building the UUID directly skips ``UUID.__init__``'s argument checks.

Thread-safe (``deque.popleft`` and ``extend`` are atomic) and fork-safe: a child process
drops the parent's unused bytes, so two processes never hand out the same id.
"""

from __future__ import annotations

import os
from collections import deque
from uuid import UUID, SafeUUID

_BULK = 4096
_pool: deque[bytes] = deque()
os.register_at_fork(after_in_child=_pool.clear)

_VERSION_MASK = ~((0xF000 << 64) | (0xC000 << 48))
_VERSION_4 = (4 << 76) | (0x8000 << 48)
_new = object.__new__
_set = object.__setattr__
_UNKNOWN = SafeUUID.unknown


def _random16() -> bytes:
    try:
        return _pool.popleft()
    except IndexError:
        data = os.urandom(_BULK)
        _pool.extend(data[i : i + 16] for i in range(16, _BULK, 16))
        return data[:16]


def _random_v4() -> int:
    """128 random bits with the version 4 and RFC 4122 variant bits set, as ``UUID.int``."""
    return int.from_bytes(_random16()) & _VERSION_MASK | _VERSION_4


def new_uuid() -> UUID:
    """A fresh version 4 UUID, equal in every way to one from ``uuid.uuid4()``."""
    value = _new(UUID)
    _set(value, "int", _random_v4())
    _set(value, "is_safe", _UNKNOWN)
    return value


def new_id_text() -> str:
    """A fresh version 4 UUID in its usual text form (request and reservation ids)."""
    h = f"{_random_v4():032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
