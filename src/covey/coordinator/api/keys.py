"""An account's API keys (list, make, revoke) and its usage over time, for the web page's
Account panel and scripts. Every route needs ``Authorization: Bearer <key>``."""

from __future__ import annotations

import asyncio
import unicodedata
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from covey.coordinator.api.accounts import Account, billing_of
from covey.coordinator.errors import ApiError
from covey.coordinator.ledger.keys import (
    KeyInfo,
    KeyNotFound,
    LastKey,
    TooManyKeys,
    hash_key,
    key_id,
    list_keys,
)

router = APIRouter()


def _shown(info: KeyInfo) -> dict[str, object]:
    return {"object": "api_key", "id": info.id, "name": info.name, "prefix": info.prefix,
            "created": info.created}


def _request_key_id(request: Request) -> str:
    """The public id of the key this (already authenticated) request carries."""
    return key_id(hash_key(request.headers.get("authorization", "").partition(" ")[2].strip()))


@router.get("/v1/account/keys")
async def keys_list(request: Request, account_id: Account) -> dict[str, object]:
    """The account's active keys, newest first: ``id`` (public), ``name``, ``prefix`` (the
    key's first 12 characters), ``created`` (Unix seconds) and ``current`` (true for the key
    of this request)."""
    engine = billing_of(request).bank.ledger.engine
    current = _request_key_id(request)
    rows = await asyncio.to_thread(list_keys, engine, account_id)
    return {"object": "list",
            "data": [{**_shown(info), "current": info.id == current} for _, info in rows]}


_UNSHOWN = ("Cc", "Cs", "Cf", "Co", "Cn", "Zl", "Zp")
"""Unicode categories a key's name may not hold (see ``NewKey``)."""


class NewKey(BaseModel):
    """``POST /v1/account/keys``: ``name``, 1 to 64 characters, to tell keys apart."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: str = Field(min_length=1, max_length=64)

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str) -> str:
        # Control characters (NUL above all, which PostgreSQL refuses) and lone surrogates
        # (which no database encodes) would fail in the database, not here; format
        # characters (a right-to-left override, zero-width spaces), line separators,
        # private-use and unassigned code points make a name that misleads or shows as
        # blank.
        if any(unicodedata.category(c) in _UNSHOWN for c in name) or not any(
                unicodedata.category(c)[0] in "LNPS" for c in name):
            raise ValueError("a name needs visible characters, and no control or invisible "
                             "ones")
        return name


@router.post("/v1/account/keys", status_code=201)
async def keys_create(body: NewKey, request: Request, account_id: Account
                      ) -> dict[str, object]:
    """Make another key for the account; the full key (``api_key``) is shown this once.

    Errors: 400 ``too_many_keys`` at 20 active keys.
    """
    bank = billing_of(request).bank
    try:
        api_key, info = await asyncio.to_thread(bank.new_key, account_id, body.name)
    except TooManyKeys as exc:
        raise ApiError(400, str(exc), code="too_many_keys") from None
    return {**_shown(info), "api_key": api_key}


@router.delete("/v1/account/keys/{public_id}")
async def keys_revoke(public_id: str, request: Request, account_id: Account
                      ) -> dict[str, object]:
    """Revoke a key by its id; it stops working at once (401).

    Errors: 404 ``key_not_found`` (no active key of this account has that id), 400
    ``last_key`` (the account's only active key).
    """
    bank = billing_of(request).bank
    try:
        await asyncio.to_thread(bank.revoke_key, account_id, public_id)
    except KeyNotFound:
        raise ApiError(404, f"No active API key '{public_id[:64]}' on this account. List "
                       "your keys with GET /v1/account/keys.", param="id",
                       code="key_not_found") from None
    except LastKey as exc:
        raise ApiError(400, str(exc), param="id", code="last_key") from None
    return {"object": "api_key", "id": public_id, "deleted": True}


@router.get("/v1/account/usage")
async def usage_by_day(request: Request, account_id: Account,
                       days: Annotated[int, Query(ge=1, le=366)] = 30) -> dict[str, object]:
    """Requests, tokens and µcr spent per UTC day and model over the last ``days`` days
    (today included), oldest first; days without usage are absent."""
    bank = billing_of(request).bank
    data = await asyncio.to_thread(bank.usage_by_day, account_id, days)
    return {"object": "list", "unit": "µcr", "days": days, "data": data}
