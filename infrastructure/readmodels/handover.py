"""Handing a projection version from one owner to another (``daybook projections handover``).

One transaction per call: it locks the versions' catalog rows and the stream group's progress
rows (what every writer locks before writing, so writers wait), converts the checkpoint, reads
from the log whatever events the new checkpoint needs that the old one did not have, applies
them through the projection engine, and records the new owner. Nothing is applied twice and
nothing is skipped, with partitions at different positions and idle ones:

- to the runner, from a vector: the position becomes the furthest the vector reached, after
  applying each partition's events between its vector entry and that position. The vector
  is read for the partitions the relay publishes the topic with (its progress rows follow
  the topic's partitions, whatever count its workers were told) when that is known, else
  for the count the versions record; progress rows past that count are refused;
- to ``stream:GROUP``, from a position P: each partition's entry becomes the last event at or
  before P that went to it (the relay's partitioning), raised to where the group already
  stands if it is further (its workers' Kafka offsets are there); the events in between are
  applied, to this version and to any the group already owns. Each partition's bound is at
  least P (every event of it up to P is applied), so the position readers see never goes
  back. The partitions are those the relay publishes the topic with, or those the versions
  the group owns record: a vector for another count would put events in the wrong
  partitions, applying some again. A group with only progress rows must be given the count
  (they are a lower bound); only a group with nothing recorded takes a default.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from psycopg.errors import DeadlockDetected, SerializationFailure

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionRecord, VersionState
from daybook.infrastructure.readmodels.checkpoints import (
    RUNNER,
    Vector,
    group_of,
    parked_for,
    read_vector,
    recorded_partitions,
    stream_owner,
    write_vector,
)
from daybook.infrastructure.readmodels.engine import BatchRows, RowCache, Slot, apply_careful
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.store import ReadStore
from daybook.infrastructure.settings import DEFAULT_PARTITIONS
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.transient import causes
from daybook.infrastructure.urls import scheme
from daybook.projections.model import LogEvent, Projection

_CHUNK = 5_000


class HandoverRefused(Exception):
    """A handover that cannot be done as asked; the message says why and what to do."""

    code = "handover_refused"


@dataclass(frozen=True)
class Handed:
    name: str
    version: int
    previous_owner: str
    owner: str
    #: Events read from the log and applied to bring the checkpoint over.
    applied: int
    #: The log position every event up to which is applied, afterwards.
    position: int


def partition_of(partitions: int) -> Callable[[str], int]:
    def partition(aggregate_id: str) -> int:
        return envelope.partition_for(envelope.partition_key(aggregate_id), partitions)

    return partition


def handover(
    log: EventLog,
    url: str,
    definitions: Sequence[Projection],
    to: str,
    *,
    topic: str,
    partitions: int | None = None,
    default_partitions: int = DEFAULT_PARTITIONS,
    known: Sequence[Projection] = (),
    published: int | None = None,
    published_of: Callable[[str], int | None] | None = None,
) -> list[Handed]:
    """Hand the code's versions of ``definitions`` to ``to`` (``runner`` or
    ``stream:GROUP``). ``known``: definitions of other projections, for versions the group
    owns already that must move with it (its partitions are raised for the newcomers).

    To a group, ``partitions`` (None: not given) must be the count the group has recorded
    for ``topic``, and is that count when not given; a group with nothing recorded takes
    ``partitions``, or ``default_partitions`` when not given. ``published``: the count the
    relay publishes ``topic`` with (its cursor), when known: to a group, any other is
    refused; to the runner, a group's vector is converted for it. ``published_of``: that
    count for another topic (a version handed to the runner may follow another topic than
    ``topic``), when known. Raises ``HandoverRefused``."""
    group = group_of(to)
    if to != RUNNER and not group:
        raise HandoverRefused(f"hand over to 'runner' or 'stream:GROUP', not {to!r}")
    if group and scheme(url) != "postgresql":
        # The workers refuse any other database, so the versions would have no writer.
        raise HandoverRefused(
            f"stream workers keep read models on PostgreSQL only, and these are on "
            f"{scheme(url)}: no worker of {to} could write them; keep them with the runner"
        )
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        catalog.ensure()
        # A writer (a worker's batch, the runner) may hold rows the handover waits for
        # while it waits for one the handover holds (seen under load with six versions):
        # PostgreSQL breaks the cycle by aborting one side. The aborted transaction wrote
        # nothing, so running it again from the start, reading everything afresh, is safe.
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return _handover(
                    log, store, catalog, definitions, to, group, topic,
                    (partitions, default_partitions, published), known, published_of,
                )  # fmt: skip
            except Exception as error:
                if not deadlocked(error) or attempt == _ATTEMPTS:
                    raise
                time.sleep(random.uniform(0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")
    finally:
        store.close()


#: How often a handover that met a deadlock with a writer is run again.
_ATTEMPTS = 6


def deadlocked(error: BaseException) -> bool:
    """Whether PostgreSQL aborted the transaction to break a deadlock (or a serialization
    conflict), also when a store or eventsourcing wrapped the driver's error."""
    return any(isinstance(c, DeadlockDetected | SerializationFailure) for c in causes(error))


