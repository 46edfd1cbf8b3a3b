"""What the ledger's model machine (``test_state_machine.LedgerMachine``) reaches: a class of
behaviour it never reaches is a class of defect it cannot catch. It runs on the memory store
and counts."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from daybook.domain.snapshots import LedgerSnapshot
from tests.contract.test_state_machine import LedgerMachine

SETTINGS = settings(
    max_examples=10,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _run_counting(monkeypatch: Any) -> dict[str, int]:
    seen = {"snapshot_loads": 0}
    mutate = LedgerSnapshot.mutate

    def counting_mutate(self: LedgerSnapshot, _: None) -> Any:
        seen["snapshot_loads"] += 1
        return mutate(self, _)

    monkeypatch.setattr(LedgerSnapshot, "mutate", counting_mutate)
    run_state_machine_as_test(LedgerMachine, settings=SETTINGS)
    return seen


def test_the_model_machine_loads_aggregates_from_snapshots(monkeypatch: Any) -> None:
    """Its ``cold_loads_match_replays`` holds a snapshot and its tail to a full replay after
    every step: only if aggregates cross snapshot boundaries within an example (it had
    loaded none at the default interval of 100)."""
    seen = _run_counting(monkeypatch)
    assert seen["snapshot_loads"] > 0, seen
