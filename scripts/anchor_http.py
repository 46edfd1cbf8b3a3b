"""The anchor for the HTTP benchmark: the plain eventsourcing bank (``anchor_bank``) behind
the same web framework and server as ``daybook serve`` (FastAPI under uvicorn).

Written as the FastAPI documentation suggests for blocking code: plain ``def`` endpoints,
which FastAPI runs in its thread pool; one transaction per transfer, retried on an
optimistic concurrency conflict. Configured by ``ANCHOR_DATABASE_URL``.

    ANCHOR_DATABASE_URL=postgresql://... python -m uvicorn scripts.anchor_http:app --port 8001
"""

from __future__ import annotations

import os
from uuid import UUID

from eventsourcing.persistence import IntegrityError
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from daybook.infrastructure.urls import postgres_params
from scripts.anchor_bank import Bank, Overdrawn, bank_env

bank = Bank(env=bank_env(postgres_params(os.environ["ANCHOR_DATABASE_URL"]), pool_size=40))
app = FastAPI()


class NewAccount(BaseModel):
    owner: str
    balance: int


class Transfer(BaseModel):
    source: UUID
    destination: UUID
    amount: int


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/accounts")
def open_account(body: NewAccount) -> dict[str, str]:
    return {"account_id": str(bank.open_account(body.owner, body.balance))}


@app.post("/transfers")
def transfer(body: Transfer) -> JSONResponse:
    while True:
        try:
            bank.transfer(body.source, body.destination, body.amount)
            return JSONResponse({"ok": True})
        except Overdrawn:
            return JSONResponse({"code": "insufficient_funds"}, status_code=409)
        except IntegrityError:
            continue


@app.get("/accounts/{account_id}")
def balance(account_id: UUID) -> dict[str, int]:
    return {"balance": bank.balance(account_id)}