def _handover(
    log: EventLog,
    store: ReadStore,
    catalog: VersionCatalog,
    definitions: Sequence[Projection],
    to: str,
    group: str | None,
    topic: str,
    asked: tuple[int | None, int, int | None],
    known: Sequence[Projection],
    published_of: Callable[[str], int | None] | None = None,
) -> list[Handed]:
    with store.transaction():
        records = []
        for projection in definitions:
            record = catalog.version(projection.name, projection.version, lock=True)
            if record is None:
                raise HandoverRefused(
                    f"{projection.name} has no version {projection.version} yet: start a "
                    "runner or workers to build it (they own what they build)"
                )
            if not record.state.writable:
                # Stopped, its checkpoint would be the new owner's, which moves on while
                # nobody writes the version: resumed, it would skip what came meanwhile.
                # Retired, nobody is to write it.
                rebuild = f"daybook projections rebuild {projection.name}"
                if record.state is not VersionState.STOPPED:
                    what = "hand over the version its code defines now"
                elif record.owner == RUNNER:
                    what = (
                        f"resume it first (daybook projections resume {projection.name}), "
                        f"or rebuild it ({rebuild})"
                    )
                else:  # a group's stopped version is not resumed (see ``resume``)
                    what = f"rebuild it under a new version ({rebuild})"
                raise HandoverRefused(
                    f"{projection.name} v{projection.version} is {record.state.value}: only a "
                    f"live or rebuilding version is handed over; {what}; nothing was handed over"
                )
            records.append((projection, record))
        if group is None:
            return [
                _to_runner(log, store, catalog, p, r, asked[2], topic, published_of)
                for p, r in records
            ]
        return _to_group(log, store, catalog, records, group, topic, asked, known)


def _to_runner(
    log: EventLog,
    store: ReadStore,
    catalog: VersionCatalog,
    projection: Projection,
    record: VersionRecord,
    published: int | None,
    topic: str,
    published_of: Callable[[str], int | None] | None = None,
) -> Handed:
    """``published``: the count the relay publishes the topic with (its cursor), when
    known. The group's progress rows follow the topic's partitions, which workers of an
    older daybook did not compare with theirs: the vector is converted for that count, not
    for the one the version records."""
    source = record.group
    if source is None:
        return Handed(record.name, record.version, RUNNER, RUNNER, 0, record.position)
    assert record.topic is not None and record.partitions
    # ``published`` counts the partitions of ``topic``: for a version that follows another
    # topic (a group moved to a new topic, or --topic left at its default), it says nothing;
    # that topic's own count does, when known.
    if record.topic != topic:
        published = None if published_of is None else published_of(record.topic)
    partitions = record.partitions if published is None else published
    kept = recorded_partitions(store, source, record.topic, lock=True)
    if kept is not None and kept > partitions:
        # Converted for too few partitions, the vector would leave some out, and their
        # events after the partitions kept would be applied again.
        counted = f"{record.name} v{record.version} records {record.partitions} (the workers')"
        if published is not None:
            counted += f" and the relay publishes it with {published}"
        raise HandoverRefused(
            f"{record.owner} has progress rows for {kept} partitions of {record.topic}, but "
            f"{counted}: they ran with another --partitions than the topic has; run "
            f"the handover with the --url of the event store the relay publishes "
            f"{record.topic} from (its cursor counts the partitions), or rebuild the version "
            f"(daybook projections rebuild {record.name}); nothing was handed over"
        )
    vector = read_vector(store, source, record.topic, partitions, lock=True)
    left_out = sorted(
        p for p in parked_for(store, source, record.topic, record.name, record.version) if p > 0
    )
    if left_out:
        # The runner's checkpoint says every event up to it is in the rows: these are not.
        shown = ", ".join(str(p) for p in left_out[:5]) + (" ..." if len(left_out) > 5 else "")
        # A letter an older daybook parked names no version: it may concern this one, and
        # counts (as it does for the reconciler), though it keeps the version with the group.
        raise HandoverRefused(
            f"{record.name} v{record.version} lacks {len(left_out)} event(s) {record.owner} "
            f"parked (log positions {shown}; a letter parked before daybook 0.3 counts for "
            "every version of its group); a runner's position would claim them: rebuild "
            f"it under a new version (daybook projections rebuild {record.name}: the runner "
            "builds it from the whole log) instead; nothing was handed over"
        )
    target = max(vector.furthest, vector.position)
    # Every event of a partition up to its bound is applied: start there, not at its last
    # event (0 for an idle partition, which would read the whole log under the locks).
    starts = [max(p, b) for p, b in zip(vector.positions, vector.bounds, strict=True)]
    applied = _bring(log, store, projection, record, starts, target, partitions)
    catalog.set_owner(record.name, record.version, RUNNER, position=target)
    return Handed(record.name, record.version, record.owner, RUNNER, applied, target)


