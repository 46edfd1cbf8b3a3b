"""The anchor for write benchmarks: a plain eventsourcing application doing transfers.

This is how the eventsourcing documentation builds a bank: decorated aggregate methods,
one ``save`` (one transaction) per transfer, aggregate cache on. daybook's figures are
compared with it in the same run, on the same database server.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event


class Overdrawn(Exception):
    pass


class BankAccount(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @event("Credited")
    def credit(self, amount: int) -> None:
        self.balance += amount

    def debit(self, amount: int) -> None:
        if amount > self.balance:
            raise Overdrawn
        self._debit(amount)

    @event("Debited")
    def _debit(self, amount: int) -> None:
        self.balance -= amount


class Bank(Application[UUID]):
    env = {"AGGREGATE_CACHE_MAXSIZE": "10000"}

    def open_account(self, owner: str, balance: int) -> UUID:
        account = BankAccount(owner)
        account.credit(balance)
        self.save(account)
        return account.id

    def transfer(self, source: UUID, destination: UUID, amount: int) -> None:
        debit: BankAccount = self.repository.get(source)
        credit: BankAccount = self.repository.get(destination)
        debit.debit(amount)
        credit.credit(amount)
        self.save(debit, credit)

    def balance(self, account_id: UUID) -> int:
        account: BankAccount = self.repository.get(account_id)
        return account.balance


def bank_env(params: Any, pool_size: int) -> dict[str, str]:
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": params.dbname,
        "POSTGRES_HOST": params.host,
        "POSTGRES_PORT": str(params.port),
        "POSTGRES_USER": params.user,
        "POSTGRES_PASSWORD": params.password,
        "POSTGRES_POOL_SIZE": str(pool_size),
    }
