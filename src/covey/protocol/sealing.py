"""End-to-end encryption of jobs between a client and the miner that serves them (PyNaCl).

- Each miner process makes an X25519 key pair (its *box key*) and signs the public half with
  its Ed25519 identity (:func:`sign_box_key`); the coordinator hands that signed key to a
  client as a *route*, and the client checks the signature itself (:func:`verify_route`),
  so a coordinator cannot slip in a key of its own without also forging the miner identity.
- The client seals the job's content to the route (:func:`seal_job`): a fresh X25519 key
  pair per job, ``crypto_box`` (X25519 + XSalsa20-Poly1305) to the miner's box key. The
  box's precomputed key (``crypto_box_beforenm``, 32 bytes) is the job's *session key*.
- The miner seals each delta under the session key with ``crypto_secretbox`` and a random
  24-byte nonce (:func:`seal_delta`); ``crypto_box_afternm`` is ``crypto_secretbox`` under
  that key (NaCl's definition), so one key opens both directions.
- A validator re-checking a sealed job gets the session key sealed to *its* box key by the
  client (:func:`seal_key`, an anonymous ``crypto_box_seal``). With it the validator opens
  the very box the miner received and the very deltas the miner sent, both taken from the
  coordinator's copy, so neither the client nor the coordinator can show it a different
  request or answer than the miner's.

Every ciphertext travels as standard base64. Authentication failures raise
:class:`SealingError`; a box is never half-opened.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box, PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from covey.protocol.frames import ChatMessage, Resume, TokenId

_BOX_KEY_DOMAIN = b"covey-box-key-v1\n"
_EPHEMERAL = PublicKey.SIZE  # 32 bytes of the client's ephemeral public key lead a job box

__all__ = ["SealedContent", "SealingError", "b64", "open_delta", "open_job", "open_job_with",
           "open_key", "seal_delta", "seal_job", "seal_key", "sign_box_key", "unb64",
           "verify_route"]


class SealingError(Exception):
    """A box could not be opened (tampered with, sealed to another key, or malformed), or a
    route's box key is not signed by the miner it names."""


class SealedContent(BaseModel):
    """What a sealed job hides from the coordinator: the prompt (``messages``, ``prompt`` or
    ``prompt_ids``), stop strings and ids, and the resume point after a failover.

    Sampling settings travel outside the box (``Generate.params``): the coordinator needs
    ``max_tokens`` for the escrow and ``temperature`` / ``top_p`` to judge re-checks.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    prompt_ids: tuple[TokenId, ...] | None = Field(default=None, max_length=2**24)
    stop: tuple[str, ...] = Field(default=(), max_length=4)
    stop_ids: tuple[TokenId, ...] = Field(default=(), max_length=64)
    resume: Resume | None = None


def b64(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    """Bytes of standard base64 ``text``.

    Raises:
        SealingError: not valid base64.
    """
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SealingError("the ciphertext is not valid base64") from None


def sign_box_key(identity: SigningKey, box_key: PublicKey) -> str:
    """The miner's hex Ed25519 signature of its box key (``b"covey-box-key-v1\\n"`` + the
    32 key bytes)."""
    return identity.sign(_BOX_KEY_DOMAIN + bytes(box_key)).signature.hex()


def verify_route(miner: str, box_key: str, signature: str) -> PublicKey:
    """The box key of a route, once its signature by ``miner`` (hex Ed25519 key) checks.

    Raises:
        SealingError: the signature is not ``miner``'s, or a field is malformed.
    """
    try:
        key = bytes.fromhex(box_key)
        VerifyKey(bytes.fromhex(miner)).verify(_BOX_KEY_DOMAIN + key, bytes.fromhex(signature))
        return PublicKey(key)
    except (BadSignatureError, ValueError, TypeError, CryptoError):
        raise SealingError(f"the route's box key is not signed by miner {miner[:16]}: "
                           "refusing to seal to it") from None


def seal_job(box_key: PublicKey, content: SealedContent) -> tuple[str, bytes]:
    """Seal ``content`` to a miner's box key: (base64 of ephemeral key ‖ nonce ‖ box,
    the 32-byte session key)."""
    ephemeral = PrivateKey.generate()
    box = Box(ephemeral, box_key)
    sealed = box.encrypt(content.model_dump_json(exclude_defaults=True).encode())
    return b64(bytes(ephemeral.public_key) + bytes(sealed)), box.shared_key()


def _content(plain: bytes) -> SealedContent:
    try:
        return SealedContent.model_validate_json(plain)
    except ValidationError as exc:
        raise SealingError(f"the sealed job's content is malformed: {exc.errors()[0]['msg']}"
                           ) from None


def open_job(box_secret: PrivateKey, sealed: str) -> tuple[SealedContent, bytes]:
    """The miner's side of :func:`seal_job`: (content, session key).

    Raises:
        SealingError: tampered with, sealed to another key, or malformed.
    """
    raw = unb64(sealed)
    if len(raw) <= _EPHEMERAL:
        raise SealingError("the sealed job is too short to be a box")
    try:
        box = Box(box_secret, PublicKey(raw[:_EPHEMERAL]))
        plain = box.decrypt(raw[_EPHEMERAL:])
    except CryptoError:
        raise SealingError("the sealed job does not open: it was altered or sealed to "
                           "another miner's key") from None
    return _content(plain), box.shared_key()


def open_job_with(session_key: bytes, sealed: str) -> SealedContent:
    """Open a sealed job with its session key (a validator's side).

    Raises:
        SealingError: the key does not open it, or it is malformed.
    """
    raw = unb64(sealed)
    try:
        plain = SecretBox(session_key).decrypt(raw[_EPHEMERAL:])
    except (CryptoError, ValueError, TypeError):
        raise SealingError("the session key does not open the sealed job") from None
    return _content(plain)


def seal_delta(session_key: bytes, text: str, token_ids: tuple[int, ...]) -> str:
    """A delta's text and token ids under the session key (base64)."""
    body = json.dumps({"t": text, "i": list(token_ids)}, ensure_ascii=False,
                      separators=(",", ":")).encode()
    return b64(bytes(SecretBox(session_key).encrypt(body)))


def open_delta(session_key: bytes, sealed: str) -> tuple[str, tuple[int, ...]]:
    """(text, token ids) of a sealed delta.

    Raises:
        SealingError: tampered with, or sealed under another key.
    """
    try:
        body: Any = json.loads(SecretBox(session_key).decrypt(unb64(sealed)))
        text, ids = body["t"], tuple(int(i) for i in body["i"])
        if not isinstance(text, str):
            raise TypeError
    except (CryptoError, ValueError, KeyError, TypeError):
        raise SealingError("a sealed delta does not open under this job's key: the answer "
                           "was altered on its way") from None
    return text, ids


def seal_key(box_key: PublicKey, session_key: bytes) -> str:
    """The session key sealed anonymously to a validator's box key (base64)."""
    return b64(bytes(SealedBox(box_key).encrypt(session_key)))


def open_key(box_secret: PrivateKey, sealed: str) -> bytes:
    """The validator's side of :func:`seal_key`.

    Raises:
        SealingError: tampered with or sealed to another key.
    """
    try:
        key = SealedBox(box_secret).decrypt(unb64(sealed))
    except CryptoError:
        raise SealingError("the sealed session key does not open with this miner's key"
                           ) from None
    if len(key) != SecretBox.KEY_SIZE:
        raise SealingError("the sealed session key has the wrong length")
    return key
