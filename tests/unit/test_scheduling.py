"""The suite's own order under several processes (tests/scheduling.py)."""

from __future__ import annotations

from dataclasses import dataclass

from tests.scheduling import share_sizes, slow_first


@dataclass(frozen=True)
class Case:
    nodeid: str


def suite() -> tuple[list[Case], set[str], set[str]]:
    """Three files of fast tests, then one of slow tests on their own and one of slow tests
    that share a server, as tests/streaming and a browser module sit at the end."""
    items = [Case(f"tests/fast_{f}.py::t{n}") for f in range(3) for n in range(40)]
    alone = [Case(f"tests/outages.py::t{n}") for n in range(12)]
    together = [Case(f"tests/browser.py::t{n}") for n in range(4)]
    items += alone + together
    slow = {t.nodeid for t in alone + together}
    return items, slow, {t.nodeid for t in together}


def shares(items: list[Case], processes: int) -> list[list[Case]]:
    out, start = [], 0
    for size in share_sizes(len(items), processes):
        out.append(items[start : start + size])
        start += size
    return out


def test_the_shares_are_what_worksteal_hands_out_first() -> None:
    assert share_sizes(10, 3) == [3, 3, 4]
    assert sum(share_sizes(2950, 6)) == 2950


def test_every_share_starts_with_its_part_of_the_slow_tests_and_no_test_is_lost() -> None:
    items, slow, grouped = suite()
    ordered = slow_first(items, slow, grouped, 4)
    assert sorted(t.nodeid for t in ordered) == sorted(t.nodeid for t in items)
    counts = []
    for share in shares(ordered, 4):
        flags = [t.nodeid in slow for t in share]
        head = flags.index(False)
        assert not any(flags[head:]), "a share's slow tests come first"
        counts.append(head)
    # In file order one share held all 16; now 12 alone and 4 together are spread.
    assert sorted(counts) == [4, 4, 4, 4]


def test_slow_tests_sharing_a_fixture_stay_in_one_share_in_their_order() -> None:
    items, slow, grouped = suite()
    for share in shares(slow_first(items, slow, grouped, 3), 3):
        mine = [t.nodeid for t in share if t.nodeid in grouped]
        assert mine in ([], sorted(grouped, key=lambda i: int(i.rpartition("t")[2])))


def test_the_fast_tests_keep_their_order_and_one_process_changes_nothing() -> None:
    items, slow, grouped = suite()
    fast = [t for t in slow_first(items, slow, grouped, 5) if t.nodeid not in slow]
    assert fast == [t for t in items if t.nodeid not in slow]
    assert slow_first(items, slow, grouped, 1) == items
