"""API keys: made, listed and revoked by their account; stored only as SHA-256 hashes.

A key's public ``id`` is the first 16 hex digits of its hash: safe to show (it does not help
to find the key) and stable, so the web page can name a key to revoke. Changes that depend
on how many keys an account has (the cap on new ones, never revoking the last one) lock the
account's active keys first, so two concurrent calls cannot both pass the check.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select, update

from covey.coordinator.ledger.schema import api_keys
from covey.coordinator.ledger.store import LedgerError

KEY_PREFIX = "sk-covey-"
MAX_ACTIVE_KEYS = 20
"""Active keys an account may hold at once."""
DEFAULT_NAME = "default"
"""The sign-up key's name, and how keys made before keys had names are shown."""
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def hash_key(api_key: str) -> str:
    """SHA-256 hex of an API key: keys are random 256-bit strings, so a fast hash suffices
    (a slow password hash protects low-entropy secrets, which these are not)."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def key_id(key_hash: str) -> str:
    """The public id of the key whose SHA-256 hex is ``key_hash``."""
    return key_hash[:16]


class TooManyKeys(LedgerError):
    """The account already holds :data:`MAX_ACTIVE_KEYS` active keys."""


class KeyNotFound(LedgerError):
    """No active key with that id belongs to the account."""


class LastKey(LedgerError):
    """Revoking this key would leave the account with no way in."""


@dataclass(frozen=True)
class KeyInfo:
    """An active key as its owner may see it: ``id`` (public, 16 hex digits), ``name``,
    ``prefix`` (its first 12 characters), ``created`` (Unix seconds)."""

    id: str
    name: str
    prefix: str
    created: float


def _info(key_hash: str, name: str, prefix: str, created_us: int) -> KeyInfo:
    return KeyInfo(key_id(key_hash), name or DEFAULT_NAME, prefix, created_us / 1e6)


def insert_key(conn: Connection, account_id: str, name: str) -> tuple[str, KeyInfo]:
    """Make a key for ``account_id`` inside the caller's transaction: (the key, shown this
    once; its info). No check on how many keys the account holds (see :func:`create_key`)."""
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest, created_us = hash_key(api_key), time.time_ns() // 1000
    conn.execute(insert(api_keys).values(key_hash=digest, account=account_id,
                                         prefix=api_key[:12], created_us=created_us,
                                         name=name))
    return api_key, _info(digest, name, api_key[:12], created_us)


def _lock_active(conn: Connection, account_id: str) -> list[str]:
    """Hashes of the account's active keys, locked until the transaction ends.

    On PostgreSQL a second caller waits here for the first to commit, then the fresh read
    below sees what the first did (READ COMMITTED takes a new snapshot per statement).
    SQLite's write transactions (BEGIN IMMEDIATE) already run one at a time.
    """
    active = (select(api_keys.c.key_hash)
              .where(api_keys.c.account == account_id, api_keys.c.revoked_us.is_(None))
              .order_by(api_keys.c.key_hash))
    conn.execute(active.with_for_update()).all()
    return list(conn.execute(active).scalars())


def create_key(engine: Engine, account_id: str, name: str) -> tuple[str, KeyInfo]:
    """A new key named ``name`` for ``account_id``: (the key, shown this once; its info).
    It grants nothing: the faucet pays an account once, at sign-up.

    Raises:
        TooManyKeys: the account already holds :data:`MAX_ACTIVE_KEYS` active keys.
    """
    with engine.begin() as conn:
        if len(_lock_active(conn, account_id)) >= MAX_ACTIVE_KEYS:
            raise TooManyKeys(f"This account already has {MAX_ACTIVE_KEYS} active API keys, "
                              "the most it may hold. Revoke one you no longer use first.")
        return insert_key(conn, account_id, name)


def list_keys(engine: Engine, account_id: str) -> list[tuple[str, KeyInfo]]:
    """The account's active keys, newest first, each as (its hash, its info)."""
    q = (select(api_keys.c.key_hash, api_keys.c.name, api_keys.c.prefix,
                api_keys.c.created_us)
         .where(api_keys.c.account == account_id, api_keys.c.revoked_us.is_(None))
         .order_by(api_keys.c.created_us.desc(), api_keys.c.key_hash))
    with engine.connect() as conn:
        return [(h, _info(h, name, prefix, created)) for h, name, prefix, created in
                conn.execute(q)]


def revoke_key(engine: Engine, account_id: str, public_id: str) -> str:
    """Revoke the account's active key whose id is ``public_id``; returns its hash.

    Raises:
        KeyNotFound: the account has no active key with that id (unknown, already revoked,
            or another account's: all look the same, so ids of others' keys leak nothing).
        LastKey: it is the account's only active key.
    """
    if not _KEY_ID.fullmatch(public_id):
        raise KeyNotFound(public_id)
    with engine.begin() as conn:
        active = _lock_active(conn, account_id)
        target = next((h for h in active if key_id(h) == public_id), None)
        if target is None:
            raise KeyNotFound(public_id)
        if len(active) == 1:
            raise LastKey("This is the account's last active API key: revoking it would "
                          "lock you out. Make another key first, then revoke this one.")
        conn.execute(update(api_keys).where(api_keys.c.key_hash == target)
                     .values(revoked_us=time.time_ns() // 1000))
    return target
