"""faust-streaming's private internals that daybook relies on (written against 0.15.3).

faust types ``App.consumer`` as ``ConsumerT``, an interface that declares none of the names
used here: they belong to the concrete ``faust.transport.consumer.Consumer`` and to mode's
``Service`` underneath it. So the consumer is handled as ``Any`` at this boundary, and
``RELIED_ON`` (checked by tests/unit/test_compat.py) says what each name must be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, MutableMapping
from time import monotonic
from typing import Any

import faust
from faust.transport import consumer as faust_consumer
from faust.types import TP, Message

from daybook.infrastructure.compat import Internal, Kind


def drain_in_batches(app: faust.App, topic: str, handoff: asyncio.Queue[list[Message]]) -> None:
    """Hand ``topic``'s messages to the agent a whole fetch at a time, not one by one.

    faust's fetch loop (``Consumer._drain_messages``) delivers each message through
    ``wait_first(callback(message), suspend_flow.wait())`` (two new tasks), the Conductor's
    callback (a lock, flow control, decode, a queue put) and the stream's iterator (more loop
    turns and a processor per message), which capped the workers' rate even with an agent
    doing nothing. This replaces that loop on the app's
    consumer with the same loop minus the per-message delivery: read-offset and gap
    bookkeeping, ``broker_commit_every`` commits and the stop conditions are faust's, every
    message is tracked as pending (``track_message``, so that a rebalance's ``wait_empty``
    waits for the batch in flight to be applied and acknowledged), and the fetch is put on
    ``handoff`` (bounded: the loop waits while the agent is behind). faust still owns the
    group, assignment, rebalances (``getmany`` stops at a generation change or a paused flow,
    and seeks back to the committed offsets), acknowledgements and commits; messages of
    other topics go the ordinary way. Like faust's loop, messages read while the flow is
    suspended for a rebalance are left to that seek.

    The loop follows ``Consumer._drain_messages`` as installed, name for name: a faust
    upgrade must be compared against it (``RELIED_ON`` lists what it reads).
    """
    # Looked up here, not imported: this module then imports without it, and the compat
    # test can say what is missing.
    flag_fetching: str = faust_consumer.CONSUMER_FETCHING
    consumer: Any = app.consumer  # the concrete Consumer: see the module doc

    async def drain(fetcher: Any) -> None:  # faust's Fetcher service (its mode ``_stopped``)
        callback = consumer.callback
        getmany = consumer.getmany
        consumer_should_stop = consumer._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        read_offsets: MutableMapping[TP, int | None] = consumer._read_offset
        get_read_offset = read_offsets.__getitem__
        set_read_offset = read_offsets.__setitem__
        suspend_flow = consumer.suspend_flow
        suspended = suspend_flow.is_set
        acks_enabled_for = app.topics.acks_enabled_for
        track = consumer.track_message
        commit_every: int | None = consumer._commit_every
        diag = consumer.diag
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                diag.set_flag(flag_fetching)
                fetched: list[Message] = []
                await consumer.sleep(0)
                if not consumer.should_stop:
                    async for tp, message in getmany(timeout=1.0):
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # faust's "DROPPED MESSAGE": read before a seek back
                        if r_offset and offset - r_offset > 1 and acks_enabled_for(tp.topic):
                            await consumer._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and consumer._n_acked >= commit_every:
                            consumer._n_acked = 0
                            await consumer.commit()
                        if tp.topic != topic:
                            await consumer.wait_first(callback(message), suspend_flow.wait())
                        elif not suspended():
                            track(message)
                            fetched.append(message)
                        set_read_offset(tp, offset)
                    diag.unset_flag(flag_fetching)
                if fetched:
                    try:
                        await handoff.put(fetched)
                    except BaseException:
                        untrack(app, fetched)
                        raise
        except consumer.consumer_stopped_errors:
            if consumer.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if consumer.transport.app.should_stop:
                return
            raise
        finally:
            diag.unset_flag(flag_fetching)

    consumer._drain_messages = drain  # called by faust's Fetcher service


def untrack(app: faust.App, messages: Iterable[Message]) -> None:
    """Stop faust waiting for ``messages``: they will not be acknowledged by this worker.

    ``track_message`` puts a message in the consumer's pending set, and a rebalance
    (``wait_empty``) waits until that set is empty. ``Consumer.unacked`` is the set itself
    (typed read-only, a ``WeakSet`` in fact): discarding from it is how a message is dropped
    without acknowledging it (``ack`` would let its offset be committed). A dropped message
    comes again from the committed offset to whoever owns its partition.
    """
    pending: Any = app.consumer.unacked  # typed as a read-only Set: see above
    for message in messages:
        pending.discard(message)


def record_stream_inbound(app: faust.App, partitions: Iterable[TP]) -> None:
    """Tell faust's livelock check that events of ``partitions`` are being processed now.

    Every 2.5 commit intervals the consumer checks each assigned partition
    (``AIOKafkaConsumerThread.verify_event_path``): when the broker has messages beyond the
    consumer's position and no event of that partition entered a faust stream for
    ``stream_processing_timeout`` (or ever, once the worker is that old), it logs at ERROR
    that the stream has not started, or stopped, processing. It learns of events from the
    monitor's ``stream_inbound_time``, which only a ``faust.Stream`` fills
    (``Monitor.on_stream_event_in``); the agent's batches come from ``drain_in_batches``
    instead, so without this every busy partition looked stalled. Called as a batch starts,
    as faust records an event entering a stream: a batch taking longer than the timeout (a
    database outage waited out) is then reported as faust would report a slow event.
    """
    inbound: MutableMapping[TP, float] = app.monitor.stream_inbound_time
    now = monotonic()  # the clock the check compares with
    for tp in partitions:
        inbound[tp] = now


def customize_worker_consumer(app: faust.App, customize: Callable[[Any], None]) -> None:
    """Run ``customize`` on the aiokafka consumer faust builds, before it starts.

    faust builds its ``AIOKafkaConsumer`` in the consumer thread at start
    (``AIOKafkaConsumerThread._create_worker_consumer``), with some settings hard-coded
    (``fetch_max_wait_ms=1500``) that no faust setting reaches. This wraps that factory on
    the app's consumer thread; ``customize`` gets the consumer before ``start`` reads its
    settings. (``Any``: aiokafka ships no type information.)
    """
    consumer: Any = app.consumer  # a ThreadDelegateConsumer: see the module doc
    thread = consumer._thread  # faust.transport.drivers.aiokafka.AIOKafkaConsumerThread
    build = thread._create_worker_consumer

    def build_and_customize(transport: Any) -> Any:
        built = build(transport)
        customize(built)
        return built

    thread._create_worker_consumer = build_and_customize


_CONSUMER = "faust.transport.drivers.aiokafka:Consumer"
_FETCH_LOOP = "the new faust version's fetch loop (Consumer._drain_messages)"


def _loop_reads(name: str, **shape: Any) -> Internal:
    """A consumer attribute that ``drain_in_batches`` reads as faust's own loop does."""
    return Internal("faust-streaming", _CONSUMER, name, drain_in_batches, _FETCH_LOOP, **shape)


