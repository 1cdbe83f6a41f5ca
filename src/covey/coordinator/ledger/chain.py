"""The hash chain over ledger entries, and the coordinator's signature on its head.

``hash = SHA-256(prev_hash ‖ canonical JSON [seq, key, debit, credit, amount, kind,
created_us])``; the first entry's ``prev_hash`` is :data:`GENESIS`. Changing, removing or
reordering any row changes every later hash, so a tampered log no longer ends in the signed
head.
"""

from __future__ import annotations

import hashlib
from json.encoder import encode_basestring as _string  # json.dumps' own, ensure_ascii off

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

GENESIS = "0" * 64
_HEAD_DOMAIN = b"covey-ledger-head-v1\n"


def entry_hash(prev_hash: str, seq: int, key: str, debit: str, credit: str, amount: int,
               kind: str, created_us: int) -> str:
    """Hex SHA-256 of one entry chained to ``prev_hash``.

    The canonical JSON of the entry's list, written directly: the bytes of
    :func:`~covey.protocol.signing.canonical_json` (``tests/test_ledger.py`` holds them
    equal), at a third of the cost of ``json.dumps`` for the writer's four entries per job.
    """
    body = (f"[{int(seq)},{_string(key)},{_string(debit)},{_string(credit)},{int(amount)},"
            f"{_string(kind)},{int(created_us)}]")
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _head_message(seq: int, head_hash: str) -> bytes:
    return _HEAD_DOMAIN + f"{seq}\n{head_hash}".encode()


def sign_head(key: SigningKey, seq: int, head_hash: str) -> str:
    """Hex Ed25519 signature over (seq, hash) of the chain head."""
    return key.sign(_head_message(seq, head_hash)).signature.hex()


def verify_head(public_key: str, seq: int, head_hash: str, signature: str) -> bool:
    """True when ``signature`` by ``public_key`` (hex) covers (seq, hash)."""
    try:
        VerifyKey(bytes.fromhex(public_key)).verify(_head_message(seq, head_hash),
                                                    bytes.fromhex(signature))
    except (BadSignatureError, ValueError):
        return False
    return True
