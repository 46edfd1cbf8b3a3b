"""An asyncio face for the Ledger: commands go to the group committer without a thread each."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, overload
from uuid import UUID

from daybook.domain import commands
from daybook.domain.commands import Command
from daybook.domain.ledger import AccountView, Ledger, Receipt, StockView, _account_id, _receipt
from daybook.infrastructure.group_commit import GroupCommitter

P = ParamSpec("P")
T = TypeVar("T")


@overload
def _async_command_method(
    build: Callable[P, Command],
) -> Callable[Concatenate[AsyncLedger, P], Awaitable[Receipt]]: ...


@overload
def _async_command_method(
    build: Callable[P, Command], answer: Callable[[Receipt], T]
) -> Callable[Concatenate[AsyncLedger, P], Awaitable[T]]: ...


def _async_command_method(
    build: Callable[P, Command], answer: Callable[[Receipt], Any] = _receipt
) -> Callable[Concatenate[AsyncLedger, P], Any]:
    async def method(self: AsyncLedger, /, *args: P.args, **kwargs: P.kwargs) -> Any:
        return answer(await self._committer.submit_async(build(*args, **kwargs)))

    method.__name__ = build.__name__
    method.__doc__ = build.__doc__
    return method


class AsyncLedger:
    """``await ledger.transfer(a, b, 500)``: same commands and outcomes as ``Ledger``."""

    def __init__(self, ledger: Ledger) -> None:
        if not isinstance(ledger.committer, GroupCommitter):
            ledger.install_committer(GroupCommitter)
        assert isinstance(ledger.committer, GroupCommitter)
        self.ledger = ledger
        self._committer = ledger.committer

    async def submit(self, command: Command) -> Receipt:
        return await self._committer.submit_async(command)

    #: Open an account; returns its id (the original id when a request is replayed).
    open_account = _async_command_method(commands.open_account, _account_id)
    deposit = _async_command_method(commands.deposit)
    withdraw = _async_command_method(commands.withdraw)
    transfer = _async_command_method(commands.transfer)
    close_account = _async_command_method(commands.close_account)
    receive_stock = _async_command_method(commands.receive_stock)
    adjust_stock = _async_command_method(commands.adjust_stock)
    reserve_stock = _async_command_method(commands.reserve_stock)
    commit_reservation = _async_command_method(commands.commit_reservation)
    release_reservation = _async_command_method(commands.release_reservation)

    async def account(self, account_id: UUID) -> AccountView:
        return await asyncio.to_thread(self.ledger.account, account_id)

    async def inventory(self, sku: str) -> StockView:
        return await asyncio.to_thread(self.ledger.inventory, sku)
