"""The projection-version state machine: every named move, legal and refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from daybook.infrastructure.readmodels.catalog import IllegalTransition, VersionState

LIVE, REBUILDING = VersionState.LIVE, VersionState.REBUILDING
STOPPED, RETIRED = VersionState.STOPPED, VersionState.RETIRED

Move = Callable[[VersionState], VersionState]

#: operation -> (the move, {state it may start from: where it ends}).
MOVES: dict[str, tuple[Move, dict[VersionState, VersionState]]] = {
    "activate": (VersionState.activated, {REBUILDING: LIVE}),
    "retire": (VersionState.retired, {LIVE: RETIRED, STOPPED: RETIRED, REBUILDING: RETIRED}),
    "stop": (VersionState.stopped, {LIVE: STOPPED, REBUILDING: STOPPED}),
    "resume serving": (lambda s: s.resumed(serving=True), {STOPPED: LIVE}),
    "resume building": (lambda s: s.resumed(serving=False), {STOPPED: REBUILDING}),
}

CASES = [(name, state) for name in MOVES for state in VersionState]


@pytest.mark.parametrize(("name", "state"), CASES, ids=[f"{n}-{s.value}" for n, s in CASES])
def test_each_move_goes_where_it_says_or_is_refused(name: str, state: VersionState) -> None:
    move, allowed = MOVES[name]
    if state in allowed:
        assert move(state) is allowed[state]
        return
    with pytest.raises(IllegalTransition) as refused:
        move(state)
    assert refused.value.code == "illegal_transition"
    assert refused.value.state is state
    assert state.value in str(refused.value)
    assert refused.value.operation in str(refused.value)


def test_a_new_version_is_built_before_it_serves_even_the_first() -> None:
    assert VersionState.registered() is REBUILDING


def test_only_live_and_rebuilding_versions_are_written() -> None:
    assert {s for s in VersionState if s.writable} == {LIVE, REBUILDING}


def test_states_are_stored_as_before() -> None:
    assert [s.value for s in VersionState] == ["live", "rebuilding", "stopped", "retired"]
