"""An extension (a Voucher aggregate, its commands and a projection) built as the README's
"Extending daybook" section says, and its mistakes: each fails its own command (or
projection), never the ledger or the commands it shares a batch with."""

from __future__ import annotations

import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.registries import registries_restored

VOUCHERS = textwrap.dedent(
    '''
    from collections.abc import Mapping
    from dataclasses import dataclass
    from typing import TYPE_CHECKING, Any
    from uuid import NAMESPACE_URL, UUID, uuid5

    from daybook.domain.commands import Aggregates, Amount, Command, Text, find_to_create
    from daybook.domain.errors import DomainError
    from daybook.domain.events import LedgerAggregate
    from daybook.domain.values import check_text


    class VoucherExists(DomainError):
        code = "voucher_exists"


    class VoucherNotFound(DomainError):
        code = "voucher_not_found"


    class VoucherRedeemed(DomainError):
        code = "voucher_redeemed"


    @dataclass(frozen=True)
    class VoucherView:
        code: str
        value: int
        redeemed: bool


    class Voucher(LedgerAggregate):
        flat_state = True
        key_name = "code"
        read_as = "voucher"

        if TYPE_CHECKING:
            code: str
            value: int
            redeemed: bool

        class Issued(LedgerAggregate.Created):
            code: str
            value: int

            def apply(self, voucher: "Voucher") -> None:
                voucher.code, voucher.value, voucher.redeemed = self.code, self.value, False

        class Redeemed(LedgerAggregate.Event):
            def apply(self, voucher: "Voucher") -> None:
                voucher.redeemed = True

        @classmethod
        def id_for(cls, key: Any) -> UUID:
            return uuid5(NAMESPACE_URL, f"voucher:{check_text(key, 'code')}")

        @classmethod
        def not_found(cls, key: Any) -> DomainError:
            return VoucherNotFound(f"no voucher has code {key!r}", code=key)

        def redeem(self) -> None:
            if self.redeemed:
                raise VoucherRedeemed(f"voucher {self.code!r} was redeemed already", code=self.code)
            self.trigger_event(self.Redeemed)

        def view(self) -> VoucherView:
            return VoucherView(self.code, self.value, self.redeemed)


    class IssueVoucher(Command):
        code: Text
        value: Amount

        def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
            if find_to_create(aggregates, Voucher, self.code) is not None:
                raise VoucherExists(f"voucher {self.code!r} exists already", code=self.code)
            voucher = Voucher._create(
                Voucher.Issued, id=Voucher.id_for(self.code), code=self.code, value=self.value
            )
            aggregates.add(voucher)
            return {}


    class IssueNamedVoucher(Command):
        """Issue a voucher; its receipt names the voucher's id, as ``open_account``'s names
        the account's."""

        code: Text
        value: Amount

        def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
            if find_to_create(aggregates, Voucher, self.code) is not None:
                raise VoucherExists(f"voucher {self.code!r} exists already", code=self.code)
            voucher = Voucher._create(
                Voucher.Issued, id=Voucher.id_for(self.code), code=self.code, value=self.value
            )
            aggregates.add(voucher)
            return {"voucher_id": voucher.id}


    class RedeemVoucher(Command):
        code: Text

        def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
            aggregates.get(Voucher, self.code).redeem()
            return {}


    class ExitingVoucherCheck(Command):
        code: Text

        def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
            raise SystemExit(f"no such voucher {self.code}")


    class InterruptingVoucherCheck(Command):
        code: Text

        def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
            raise KeyboardInterrupt(f"no such voucher {self.code}")
    '''
)


def _loaded(name: str, source: str) -> Iterator[types.ModuleType]:
    """``source`` run as the module ``name``, its registrations undone afterwards."""
    with registries_restored(modules=name):
        module = types.ModuleType(name)
        sys.modules[name] = module
        exec(compile(source, name, "exec"), module.__dict__)
        yield module


@pytest.fixture(scope="module")
def vouchers() -> Iterator[types.ModuleType]:
    yield from _loaded("daybook_test_vouchers", VOUCHERS)