def _to_group(
    log: EventLog,
    store: ReadStore,
    catalog: VersionCatalog,
    records: list[tuple[Projection, VersionRecord]],
    group: str,
    topic: str,
    asked: tuple[int | None, int, int | None],
    known: Sequence[Projection],
) -> list[Handed]:
    owner = stream_owner(group)
    for _, record in records:
        if record.owner not in (RUNNER, owner):
            raise HandoverRefused(
                f"{record.name} v{record.version} is owned by {record.owner}: hand it to the "
                f"runner first (daybook projections handover {record.name} --to runner)"
            )
    versions = catalog.versions()
    followed = sorted(
        {r.topic for r in versions if r.owner == owner and r.state.writable and r.topic} - {topic}
    )
    if followed:
        # Its workers read that topic: a vector on another would be one they never move,
        # and the group's versions would be brought to it from nothing (events applied again).
        raise HandoverRefused(
            f"{owner} follows topic {followed[0]} (the versions it owns record it), not "
            f"{topic}: run the handover with --topic {followed[0]}; nothing was handed over"
        )
    partitions = _partitions(store, versions, group, topic, *asked)
    for _, record in records:
        if record.owner == owner and (record.topic, record.partitions) != (topic, partitions):
            raise HandoverRefused(
                f"{record.name} v{record.version} follows topic {record.topic} with "
                f"{record.partitions} partitions, not {topic} with {partitions}"
            )
    moving = [(p, r) for p, r in records if r.owner == RUNNER]
    current = read_vector(store, group, topic, partitions, lock=True)
    if not moving:  # every one is the group's already: nothing to convert or apply
        return [Handed(r.name, r.version, owner, owner, 0, current.position) for _, r in records]
    for _, record in moving:
        for other in versions:
            if (
                other.owner == owner
                and other.name == record.name
                and other.version != record.version
                and other.state.writable
                and record.state.writable
            ):
                # A worker's code defines one version of a projection, and a worker whose
                # code lacks a version its group writes refuses: no worker could run.
                raise HandoverRefused(
                    f"the group {group} writes {other.name} v{other.version} "
                    f"({other.state.value}), and no worker writes two versions of a "
                    f"projection: let v{record.version} switch reads first (daybook "
                    f"projections rebuild {record.name}), then hand it over"
                )
    staying = [
        r
        for r in versions
        if r.owner == owner and r.state.writable and (r.name, r.version) not in
        {(m.name, m.version) for _, m in moving}
    ]  # fmt: skip
    # Where every partition will stand: no lower than the group (its Kafka offsets are
    # there), no lower than what each version handed over has applied.
    # Only events after the group's honest position can raise a partition above where the
    # group stands (every partition has every event of it up to there): scan from there,
    # not from the log's start, while every writer waits for the locks held.
    last_before = [
        _last_events(log, r.position, partitions, after=current.position) for _, r in moving
    ]
    target = [max(current.positions[q], *(c[q] for c in last_before)) for q in range(partitions)]
    applied: dict[tuple[str, int], int] = {}
    # Each partition's bound: every event of it up to there is applied, afterwards, to
    # every version the group owns. Every version has every event of q up to target[q]: a
    # version that stays had them up to where the group stood and is brought to target[q];
    # a version handed over had every event up to its position P and is brought from there.
    # target[q] is at least the last event of q at or before the furthest P handed over,
    # and at least the group's position in q, past which its bound says q has no event up
    # to the bound. So every version has every event of q up to the furthest P and up to
    # the group's bound too, whichever P it came from: readers of no version, handed or
    # staying, see the position go back (a version handed from behind moves up).
    furthest = max(r.position for _, r in moving)
    bounds = [max(current.bounds[q], target[q], furthest) for q in range(partitions)]
    for projection, record in moving:
        applied[(record.name, record.version)] = _bring_after(
            log, store, projection, record, record.position, target, partitions
        )
    by_name = {p.name: p for p in known} | {p.name: p for p, _ in records}
    for record in staying:
        defined = by_name.get(record.name)
        if defined is None or defined.version != record.version:
            if current.positions != tuple(target):
                raise HandoverRefused(
                    f"the group {group} also owns {record.name} v{record.version}, which would "
                    f"have to move with it: hand it over in the same command"
                )
            continue
        starts = [max(p, b) for p, b in zip(current.positions, current.bounds, strict=True)]
        applied[(record.name, record.version)] = _bring(
            log, store, defined, record, starts, max(target), partitions, target
        )
    write_vector(store, group, topic, Vector(tuple(target), tuple(bounds)))
    handed = []
    for _, record in moving:
        catalog.set_owner(
            record.name, record.version, owner,
            position=min(bounds), topic=topic, partitions=partitions,
        )  # fmt: skip
        handed.append(
            Handed(record.name, record.version, RUNNER, owner,
                   applied[(record.name, record.version)], min(bounds))
        )  # fmt: skip
    for record in staying:
        catalog.bump_epoch(record.name, record.version)
    return handed