def start_failure(worker: faust.Worker) -> BaseException | None:
    """The error that ended ``worker``'s start, if its start failed (None if it started,
    or was stopped while starting).

    mode's ``Worker.execute_from_commandline`` runs the start in a future it keeps as
    ``_starting_fut``; when the start raises, it logs the error, shuts the worker down and
    exits, and the error is left only in that future."""
    starting: asyncio.Future[None] | None = worker._starting_fut
    if starting is None or not starting.done() or starting.cancelled():
        return None
    return starting.exception()


def stop_requested(worker: faust.Worker) -> bool:
    """Whether ``worker`` was told to stop by a signal (SIGTERM, SIGINT): mode's handler
    records when, in ``_signal_stop_time``, and schedules the stop."""
    return worker._signal_stop_time is not None


#: Every private faust name used above, with the shape daybook expects.
RELIED_ON: tuple[Internal, ...] = (
    _loop_reads(
        "_drain_messages",
        kind=Kind.COROUTINE_FUNCTION,
        parameters=("fetcher",),
        used_in="faust.transport.consumer:Fetcher",
    ),
    _loop_reads("_read_offset", on_instance=True, types=(MutableMapping,)),
    _loop_reads(
        "_add_gap",
        kind=Kind.COROUTINE_FUNCTION,
        parameters=("tp", "offset_from", "offset_to"),
    ),
    _loop_reads("_n_acked", on_instance=True, types=(int,)),
    _loop_reads("_commit_every", on_instance=True, types=(int, type(None))),
    _loop_reads("_stopped", on_instance=True, members=("is_set",)),
    _loop_reads(
        "callback", on_instance=True, kind=Kind.COROUTINE_FUNCTION, parameters=("message",)
    ),
    _loop_reads("suspend_flow", on_instance=True, members=("is_set", "wait")),
    _loop_reads("wait_first", kind=Kind.COROUTINE_FUNCTION),
    _loop_reads("consumer_stopped_errors", types=(tuple,)),
    _loop_reads("diag", on_instance=True, members=("set_flag", "unset_flag")),
    Internal(
        "faust-streaming",
        "faust.transport.consumer",
        "CONSUMER_FETCHING",
        drain_in_batches,
        _FETCH_LOOP,
        types=(str,),
    ),
    Internal(
        "faust-streaming",
        _CONSUMER,
        "unacked",
        untrack,
        "Consumer.unacked and Consumer.wait_empty",
        on_instance=True,
        members=("discard",),
    ),
    Internal(
        "faust-streaming",
        "faust.sensors.monitor:Monitor",
        "stream_inbound_time",
        record_stream_inbound,
        "what the new faust version's livelock check reads to tell that a stream processes",
        on_instance=True,
        types=(MutableMapping,),
        used_in="faust.transport.drivers.aiokafka:AIOKafkaConsumerThread.verify_event_path",
    ),
    Internal(
        "faust-streaming",
        _CONSUMER,
        "_thread",
        customize_worker_consumer,
        "ThreadDelegateConsumer.__init__",
        on_instance=True,
        members=("_create_worker_consumer",),
    ),
    Internal(
        "faust-streaming",
        "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread",
        "_create_worker_consumer",
        customize_worker_consumer,
        "how the new faust version builds its AIOKafkaConsumer",
        kind=Kind.FUNCTION,
        parameters=("transport",),
        used_in="faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._create_consumer",
    ),
    Internal(
        "faust-streaming",
        "mode.worker:Worker",
        "_starting_fut",
        start_failure,
        "how mode's Worker runs its start (a future that keeps the error a failed start raised)",
        types=(type(None), asyncio.Future),
        used_in="mode.worker:Worker.execute_from_commandline",
    ),
    Internal(
        "faust-streaming",
        "mode.worker:Worker",
        "_signal_stop_time",
        stop_requested,
        "how mode's Worker records a stop signal (None until one arrives)",
        types=(type(None), float),
        used_in="mode.worker:Worker._schedule_shutdown",
    ),
)
