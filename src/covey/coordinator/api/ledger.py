"""``GET /v1/ledger/head``: the ledger's chain head, signed by the coordinator."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from covey.coordinator.api.accounts import billing_of

router = APIRouter()


@router.get("/v1/ledger/head")
async def ledger_head(request: Request) -> dict[str, object]:
    """The hash chain's head: ``seq`` (entries so far), ``hash`` (hex SHA-256 of the last
    entry, chained to all before it), the coordinator's Ed25519 ``signature`` over
    ``b"covey-ledger-head-v1\\n"`` + ``f"{seq}\\n{hash}"`` and its public key
    ``coordinator`` (hex, as in ``/healthz``). Public: anyone may pin a head and later check
    that the ledger they audit (``covey ledger verify``) grew from it."""
    head = await asyncio.to_thread(billing_of(request).bank.ledger.head)
    return {"object": "ledger_head", "seq": head["seq"], "hash": head["hash"],
            "signature": head["signature"], "coordinator": head["public_key"]}