def _partitions(
    store: ReadStore,
    versions: Sequence[VersionRecord],
    group: str,
    topic: str,
    given: int | None,
    default: int,
    published: int | None = None,
) -> int:
    """The partitions of the group's vector: those the versions the group owns record for
    ``topic``, which ``given`` must agree with. A group that owns none but has progress rows
    (it handed its versions back) must be given the count: its rows only say at least how
    many (a worker writes a partition's row once it gets a message of it; an idle partition
    has none), and a count too low or too high would apply events again. A group with
    nothing recorded takes ``given``, or else the count other groups' versions record for
    ``topic``, or else ``default``. ``published``: the count the relay
    publishes ``topic`` with (its cursor), when known: the relay never changes it, so it is
    the workers' count, and any other count given or recorded is refused. Locks the progress
    rows."""
    owner = stream_owner(group)
    kept = recorded_partitions(store, group, topic, lock=True)
    owned = [r for r in versions if r.owner == owner and r.topic == topic and r.partitions]
    counts = sorted({r.partitions for r in owned if r.partitions is not None})
    if len(counts) > 1:
        listed = ", ".join(f"{r.name} v{r.version}: {r.partitions}" for r in owned)
        raise HandoverRefused(
            f"the versions {owner} owns record different partition counts for {topic} "
            f"({listed}), so which one its workers run with is unknown: hand them to the "
            f"runner (daybook projections handover NAME... --to runner), then to a new "
            f"group (--to stream:NEWGROUP --partitions N, N the topic's partitions) and run "
            f"its workers; nothing was handed over"
        )
    if published is not None:
        if counts and counts[0] != published:
            raise HandoverRefused(
                f"the versions {owner} owns record {counts[0]} partitions for {topic}, but "
                f"the relay publishes it with {published} (its cursor says so): hand them to "
                f"the runner (daybook projections handover NAME... --to runner) and then to "
                f"the group again; nothing was handed over"
            )
        if kept is not None and kept > published:
            raise HandoverRefused(
                f"{owner} has progress rows for {kept} partitions of {topic}, but the relay "
                f"publishes it with {published} (its cursor says so): hand the versions to "
                f"a new group; nothing was handed over"
            )
        if given is not None and given != published:
            raise HandoverRefused(
                f"the relay publishes {topic} with {published} partitions (its cursor says "
                f"so), but --partitions {given} was given: converted for {given} partitions, "
                f"the checkpoint would apply events again; run the handover without "
                f"--partitions (or with --partitions {published}); nothing was handed over"
            )
        return published
    if counts:
        recorded = counts[0]
        if given is not None and given != recorded:
            raise HandoverRefused(
                f"{owner} follows {topic} with {recorded} partitions (the versions it owns "
                f"record so), but --partitions {given} was given: converted for {given} "
                f"partitions, the checkpoint would apply events again and move positions "
                f"back; run the handover without --partitions (or with --partitions "
                f"{recorded}). A group's partition count cannot change: for {given} "
                f"partitions, hand the versions to the runner, then to a group on a new "
                f"--topic. Nothing was handed over"
            )
        return recorded
    if kept is not None:
        if given is None:
            raise HandoverRefused(
                f"{owner} owns no version that records its partition count for {topic}, and "
                f"its progress rows only say it has at least {kept}: give --partitions N, the "
                f"partition count of {topic} its workers run with; nothing was handed over"
            )
        if given < kept:
            raise HandoverRefused(
                f"{owner} has progress rows for {kept} partitions of {topic}, but "
                f"--partitions {given} was given: give the partition count of {topic} its "
                f"workers run with; nothing was handed over"
            )
        return given
    if given is None:
        # A group new to the topic, before any relay ran: the versions other groups own
        # say how many partitions the topic has (the default would make this group's
        # workers, started with that count, be refused, and its rows refuse it after).
        elsewhere = sorted(
            {
                r.partitions
                for r in versions
                if r.topic == topic and r.partitions and r.state.writable
            }
        )
        if len(elsewhere) > 1:
            raise HandoverRefused(
                f"versions other groups own record different partition counts for {topic} "
                f"({', '.join(map(str, elsewhere))}): give --partitions N, the partition count "
                f"of {topic}; nothing was handed over"
            )
        if elsewhere:
            return elsewhere[0]
    return default if given is None else given


