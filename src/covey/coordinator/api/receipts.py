"""``GET /v1/receipts/{id}``: a request's receipt, signed by its miner, countersigned."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request

from covey.coordinator.api.accounts import Account, billing_of
from covey.coordinator.errors import ApiError

router = APIRouter()


@router.get("/v1/receipts/{job_id}")
async def get_receipt(job_id: Annotated[str, Path(max_length=100)], request: Request,
                      account: Account) -> dict[str, object]:
    """The receipt of one of the caller's requests (its id is the completion's ``id``):
    ``receipt`` (job id, miner, model hash, request and output SHA-256, usage),
    ``miner_signature``, ``coordinator`` (public key) and ``coordinator_signature``. Check
    it offline with ``covey receipts verify``. A sharded model's request has one receipt
    per shard (its job id is the chain session's, its request and output digests chain
    the digests of the activations the shard got and sent, its usage counts positions and
    steps): ``{"object": "receipt.shards", "shards": [...]}``.

    Raises:
        ApiError: 404 when no settled request of this account has that id.
    """
    bank = billing_of(request).bank
    found = await asyncio.to_thread(bank.receipt, job_id, account)
    if found is None:
        raise ApiError(404, f"No receipt for '{job_id}' in this account (receipts exist for "
                       "requests that finished).", code="receipt_not_found", param="id")
    return found
