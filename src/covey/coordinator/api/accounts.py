"""Accounts and money: sign-up, balance, transactions, transfers, quotes, miner earnings."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from covey.coordinator.api.requests import chat_job, completion_job
from covey.coordinator.billing import Billing
from covey.coordinator.errors import ApiError
from covey.coordinator.ledger import InsufficientFunds, LedgerError
from covey.coordinator.ledger.bank import user
from covey.coordinator.ledger.invites import MAX_CODE_CHARS, InvalidInvite
from covey.coordinator.link import encode_task
from covey.protocol import verify_action
from covey.protocol.openai import ChatCompletionRequest, CompletionRequest
from covey.protocol.openai_embeddings import EmbeddingRequest

router = APIRouter()


def billing_of(request: Request) -> Billing:
    return request.app.state.serving.billing


async def current_account(request: Request) -> str:
    """FastAPI dependency: the caller's account id (401 without a valid key)."""
    return await billing_of(request).authenticate(request)


Account = Annotated[str, Depends(current_account)]


class SignUpBody(BaseModel):
    """``POST /v1/accounts``'s optional body: an invite code from the network's operator."""

    model_config = ConfigDict(strict=True, extra="forbid")
    invite_code: str | None = Field(default=None, min_length=1, max_length=MAX_CODE_CHARS)


INVITE_REQUIRED = ("This network is invite-only: sign up with an invite code (the operator "
                   "makes them with `covey invite create`).")


async def _sign_up_body(request: Request) -> SignUpBody:
    """The body, where an empty one (today's clients send none) means no invite code.

    Raises:
        ApiError: 400 when it is not JSON or not a :class:`SignUpBody`.
    """
    raw = await request.body()
    if not raw.strip():
        return SignUpBody()
    try:
        return SignUpBody.model_validate(json.loads(raw))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested too deep
        raise ApiError(400, "We could not parse the JSON body of your request.",
                       code="invalid_json") from None


@router.post("/v1/accounts", status_code=201)
async def sign_up(request: Request) -> dict[str, object]:
    """Create an account; the API key in the answer is shown this once. With an invite code
    the account gets the code's grant; on an invite-only network a code is required.

    Errors: 403 ``invite_required`` (invite-only, no code), 403 ``invalid_invite`` (unknown
    or used-up code), 400 for a malformed body.
    """
    body = await _sign_up_body(request)
    if body.invite_code is None and request.app.state.config.invite_only:
        raise ApiError(403, INVITE_REQUIRED, param="invite_code", code="invite_required",
                       type="invalid_request_error")
    bank = billing_of(request).bank
    try:
        account_id, api_key = await asyncio.to_thread(bank.sign_up, body.invite_code)
    except InvalidInvite as exc:
        raise ApiError(403, str(exc), param="invite_code", code="invalid_invite",
                       type="invalid_request_error") from None
    balance = await asyncio.to_thread(bank.ledger.balance, user(account_id))
    return {"object": "account", "id": account_id, "api_key": api_key, "balance": balance}


@router.get("/v1/account")
async def account(request: Request, account_id: Account) -> dict[str, object]:
    """Balance, credits held in open escrows and usage by model, all in µcr."""
    bank = billing_of(request).bank

    def read() -> dict[str, object]:
        balance, held = bank.balance_and_held(account_id)
        return {"object": "account", "id": account_id, "balance": balance, "held": held,
                "usage": bank.usage_by_model(account_id), "unit": "µcr"}

    return await asyncio.to_thread(read)


@router.get("/v1/account/transactions")
async def transactions(request: Request, account_id: Account,
                       limit: Annotated[int, Query(ge=1, le=500)] = 50,
                       before: Annotated[int | None, Query(ge=1, le=2**62)] = None
                       ) -> dict[str, object]:
    """The account's transfers, newest first; pass ``before=<seq>`` for the next page."""
    ledger = billing_of(request).bank.ledger
    rows = await asyncio.to_thread(ledger.history, user(account_id), limit + 1, before)
    me = user(account_id)
    data = [{"seq": r["seq"], "kind": r["kind"], "amount": r["amount"],
             "direction": "out" if r["debit"] == me else "in",
             "counterparty": r["credit"] if r["debit"] == me else r["debit"],
             "created": int(r["created_us"]) / 1e6, "hash": r["hash"]}  # type: ignore[call-overload]
            for r in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit}


OP_KEY = r"^[^\x00-\x1f\x7f]+$"
"""An idempotency key a client chooses: no control characters (PostgreSQL's text holds no
NUL, and a key is shown back in histories and logs)."""


class TransferBody(BaseModel):
    """Send ``amount`` µcr to account ``to`` (a user's account id, or ``miner:<id>`` to fund
    a miner's stake); ``idempotency_key`` makes retries safe."""

    model_config = ConfigDict(strict=True, extra="forbid")
    to: str = Field(min_length=1, max_length=100)
    amount: int = Field(ge=1, le=2**62)
    idempotency_key: str = Field(min_length=1, max_length=100, pattern=OP_KEY)