def _last_events(log: EventLog, position: int, partitions: int, after: int = 0) -> list[int]:
    """Per partition, the last event after ``after`` and at or before ``position`` that went
    to it (0: none)."""
    partition = partition_of(partitions)
    last = [0] * partitions
    while after < position:
        raw = log.scan(after, min(_CHUNK * 4, position - after))
        if not raw:
            break
        for event_position, _topic, originator_id, _version, _state in raw:
            if event_position > position:
                break
            last[partition(originator_id)] = event_position
        after = raw[-1][0]
    return last


def _bring(
    log: EventLog,
    store: ReadStore,
    projection: Projection,
    record: VersionRecord,
    starts: Sequence[int],
    target: int,
    partitions: int,
    limits: Sequence[int] | None = None,
) -> int:
    """Apply, per partition q, the events after ``starts[q]`` up to ``target`` (or up to
    ``limits[q]``): what a partition vector lacks to reach a position (or another vector)."""
    partition = partition_of(partitions)
    ends = list(limits) if limits is not None else [target] * partitions

    def wanted(event: LogEvent) -> bool:
        q = partition(event.originator_id)
        return starts[q] < event.position <= ends[q]

    return _apply(log, store, projection, record, min(starts), max(ends), wanted)


def _bring_after(
    log: EventLog,
    store: ReadStore,
    projection: Projection,
    record: VersionRecord,
    position: int,
    target: Sequence[int],
    partitions: int,
) -> int:
    """Apply, per partition q, the events after ``position`` up to ``target[q]``: what a
    log position lacks to reach a partition vector."""
    partition = partition_of(partitions)

    def wanted(event: LogEvent) -> bool:
        return event.position <= target[partition(event.originator_id)]

    return _apply(log, store, projection, record, position, max(target), wanted)


def _apply(
    log: EventLog,
    store: ReadStore,
    projection: Projection,
    record: VersionRecord,
    after: int,
    until: int,
    wanted: Callable[[LogEvent], bool],
) -> int:
    slot = Slot(projection, record, RowCache(projection, 50_000))
    count = 0
    while after < until:
        events = [e for e in log.read(after, _CHUNK) if e.position <= until]
        if not events:
            break
        rows = BatchRows(slot, store)
        chosen = [e for e in events if wanted(e)]
        _, _, failure = apply_careful(slot, rows, chosen, 0)
        if failure is not None:
            raise HandoverRefused(
                f"{projection.name} v{projection.version} cannot apply event "
                f"{failure.event.type} at position {failure.event.position}: "
                f"{failure.error.strip().splitlines()[-1]}; nothing was handed over"
            )
        rows.flush()
        rows.merge_into_cache()
        count += len(chosen)
        after = events[-1].position
    return count