@pytest.mark.parametrize("group_commit", [True, False])
def test_a_command_whose_receipt_names_its_own_field_is_not_told_replayed(
    vouchers: types.ModuleType, store_url: str, group_commit: bool
) -> None:
    """A handler "returns what its receipt names": an extension naming its new record's id
    (as ``open_account`` names ``account_id``) must get either a true receipt or an error
    with nothing written, and not turn a first application, or the built-in commands
    committed with it, into "replayed" answers (nor raise for a command it committed)."""
    from daybook import Receipt, open_ledger
    from daybook.domain.accounts import Deposit

    with open_ledger(store_url, group_commit=group_commit) as ledger:
        account = ledger.open_account(owner="ann", currency="EUR").account_id
        head = ledger.head()
        # Refused before anything is written, naming the field (it was applied, then
        # answered "replayed", or a TypeError for a command it had committed).
        with pytest.raises(TypeError, match="voucher_id") as refused:
            ledger.execute(vouchers.IssueNamedVoucher("V-1", 100, request_id="v-1"))
        assert ledger.head() == head, f"{refused.value!r} answered, yet the voucher was written"
        outcomes = ledger.submit(
            [Deposit(account, 5), vouchers.IssueNamedVoucher("V-2", 100), Deposit(account, 6)]
        )
        assert isinstance(outcomes[1], TypeError), outcomes
        deposits = [outcomes[0], outcomes[2]]
        assert all(isinstance(o, Receipt) for o in deposits), outcomes
        assert [getattr(o, "replayed", None) for o in deposits] == [False, False], outcomes
        assert ledger.account(account).balance == 11


@pytest.mark.parametrize(
    ("command", "raised_by_handler"),
    [("ExitingVoucherCheck", SystemExit), ("InterruptingVoucherCheck", KeyboardInterrupt)],
)
def test_a_handler_that_exits_fails_its_own_command_not_the_ledger(
    vouchers: types.ModuleType, store_url: str, command: str, raised_by_handler: type
) -> None:
    """A handler's mistake is its caller's: one that raises ``SystemExit`` (a helper that
    calls ``sys.exit``, ``argparse``'s ``error``) or ``KeyboardInterrupt`` itself (no signal
    ever raises it in the writer's thread) must not stop the group commit writer and close
    the ledger for every other caller."""
    from daybook import open_ledger

    with open_ledger(store_url) as ledger:
        account = ledger.open_account(owner="ann", currency="EUR").account_id
        with pytest.raises(RuntimeError) as raised:  # its command's failure, coded as a bug's
            ledger.execute(getattr(vouchers, command)("V-9"))
        assert isinstance(raised.value.__cause__, raised_by_handler), repr(raised.value)
        assert "no such voucher" in repr(raised.value.__cause__)
        ledger.deposit(account, 5)  # the ledger goes on for everyone else
        assert ledger.account(account).balance == 5


def test_an_extension_projection_that_cannot_apply_an_event_stops_alone(
    vouchers: types.ModuleType, tmp_path: object
) -> None:
    from daybook import open_ledger, projections
    from daybook.infrastructure.bootstrap import event_log_of
    from daybook.infrastructure.lifecycle import ServiceState
    from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
    from daybook.infrastructure.readmodels.location import open_store
    from daybook.infrastructure.readmodels.runner import ProjectionRunner
    from daybook.projections.model import Column, LogEvent, Projection, Rows, Table, event_type

    table = Table("vouchers", (Column("voucher_id"), Column("code"), Column("redeemed", "bigint")),
                  key=("voucher_id",))  # fmt: skip

    def issued(event: LogEvent, rows: Rows) -> None:
        rows.put("vouchers", {"voucher_id": event.originator_id, "code": event.data["code"],
                              "redeemed": 0})  # fmt: skip

    def redeemed(event: LogEvent, rows: Rows) -> None:
        row = rows.get("vouchers", (event.originator_id,))
        if row is None or row["code"] == "BAD":
            raise LookupError(f"cannot redeem {event.originator_id}")
        rows.put("vouchers", {**row, "redeemed": 1})

    voucher_list = Projection("vouchers", 1, (table,), {
        event_type(vouchers.Voucher.Issued): issued,
        event_type(vouchers.Voucher.Redeemed): redeemed,
    })  # fmt: skip
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        account = ledger.open_account(owner="ann", currency="EUR").account_id
        ledger.execute(vouchers.IssueVoucher("BAD", 1))
        ledger.execute(vouchers.RedeemVoucher("BAD"))
        ledger.deposit(account, 7)
        runner = ProjectionRunner(
            event_log_of(ledger), url, [projections.ACCOUNT_BALANCES, voucher_list]
        )
        runner.run_until_caught_up()
        assert runner.health().state is not ServiceState.FAILED
        runner.stop()
        store = open_store(url)
        try:
            catalog = VersionCatalog(store)
            stopped = catalog.version("vouchers", 1)
            assert stopped is not None and stopped.state is VersionState.STOPPED, stopped
            balances = catalog.version("account_balances", 1)
            assert balances is not None and balances.state is VersionState.LIVE
            assert balances.position == ledger.head()
        finally:
            store.close()


