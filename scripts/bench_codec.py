"""Codec speed: daybook's orjson transcoder beside eventsourcing's default JSON transcoder.

Both encode and decode the same daybook events through the same ``ContractMapper`` (so both
sides validate against the pydantic contracts); only the transcoder differs. Prints events/s
for each and the ratio.

    python scripts/bench_codec.py [--events 50000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

from eventsourcing.persistence import DatetimeAsISO, DecimalAsStr, JSONTranscoder, UUIDAsHex

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook.domain.accounts import Account, transfer
from daybook.domain.events import Metadata, metadata_scope
from daybook.infrastructure.codec import ContractMapper, OrjsonTranscoder


def sample_events(count: int) -> list[Any]:
    with metadata_scope(Metadata(request_id="r-1", correlation_id="c-1", causation_id="k-1")):
        a = Account.open(uuid4(), "alice", "EUR", 0)
        b = Account.open(uuid4(), "bob", "EUR", 0)
        a.deposit(count * 10)
        for _ in range(count // 2):
            transfer(a, b, 3, uuid4())
    return [*a.collect_events(), *b.collect_events()][:count]


def measure(mapper: ContractMapper, events: list[object]) -> tuple[float, float]:
    started = time.perf_counter()
    stored = [mapper.to_stored_event(e) for e in events]  # type: ignore[arg-type]
    encoded = time.perf_counter() - started
    started = time.perf_counter()
    decoded = [mapper.to_domain_event(s) for s in stored]
    decoding = time.perf_counter() - started
    assert decoded == events, "the round trip changed an event"
    return len(events) / encoded, len(events) / decoding


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    events = sample_events(args.events)
    default = JSONTranscoder()
    for transcoding in (UUIDAsHex(), DatetimeAsISO(), DecimalAsStr()):  # as Application does
        default.register(transcoding)
    results = {}
    for name, transcoder in (
        ("eventsourcing JSONTranscoder", default),
        ("daybook OrjsonTranscoder", OrjsonTranscoder()),
    ):
        measure(ContractMapper(transcoder=transcoder), events[:1000])  # warm up
        results[name] = measure(ContractMapper(transcoder=transcoder), events)
        enc, dec = results[name]
        print(f"{name:<30} encode {enc:>10,.0f} events/s   decode {dec:>10,.0f} events/s")
    (e1, d1), (e2, d2) = results.values()
    print(
        f"ratio (daybook / default): encode {e2 / e1:.2f}x, decode {d2 / d1:.2f}x "
        f"({len(events):,} events, pydantic validation included on both sides)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
