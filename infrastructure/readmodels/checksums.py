"""Checksums of read-model rows over 256 key ranges, for the reconciler.

A row's key range is the first byte (two hex digits) of the MD5 of its key values; a range's
checksum is its row count and the sum of the first 15 hex digits (60 bits) of the MD5 of each
row's values. Values are joined as text with ``\\x1f`` between them and ``\\N`` for NULL, so
that a database can compute the same figures in SQL (``postgres.PostgresStore`` does): any
change to this text must be made there too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from daybook.projections.model import Key, Row, Table, Value

SEPARATOR = "\x1f"
NULL = "\\N"


def _text(value: Value) -> str:
    return NULL if value is None else str(value)


def range_of(key: Key) -> str:
    """The key range of a row with this key."""
    return hashlib.md5(SEPARATOR.join(_text(v) for v in key).encode()).hexdigest()[:2]


def row_checksum(table: Table, row: Row) -> int:
    text = SEPARATOR.join(_text(row[name]) for name in table.column_names)
    return int(hashlib.md5(text.encode()).hexdigest()[:15], 16)


def by_range(table: Table, rows: Iterable[Row]) -> dict[str, tuple[int, int]]:
    """Row count and checksum of each key range that holds rows."""
    sums: dict[str, tuple[int, int]] = {}
    for row in rows:
        bucket = range_of(table.key_of(row))
        count, total = sums.get(bucket, (0, 0))
        sums[bucket] = (count + 1, total + row_checksum(table, row))
    return sums
