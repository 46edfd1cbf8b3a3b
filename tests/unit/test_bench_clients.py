"""A benchmark's client threads: one that dies fails the run (it would otherwise print a
figure measured by the clients left, and exit 0)."""

from __future__ import annotations

import pytest

from scripts import services


def test_a_client_that_raised_fails_the_join_after_every_client_ended() -> None:
    ended: list[int] = []

    def client(number: int) -> None:
        if number == 1:
            raise ConnectionError("the server went away")
        ended.append(number)

    threads = [services.Client(target=client, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    with pytest.raises(RuntimeError, match="the server went away") as raised:
        services.join_clients(threads)
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert sorted(ended) == [0, 2]
    fine = services.Client(target=ended.clear)
    fine.start()
    services.join_clients([fine])  # none failed: no error
    assert ended == []
