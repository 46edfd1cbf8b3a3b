"""The messages the relay would publish for a ledger's log, for tests that drive the stream
applier directly (no broker): the relay's own planning, so the same envelopes, chains and
partitions."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from daybook import Ledger
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.streaming.relay import plan_messages
from daybook.infrastructure.streaming.worker import Message


class Stream:
    """A topic's partitions as the relay fills them, message offsets included."""

    def __init__(self, partitions: int, store: str | None = None) -> None:
        self.partitions = partitions
        #: The event store identity every message names (None: as an older relay sent them).
        self.store = store
        self.chain: tuple[int, ...] = (0,) * partitions
        self.position = 0
        self.offsets = [0] * partitions

    def publish(self, ledger: Ledger, batch_size: int = 200) -> list[Message]:
        """Everything the log holds after what was published before, in relay batches."""
        log = event_log_of(ledger)
        out: list[Message] = []
        while True:
            batch = log.notifications(self.position, batch_size)
            if not batch:
                return out
            planned, self.chain = plan_messages(batch, self.chain, log.mapper.decode_versioned)
            for partition, _key, value in planned:
                if self.store is not None:
                    value = orjson.dumps({**orjson.loads(value), "store": self.store})
                out.append(Message(partition, self.offsets[partition], value))
                self.offsets[partition] += 1
            self.position = batch[-1].id


def of_partitions(messages: Sequence[Message], *partitions: int) -> list[Message]:
    return [m for m in messages if m.partition in partitions]
