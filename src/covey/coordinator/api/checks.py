"""``GET /v1/miners/{id}/checks``: the failed checks of a miner, with their evidence."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request

from covey.coordinator.api.accounts import MinerIdPath, billing_of
from covey.coordinator.ledger.penalties import failed_checks

router = APIRouter()


@router.get("/v1/miners/{miner_id}/checks")
async def miner_checks(miner_id: MinerIdPath, request: Request,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100
                       ) -> dict[str, object]:
    """The miner's failed checks, newest first: ``kind`` (``trial``, ``sampled``,
    ``usage``), the job, the validator, the verdict (reasons and figures), the job's signed
    receipt when it was settled, and µcr ``slashed`` / ``to_validator`` / ``refunded``.
    Public, like the ledger: who paid is left out."""
    bank = billing_of(request).bank
    rows = await asyncio.to_thread(failed_checks, bank, miner_id, limit)
    return {"object": "list", "data": [
        {"id": r["check_id"], **{k: v for k, v in r.items()
                                 if k not in ("account", "check_id")}} for r in rows]}