RECEIPTS = textwrap.dedent(
    '''
    from collections.abc import Mapping
    from typing import Any
    from daybook.domain.commands import Aggregates, Command, Text, AccountId
    from daybook.domain.accounts import Account


    class TouchLinked(Command):
        """Deposits 1 and returns ``linked`` (a linked list's field, not a command's)."""
        account_id: AccountId

        def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
            aggregates.get(Account, self.account_id).deposit(1)
            return {"linked": 5}


    class TouchNamed(Command):
        """Deposits 1 and returns a field no receipt names."""
        account_id: AccountId

        def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
            aggregates.get(Account, self.account_id).deposit(1)
            return {"voucher_id": "x"}


    class TouchRequestId(Command):
        """Deposits 1 and returns request_id, a field a handler may not fill."""
        account_id: AccountId

        def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
            aggregates.get(Account, self.account_id).deposit(1)
            return {"request_id": "not-the-lists"}


    class TouchNone(Command):
        account_id: AccountId

        def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
            aggregates.get(Account, self.account_id).deposit(1)
            return None
    '''
)


@pytest.fixture(scope="module")
def receipts() -> Iterator[types.ModuleType]:
    yield from _loaded("daybook_test_receipt_fields", RECEIPTS)


@pytest.mark.parametrize("group_commit", [True, False])
def test_linked_returned_by_a_handler_is_refused_before_anything_is_written(
    receipts: types.ModuleType, tmp_path: Path, group_commit: bool
) -> None:
    """``linked`` is a linked list's receipt field: a command returning it passed the check
    and failed after its commit, building the receipt."""
    from daybook import open_ledger

    with open_ledger(f"sqlite:///{tmp_path}/l.db", group_commit=group_commit) as ledger:
        account = ledger.open_account(owner="ann", currency="EUR").account_id
        head = ledger.head()
        with pytest.raises(TypeError) as raised:
            ledger.execute(receipts.TouchLinked(account, request_id="t-1"))
        assert ledger.head() == head, f"{raised.value!r} answered, yet the command was written"


def test_atomic_refuses_an_inner_command_returning_an_unnamed_field(
    receipts: types.ModuleType, tmp_path: Path
) -> None:
    """README: any other key fails that command with a TypeError naming it, nothing written;
    inside ``atomic`` the field was dropped without a word."""
    from daybook import open_ledger

    with open_ledger(f"sqlite:///{tmp_path}/l.db") as ledger:
        account = ledger.open_account(owner="ann", currency="EUR").account_id
        head = ledger.head()
        with pytest.raises(TypeError, match="voucher_id"):
            ledger.atomic([receipts.TouchNamed(account)])
        assert ledger.head() == head


def test_a_handler_returning_none_is_a_type_error(
    receipts: types.ModuleType, tmp_path: Path
) -> None:
    """Not a mapping: a ``TypeError`` saying so (an ``AttributeError`` from the check)."""
    from daybook import open_ledger

    with open_ledger(f"sqlite:///{tmp_path}/l.db") as ledger:
        account = ledger.open_account(owner="ann", currency="EUR").account_id
        with pytest.raises(TypeError, match="not a mapping of receipt fields"):
            ledger.execute(receipts.TouchNone(account))
        assert ledger.account(account).balance == 0


def test_atomic_refuses_an_inner_command_returning_request_id(
    receipts: types.ModuleType, tmp_path: Path
) -> None:
    """Alone, a handler returning ``request_id`` is refused before anything is written;
    inside ``atomic`` its value replaced the list's request id on its receipt, written."""
    from daybook import open_ledger

    with open_ledger(f"sqlite:///{tmp_path}/l.db") as ledger:
        account = ledger.open_account(owner="ann", currency="EUR").account_id
        with pytest.raises(TypeError, match="request_id"):
            ledger.execute(receipts.TouchRequestId(account))
        head = ledger.head()
        with pytest.raises(TypeError, match="request_id"):
            ledger.atomic([receipts.TouchRequestId(account)], request_id="list-1")
        assert ledger.head() == head