@router.post("/v1/account/transfers")
async def transfer(body: TransferBody, request: Request, account_id: Account
                   ) -> dict[str, object]:
    """Move credits to another account."""
    bank = billing_of(request).bank
    if body.to == account_id:
        raise ApiError(400, "Cannot transfer to the same account.", param="to",
                       code="invalid_value")
    known = body.to.removeprefix("miner:") in request.app.state.registry.sessions or \
        await asyncio.to_thread(bank.account_exists, body.to)
    if not known:
        raise ApiError(404, f"No account '{body.to}'. Check the id: credits sent to an "
                       "account nobody holds would be lost.", param="to",
                       code="account_not_found")
    op = f"{account_id}:{body.idempotency_key}"
    try:
        applied = await asyncio.to_thread(bank.transfer, account_id, body.to, body.amount, op)
    except InsufficientFunds as exc:  # before LedgerError, its base class
        raise ApiError(402, f"Your balance ({exc.balance} µcr) is below {exc.needed} µcr.",
                       code="insufficient_quota", type="insufficient_quota") from None
    except LedgerError as exc:
        raise ApiError(400, str(exc), param="to", code="invalid_value") from None
    if not applied:
        first = await asyncio.to_thread(bank.ledger.entries_with_key_prefix, f"transfer:{op}:")
        if first and (int(first[0]["amount"]) != body.amount  # type: ignore[call-overload]
                      or str(first[0]["credit"]).removeprefix("user:") != body.to):
            raise ApiError(409, "This idempotency_key was used for a different transfer.",
                           param="idempotency_key", code="idempotency_conflict",
                           type="invalid_request_error")
    balance = await asyncio.to_thread(bank.ledger.balance, user(account_id))
    return {"object": "transfer", "applied": applied, "balance": balance}


@router.post("/v1/quote")
async def quote(request: Request, _account: Account) -> JSONResponse:
    """The maximum cost of a chat, completion or embeddings request body, without running
    it."""
    try:
        raw = json.loads(await request.body())
        if isinstance(raw, dict) and "input" in raw and "messages" not in raw \
                and "prompt" not in raw:
            from covey.coordinator.api.embeddings import quote_embeddings  # imports us

            embed = EmbeddingRequest.model_validate(raw)
            return JSONResponse(quote_embeddings(request.app.state.serving, embed))
        body = (ChatCompletionRequest.model_validate(raw) if isinstance(raw, dict)
                and "messages" in raw else CompletionRequest.model_validate(raw))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        raise ApiError(400, "We could not parse the JSON body of your request.",
                       code="invalid_json") from None
    job = chat_job(body) if isinstance(body, ChatCompletionRequest) else completion_job(body)
    encode_task(job)  # the same 400 as the endpoint for text JSON cannot carry
    prompt, completion, max_cost, price = request.app.state.serving.quote(job)
    return JSONResponse({"object": "quote", "model": job.model,
                         "max_prompt_tokens": prompt, "max_completion_tokens": completion,
                         "max_cost": max_cost, "unit": "µcr",
                         "price": {"prompt": price.prompt, "completion": price.completion,
                                   "per_tokens": 1_000_000}})


MinerIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$",
                                  description="A miner's id: its public key, lower-case hex.")]


@router.get("/v1/miners/{miner_id}/earnings")
async def earnings(miner_id: MinerIdPath, request: Request) -> dict[str, object]:
    """A miner's paid jobs, completion tokens, balance and stake (µcr)."""
    bank = billing_of(request).bank
    return {"object": "earnings", "miner": miner_id,
            **await asyncio.to_thread(bank.miner_earnings, miner_id)}


class MinerAction(BaseModel):
    """A miner's signed request on its own account: ``action`` is ``stake`` or ``unstake``,
    ``amount`` in µcr, ``op`` an idempotency key, ``ts`` Unix seconds (must be within 5
    minutes), ``signature`` Ed25519 by the miner's key over the rest
    (:func:`covey.protocol.sign_action`)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    action: Literal["stake", "unstake"]
    amount: int = Field(ge=1, le=2**62)
    op: str = Field(min_length=1, max_length=100, pattern=OP_KEY)
    ts: int = Field(ge=0, le=2**40)
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


@router.post("/v1/miners/{miner_id}/stake")
async def miner_stake(miner_id: MinerIdPath, body: MinerAction, request: Request
                      ) -> dict[str, object]:
    """Lock (``stake``) or start unbonding (``unstake``) a miner's credits. Unbonded credits
    that have waited out the unbonding period return to the miner's balance first."""
    if not verify_action(miner_id, {**body.model_dump(), "miner": miner_id}):
        raise ApiError(401, "The signature does not match this miner's key.",
                       code="invalid_signature", type="invalid_request_error")
    if abs(time.time() - body.ts) > 300:
        raise ApiError(400, "The action is older than 5 minutes; sign it again.",
                       param="ts", code="stale_action")
    bank = billing_of(request).bank

    def run() -> dict[str, object]:
        bank.release_unbonded(miner_id)
        if body.action == "stake":
            bank.stake(miner_id, body.amount, f"{miner_id}:{body.op}")
        else:
            bank.unstake(miner_id, body.amount, f"{miner_id}:{body.op}")
        return bank.miner_earnings(miner_id)

    try:
        result = await asyncio.to_thread(run)
    except InsufficientFunds as exc:
        raise ApiError(402, f"{exc.account} holds {exc.balance} µcr, {exc.needed} µcr needed.",
                       code="insufficient_quota", type="insufficient_quota") from None
    request.app.state.registry.set_stake(miner_id, int(result["staked"]))
    return {"object": "earnings", "miner": miner_id, **result}
