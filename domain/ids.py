"""Random ids (RFC 4122 version 4 UUIDs) for requests, accounts, transfers, reservations.

Request ids the ledger generates differ from every other id in one respect: their variant
bits are RFC 4122's reserved ``111`` (the fourth group starts with ``e`` or ``f``) where
``uuid.uuid4`` and every other generator in use write ``10``. The ledger keeps no record of
each id it generates, so this is how it tells one sent back by a caller
(``is_generated_request_id``).

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
import re
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
    return _text(_random_v4())


def _text(value: int) -> str:
    """128 bits in a UUID's usual text form."""
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_VARIANT_RESERVED = 0xE000 << 48
_VERSION_4_ONLY = ~(0xF000 << 64)
_GENERATED_FORM = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[ef][0-9a-f]{3}-[0-9a-f]{12}")


def new_request_id() -> str:
    """A fresh request id of the ledger's own (for a command sent without one): a version 4
    UUID in its usual text form, with the reserved variant bits (see the module docstring)."""
    return _text(int.from_bytes(_random16()) & _VERSION_4_ONLY | (4 << 76) | _VARIANT_RESERVED)


def is_generated_request_id(text: str) -> bool:
    """Whether ``text`` has the form of a request id the ledger generated."""
    return _GENERATED_FORM.fullmatch(text) is not None
