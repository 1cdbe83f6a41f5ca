"""Invite codes: how a test network lets in only the people its operator chose.

The operator makes codes with ``covey invite create`` (straight on the coordinator's
database, so it works while the coordinator runs); a sign-up spends one use of a code. Codes
are random 128-bit strings, so like API keys they are stored only as SHA-256 hashes (a slow
password hash protects low-entropy secrets, which these are not).
"""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import Connection, Engine, insert, update

from covey.coordinator.ledger.schema import invites
from covey.coordinator.ledger.store import LedgerError

CODE_PREFIX = "inv-"
MAX_CODE_CHARS = 100
"""Longest string worth hashing as a code (ours are 26 characters); longer is a 400."""


class InvalidInvite(LedgerError):
    """The invite code is unknown or all its uses are spent."""


def hash_code(code: str) -> str:
    """SHA-256 hex of an invite code, as stored."""
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()


def create_invite(engine: Engine, grant: int | None = None, uses: int = 1) -> str:
    """Store a new invite code and return it (shown this once; only its hash is kept).

    ``grant``: µcr each account signed up with it receives (None: the coordinator's faucet
    grant at sign-up time; 0: nothing); ``uses``: how many sign-ups it allows.

    Raises:
        ValueError: ``uses`` < 1 or ``grant`` < 0.
    """
    if uses < 1:
        raise ValueError("an invite needs at least one use")
    if grant is not None and grant < 0:
        raise ValueError("an invite's grant cannot be negative")
    code = CODE_PREFIX + secrets.token_urlsafe(16)
    with engine.begin() as conn:
        conn.execute(insert(invites).values(code_hash=hash_code(code), grant=grant,
                                            max_uses=uses, used=0,
                                            created_us=time.time_ns() // 1000))
    return code


def claim(conn: Connection, code: str) -> int | None:
    """Spend one use of ``code`` inside the caller's transaction; returns its grant (µcr, or
    None for the faucet's).

    The use is taken by one conditional UPDATE, so of two sign-ups racing for a code's last
    use exactly one wins (PostgreSQL re-checks ``used < max_uses`` on the row it waited
    for; SQLite's write transactions run one at a time). If the caller's transaction rolls
    back, the use is given back with it.

    Raises:
        InvalidInvite: no such code, or its uses are spent.
    """
    digest = hash_code(code)
    taken = conn.execute(
        update(invites)
        .where(invites.c.code_hash == digest, invites.c.used < invites.c.max_uses)
        .values(used=invites.c.used + 1)
        .returning(invites.c.grant)).first()
    if taken is None:
        raise InvalidInvite("This invite code is unknown or has been used up. Ask the "
                            "network's operator for a new one.")
    return None if taken.grant is None else int(taken.grant)
