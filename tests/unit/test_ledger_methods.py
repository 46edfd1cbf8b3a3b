"""The ledger's methods come from the command registry, the same for both faces."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from daybook import AsyncLedger, Ledger
from daybook.domain.commands import parameters, registered
from daybook.domain.events import readable

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_methods_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_ledger_methods.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def builtin(cls: type) -> bool:
    """daybook's own (other tests register commands of their own, as services do)."""
    return cls.__module__.startswith("daybook.")


def test_every_registered_command_is_a_method_of_both_faces_with_its_arguments() -> None:
    for command_class in filter(builtin, registered()):
        if not command_class.generated_method:  # ``atomic``, the saga processor's commands
            continue
        expected = ["self", *(p.name for p in parameters(command_class))]
        for face in (Ledger, AsyncLedger):
            method = getattr(face, command_class.name)
            assert list(inspect.signature(method).parameters) == expected, command_class
            assert method.__doc__ == command_class.__doc__
        assert inspect.iscoroutinefunction(getattr(AsyncLedger, command_class.name))


def test_every_readable_aggregate_is_a_read_method_of_both_faces() -> None:
    for name, kind in readable().items():
        if not builtin(kind):
            continue
        assert list(inspect.signature(getattr(Ledger, name)).parameters) == ["self", kind.key_name]
        assert inspect.iscoroutinefunction(getattr(AsyncLedger, name))


def test_both_faces_have_the_same_methods() -> None:
    public = {n for n in dir(Ledger) if not n.startswith("_")}
    assert public == {n for n in dir(AsyncLedger) if not n.startswith("_")}
    assert {"execute", "read", "head", "close", "health"} <= public


def test_commands_that_lower_exposure_say_so() -> None:
    from daybook.domain.commands import command_named

    lowering = {"release_reservation", "void", "expire_hold", "expire_reservation", "cancel_saga"}
    raising = {"transfer", "withdraw", "hold", "capture", "reserve_stock", "deposit"}
    for name in lowering:
        assert command_named(name).reduces_risk, name
    for name in raising:
        assert not command_named(name).reduces_risk, name
