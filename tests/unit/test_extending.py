"""The README's "Extending daybook" section runs as written: a new aggregate with two
commands and a projection, through the public registry, without touching daybook's code."""

from __future__ import annotations

import asyncio
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.registries import registries_restored

README = Path(__file__).resolve().parents[2] / "README.md"


def section_code() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Extending daybook") : text.index("## Layout")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def example() -> Iterator[types.SimpleNamespace]:
    """Each block as the file the README names, imported as its own module (events name
    their classes by module and name, so the aggregate must live in a module that can be
    imported again; and the projection's file imports what it uses, as written). Afterwards
    the registries and ``sys.modules`` are as they were: other tests take every class of a
    ``daybook.`` module for daybook's own."""
    blocks = section_code()
    assert len(blocks) == 3
    names: dict[str, object] = {}
    made = ("daybook.domain.coupons", "daybook.projections.coupons")
    with registries_restored(modules=made):
        for name, block in zip(made, blocks[:2], strict=True):
            module = types.ModuleType(name)
            sys.modules[name] = module
            exec(compile(block, str(README), "exec"), module.__dict__)
            names.update(module.__dict__)
        yield types.SimpleNamespace(**names)


def test_the_new_commands_and_read_method_are_registered(example: types.SimpleNamespace) -> None:
    from daybook.domain.commands import command_named, parameters
    from daybook.domain.events import readable

    assert command_named("issue_coupon") is example.IssueCoupon
    assert command_named("redeem_coupon") is example.RedeemCoupon
    assert [p.name for p in parameters(example.IssueCoupon)][:2] == ["code", "value"]
    assert readable()["coupon"] is example.Coupon


def test_the_use_block_runs_as_written(
    example: types.SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    exec(compile(section_code()[2], str(README), "exec"), dict(vars(example)))
    assert capsys.readouterr().out.strip() == "coupon_redeemed"


def test_the_ledger_offers_the_new_commands_by_name_too(example: types.SimpleNamespace) -> None:
    from daybook import open_async_ledger, open_ledger

    with open_ledger("memory://") as ledger:
        ledger.issue_coupon("SPRING", 500)  # type: ignore[attr-defined]
        assert ledger.coupon("SPRING") == example.CouponView("SPRING", 500, False)  # type: ignore[attr-defined]
        with pytest.raises(example.CouponExists):
            ledger.issue_coupon("SPRING", 700)  # type: ignore[attr-defined]
        with pytest.raises(example.CouponNotFound):
            ledger.redeem_coupon("AUTUMN")  # type: ignore[attr-defined]
        assert ledger.redeem_coupon("SPRING", request_id="r-1").command == "redeem_coupon"  # type: ignore[attr-defined]
        assert ledger.redeem_coupon("SPRING", request_id="r-1").replayed  # type: ignore[attr-defined]

    async def on_the_asyncio_face() -> object:
        async with open_async_ledger("memory://") as ledger:
            await ledger.issue_coupon("SUMMER", 900)  # type: ignore[attr-defined]
            return await ledger.coupon("SUMMER")  # type: ignore[attr-defined]

    assert asyncio.run(on_the_asyncio_face()) == example.CouponView("SUMMER", 900, False)
