"""A service's own classes never take the place of daybook's: a command, a read method or an
event type whose name another module's class has is refused where it is defined, naming the
owner. (Before, the check compared class names only: a service's ``Transfer`` command
replaced the money transfer behind ``POST /v1/commands/transfer``, and a service's
``Account.Opened`` event was fed to the account projections, which stopped on it.)"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from daybook import open_ledger, run_projections
from daybook.domain.accounts import Account
from daybook.domain.accounts import Transfer as MoneyTransfer
from daybook.domain.commands import command_named
from daybook.domain.errors import DomainError
from daybook.domain.events import readable
from tests.unit.registries import registries_restored


@pytest.fixture
def registries() -> Iterator[None]:
    """Whatever a test defines leaves the registries as they were."""
    with registries_restored(modules="shop_"):
        yield


def define(name: str, source: str) -> types.ModuleType:
    """Run ``source`` as the module ``name`` (as a service's import of it would)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


LOYALTY = """
from daybook.domain.commands import Amount, Command, Text

class Transfer(Command):
    member: Text
    points: Amount

    def handle(self, aggregates):
        return {}
"""


def test_a_command_named_like_daybooks_is_refused(registries: None) -> None:
    with pytest.raises(TypeError, match=r"command name 'transfer' is taken by daybook.domain"):
        define("shop_loyalty", LOYALTY)
    assert command_named("transfer") is MoneyTransfer


def test_a_command_given_its_own_name_is_registered(registries: None) -> None:
    source = LOYALTY.replace("points: Amount", "points: Amount\n    name = 'transfer_points'")
    module = define("shop_loyalty_named", source)
    assert command_named("transfer_points") is module.Transfer
    assert command_named("transfer") is MoneyTransfer


MEMBERS = """
from daybook.domain.events import LedgerAggregate

class Member(LedgerAggregate):
    read_as = "account"

    class Joined(LedgerAggregate.Created):
        email: str
"""


@pytest.mark.parametrize("name", ["Member", "Account"])
def test_a_read_method_taken_by_daybook_is_refused(registries: None, name: str) -> None:
    """(An aggregate named ``Account`` is refused first for its event types.)"""
    with pytest.raises(
        TypeError, match=r"(read method 'account'|event type .*) is taken by daybook"
    ):
        define(f"shop_members_read_{name}", MEMBERS.replace("Member", name))
    assert readable()["account"] is Account


LOGINS = """
from daybook.domain.events import LedgerAggregate

class Account(LedgerAggregate):
    class Opened(LedgerAggregate.Created):
        email: str
"""


def test_an_event_type_daybook_uses_is_refused(registries: None) -> None:
    with pytest.raises(TypeError, match=r"event type 'Account.Opened' is taken by daybook.domain"):
        define("shop_logins", LOGINS)


def test_the_same_module_run_again_defines_its_classes_again(registries: None) -> None:
    """A reload is not a clash: the same module and class names."""
    source = MEMBERS.replace('read_as = "account"', 'read_as = "member"')
    first = define("shop_members_reloaded", source)
    second = define("shop_members_reloaded", source)
    assert first.Member is not second.Member
    assert readable()["member"] is second.Member


JOINING = """
from uuid import NAMESPACE_URL, uuid5

from daybook.domain.commands import Command, Text
from daybook.domain.events import LedgerAggregate

class Member(LedgerAggregate):
    class Joined(LedgerAggregate.Created):
        email: str

        def apply(self, member):
            member.email = self.email

class JoinShop(Command):
    email: Text

    def handle(self, aggregates):
        member_id = uuid5(NAMESPACE_URL, "member:" + self.email)
        aggregates.add(Member._create(Member.Joined, id=member_id, email=self.email))
        return {}
"""


def test_daybooks_read_models_keep_serving_beside_a_services_aggregate(
    registries: None, tmp_path: Path
) -> None:
    """A service aggregate with names of its own writes to the same log as the accounts:
    the account projections pass over its events."""
    shop = define("shop_joining", JOINING)
    with (
        open_ledger(f"sqlite:///{tmp_path}/ledger.db") as ledger,
        run_projections(ledger) as runner,
    ):
        ledger.execute(shop.JoinShop("ann@example.com"))
        account = ledger.open_account("bob", "EUR").account_id
        receipt = ledger.deposit(account, 100)
        row = runner.views.balance(account, min_position=receipt.position, timeout=10.0)
        assert row is not None and row.balance == 100


def test_a_refusal_code_daybook_uses_is_refused(registries: None) -> None:
    """A replayed refusal is rebuilt as the class of its code: a service's class taking
    ``insufficient_funds`` turned daybook's replayed refusals into the service's, and
    ``except InsufficientFunds`` missed them."""
    from daybook.domain.accounts import InsufficientFunds

    source = (
        "from daybook.domain.errors import DomainError\n\n"
        "class OutOfPoints(DomainError):\n    code = 'insufficient_funds'\n"
    )
    with pytest.raises(TypeError, match=r"refusal code 'insufficient_funds' is taken by daybook"):
        define("shop_points", source)
    replayed = DomainError.from_record({"code": "insufficient_funds", "message": "m"})
    assert type(replayed) is InsufficientFunds


def test_a_refusal_replayed_before_its_class_is_imported_takes_the_class_then(
    registries: None,
) -> None:
    before = DomainError.from_record({"code": "points_expired", "message": "m"})
    assert before.code == "points_expired"
    module = define(
        "shop_points_later",
        "from daybook.domain.errors import DomainError\n\n"
        "class PointsExpired(DomainError):\n    code = 'points_expired'\n",
    )
    after = DomainError.from_record({"code": "points_expired", "message": "m"})
    assert type(after) is module.PointsExpired


SHADOWED = """
from daybook.domain.commands import Command, Sku

class {name}(Command):
    sku: Sku

    def handle(self, aggregates):
        return {{}}
"""


@pytest.mark.parametrize("name", ["Inventory", "Submit", "Head"])
def test_a_command_named_like_a_method_of_the_ledger_is_refused(
    registries: None, name: str
) -> None:
    """``ledger.inventory("SKU-1")`` is the read: a service's ``Inventory`` command was
    accepted, and called by its name it read the stock, applied nothing and said nothing."""
    with pytest.raises(TypeError, match=rf"command name '{name.lower()}' is .* on the ledger"):
        define(f"shop_shadowed_{name}", SHADOWED.format(name=name))


def test_a_read_method_named_like_a_command_is_refused(registries: None) -> None:
    with pytest.raises(TypeError, match=r"read method 'transfer' is the name of the command"):
        define("shop_read_transfer", MEMBERS.replace('read_as = "account"', 'read_as = "transfer"'))


@pytest.mark.parametrize("read_as", ["head", "submit", "execute", "health"])
def test_a_read_method_named_like_a_method_of_the_ledger_is_refused(
    registries: None, read_as: str
) -> None:
    """The ledger's own method would win: the aggregate's read could never be reached."""
    source = MEMBERS.replace('read_as = "account"', f'read_as = "{read_as}"')
    with pytest.raises(TypeError, match=rf"read method '{read_as}' is .* on the ledger"):
        define(f"shop_read_{read_as}", source.replace("Member", f"Member_{read_as}"))


@pytest.mark.parametrize("code", ["unavailable", "stale_read", "rate_limited", "not_found"])
def test_a_refusal_code_that_is_no_refusal_is_refused(registries: None, code: str) -> None:
    """A service's refusal coded ``unavailable`` was answered 503 (``rate_limited`` 429,
    ``not_found`` 404): a client took a business refusal for an outage and retried it for
    ever. (``stale_read``: the read models' "not yet".)"""
    import daybook.infrastructure.http.problems  # noqa: F401  (reserves the HTTP face's codes)

    source = (
        "from daybook.domain.errors import DomainError\n\n"
        f"class Nope(DomainError):\n    code = {code!r}\n"
    )
    with pytest.raises(TypeError, match=rf"refusal code '{code}' is the .*'s, not a refusal's"):
        define(f"shop_code_{code}", source)


@pytest.mark.parametrize(
    "body", ["pass", "code = InsufficientFunds.code"], ids=["kept", "repeated"]
)
def test_a_refusal_that_keeps_its_parents_code_leaves_it_to_the_parent(
    registries: None, body: str
) -> None:
    from daybook.domain.accounts import InsufficientFunds

    define(
        "shop_points_kind",
        "from daybook.domain.accounts import InsufficientFunds\n\n"
        f"class NotEnoughPoints(InsufficientFunds):\n    {body}\n",
    )
    replayed = DomainError.from_record({"code": "insufficient_funds", "message": "m"})
    assert type(replayed) is InsufficientFunds


BADGES = """
from typing import Any
from uuid import NAMESPACE_URL, uuid5

from daybook.domain.commands import Aggregates, Command, Text
from daybook.domain.events import LedgerAggregate


class Badge(LedgerAggregate):
    flat_state = True
    read_as = "shop_badge"

    class Given(LedgerAggregate.Created):
        holder: str

        def apply(self, badge: "Badge") -> None:
            badge.holder = self.holder

    def view(self) -> str:
        return self.holder


class GiveBadge(Command):
    holder: Text

    def handle(self, aggregates: Aggregates) -> dict[str, Any]:
        badge_id = uuid5(NAMESPACE_URL, f"badge:{self.holder}")
        aggregates.add(Badge._create(Badge.Given, id=badge_id, holder=self.holder))
        return {}
"""


def test_a_module_undone_can_be_defined_and_used_again() -> None:
    """A module-scoped fixture is set up again when a process runs its module's tests in two
    parts: the classes defined the first time must not stay cached by their topics (CI
    failed with eventsourcing's "Refusing to cache ... already registered for topic")."""
    for _ in range(2):
        with registries_restored(modules="shop_"):
            module = define("shop_badges", BADGES)
            with open_ledger("memory://", group_commit=False) as ledger:
                ledger.execute(module.GiveBadge("ann"))
                ledger.execute(module.GiveBadge("bob"))
