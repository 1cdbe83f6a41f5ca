"""Ed25519 signing of the miner's hello (PyNaCl).

The signed message is ``b"covey-hello-v1\\n"`` + SHA-256 of the canonical JSON of the hello
without its signature (keys sorted, no spaces). Binding the whole body, not just the nonce,
means a relay cannot swap the models or slots a miner declared.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

_DOMAIN = b"covey-hello-v1\n"
_ACTION_DOMAIN = b"covey-miner-action-v1\n"


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def hello_digest(body: dict[str, Any]) -> bytes:
    """Bytes to sign for a hello ``body`` (a ``Hello`` dumped to a dict, ``signature`` ignored)."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    return _DOMAIN + hashlib.sha256(canonical_json(unsigned)).digest()


def sign_hello(key: SigningKey, body: dict[str, Any]) -> str:
    """Return the hex signature of ``body`` by ``key``."""
    return key.sign(hello_digest(body)).signature.hex()


def verify_hello(body: dict[str, Any]) -> bool:
    """True when ``body["signature"]`` is a valid signature by ``body["public_key"]``."""
    try:
        verify_key = VerifyKey(bytes.fromhex(body["public_key"]))
        verify_key.verify(hello_digest(body), bytes.fromhex(body["signature"]))
    except (BadSignatureError, ValueError, KeyError, TypeError):
        return False
    return True


def action_digest(body: dict[str, Any]) -> bytes:
    """Bytes a miner signs to act on its account (stake, unstake): the body without its
    signature, under a domain of its own so a signed hello can never pass for an action."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    return _ACTION_DOMAIN + hashlib.sha256(canonical_json(unsigned)).digest()


def sign_action(key: SigningKey, body: dict[str, Any]) -> str:
    """Hex signature of a miner action ``body`` by ``key``."""
    return key.sign(action_digest(body)).signature.hex()


def verify_action(public_key: str, body: dict[str, Any]) -> bool:
    """True when ``body["signature"]`` is ``public_key``'s signature over the action."""
    try:
        VerifyKey(bytes.fromhex(public_key)).verify(action_digest(body),
                                                    bytes.fromhex(body["signature"]))
    except (BadSignatureError, ValueError, KeyError, TypeError):
        return False
    return True
