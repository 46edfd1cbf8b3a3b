"""Generated ids: real version 4 UUIDs, unique, and never shared with a forked child."""

from __future__ import annotations

import os
import pickle
import uuid
from uuid import RESERVED_FUTURE, RFC_4122, UUID

from daybook.domain.ids import is_generated_request_id, new_id_text, new_request_id, new_uuid


def test_ids_are_version_4_uuids_like_the_standard_library_makes() -> None:
    for _ in range(1000):
        value = new_uuid()
        parsed = UUID(str(value))
        assert (value.version, value.variant) == (4, RFC_4122)
        assert parsed == value and hash(parsed) == hash(value)
        assert pickle.loads(pickle.dumps(value)) == value
        text = new_id_text()
        assert str(UUID(text)) == text and UUID(text).version == 4


def test_generated_request_ids_are_told_apart_from_every_other_id_by_their_variant() -> None:
    for _ in range(1000):
        text = new_request_id()
        parsed = UUID(text)
        assert str(parsed) == text and parsed.variant == RESERVED_FUTURE
        assert is_generated_request_id(text)
        # what callers use for request ids: never taken for the ledger's own
        assert not is_generated_request_id(str(uuid.uuid4()))
        assert not is_generated_request_id(new_id_text())
    sample = new_request_id()
    for text in ("", "r-1", sample.upper(), sample + "0", "x" + sample[1:]):
        assert not is_generated_request_id(text), text


def test_ids_do_not_repeat_across_many_refills() -> None:
    values = (
        {new_uuid() for _ in range(50_000)}
        | {UUID(new_id_text()) for _ in range(50_000)}
        | {UUID(new_request_id()) for _ in range(50_000)}
    )
    assert len(values) == 150_000


def test_a_forked_child_draws_fresh_randomness() -> None:
    new_uuid()  # the parent now holds unused random bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_uuid().bytes)
        os._exit(0)
    os.waitpid(pid, 0)
    child = UUID(bytes=os.read(read, 16))
    os.close(read)
    os.close(write)
    assert child != new_uuid()
