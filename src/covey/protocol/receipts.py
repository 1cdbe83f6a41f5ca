"""Signed receipts: what a miner attests it did for a job, countersigned by the coordinator.

The miner signs ``b"covey-receipt-v1\\n"`` + SHA-256 of the receipt's canonical JSON; the
coordinator signs ``b"covey-countersign-v1\\n"`` + SHA-256 of the canonical JSON of the
receipt and the miner's signature. Anyone holding a receipt can re-check both offline
(``covey receipts verify``); changing any byte of it breaks a signature.
"""

from __future__ import annotations

import hashlib
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from covey.protocol.audio import Speak, Spoken, Transcribe, Transcribed
from covey.protocol.embed import Embed, Embedded
from covey.protocol.frames import Done, Generate, Receipt
from covey.protocol.image import Paint, Painted
from covey.protocol.score import Score, Scored
from covey.protocol.signing import canonical_json

__all__ = ["Receipt", "billed_units", "billed_work", "countersign", "output_digest",
           "request_digest",
           "sign_receipt",
           "verify_countersignature", "verify_receipt"]

_RECEIPT_DOMAIN = b"covey-receipt-v1\n"
_COUNTER_DOMAIN = b"covey-countersign-v1\n"


_MEDIA_FIELDS = {
    # What each media task's digest covers: all it asks, not the job id, the weights pin
    # or a failover's resume offset, so every miner of a request agrees.
    Transcribe: {"type", "model", "audio_bytes", "audio_sha256", "language", "prompt",
                 "temperature", "words"},
    Speak: {"type", "model", "input", "voice", "response_format", "speed", "seed"},
    Paint: {"type", "model", "prompt", "n", "width", "height", "seed", "steps"},
    Score: {"type", "model", "inputs", "proof", "encrypted", "keys_sha256"},
}


def request_digest(job: Generate | Embed | Transcribe | Speak | Paint | Score) -> str:
    """SHA-256 (hex) of what was asked: model, messages or prompt, and sampling settings
    (not the job id, weights pin or resume point, so every miner of a job agrees); prompt
    and stop ids, the sealed box and its prompt bound when set (a sealed job's digest
    binds the ciphertext the miner got, never the plaintext). For an embedding: model,
    inputs (text or token ids) and ``truncate``. For a transcription it covers the audio's
    size and SHA-256; for speech, images and scores, everything asked (a score: its rows or
    ciphertext and keys' digest, and whether proofs were asked)."""
    if isinstance(job, Transcribe | Speak | Paint | Score):
        return hashlib.sha256(canonical_json(job.model_dump(
            mode="json", include=_MEDIA_FIELDS[type(job)]))).hexdigest()
    if isinstance(job, Embed):
        return hashlib.sha256(canonical_json(job.model_dump(
            mode="json", include={"type", "model", "input", "input_ids", "truncate"}))
        ).hexdigest()
    body = job.model_dump(mode="json", include={"model", "messages", "prompt", "params"})
    for field in ("prompt_ids", "stop_ids", "sealed", "prompt_bound"):
        value = getattr(job, field)
        if value:
            body[field] = list(value) if isinstance(value, tuple) else value
    return hashlib.sha256(canonical_json(body)).hexdigest()


def billed_units(last: Done | Embedded | Transcribed | Spoken | Painted | Scored) -> int:
    """The input units a task's final frame reports, which its receipt's ``prompt_tokens``
    holds: tokens (text, embeddings), seconds of audio, characters, image tiles or rows."""
    if isinstance(last, Scored):
        return last.rows
    if isinstance(last, Transcribed):
        return last.seconds
    if isinstance(last, Spoken):
        return last.characters
    if isinstance(last, Painted):
        return last.tiles
    return last.prompt_tokens


def billed_work(last: Done | Embedded | Transcribed | Spoken | Painted | Scored) -> int:
    """The output units a task's final frame reports, which its receipt's
    ``completion_tokens`` holds: a generation's completion tokens, a score's milliseconds of
    proving or encrypted work; 0 for the other kinds."""
    if isinstance(last, Done):
        return last.completion_tokens
    if isinstance(last, Scored):
        return last.work_ms
    return 0


def output_digest(text: str) -> str:
    """SHA-256 (hex) of answer text, UTF-8."""
    return hashlib.sha256(text.encode()).hexdigest()


def _receipt_message(receipt: Receipt) -> bytes:
    return _RECEIPT_DOMAIN + hashlib.sha256(canonical_json(receipt.model_dump())).digest()


def _counter_message(receipt: Receipt, miner_signature: str) -> bytes:
    body: dict[str, Any] = {"receipt": receipt.model_dump(), "miner_signature": miner_signature}
    return _COUNTER_DOMAIN + hashlib.sha256(canonical_json(body)).digest()


def sign_receipt(key: SigningKey, receipt: Receipt) -> str:
    """The miner's hex signature of ``receipt``."""
    return key.sign(_receipt_message(receipt)).signature.hex()


def countersign(key: SigningKey, receipt: Receipt, miner_signature: str) -> str:
    """The coordinator's hex signature over ``receipt`` and the miner's signature."""
    return key.sign(_counter_message(receipt, miner_signature)).signature.hex()


def _verify(public_key: str, message: bytes, signature: str) -> bool:
    try:
        VerifyKey(bytes.fromhex(public_key)).verify(message, bytes.fromhex(signature))
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def verify_receipt(receipt: Receipt, miner_signature: str) -> bool:
    """True when ``miner_signature`` is ``receipt.miner``'s signature of ``receipt``."""
    return _verify(receipt.miner, _receipt_message(receipt), miner_signature)


def verify_countersignature(receipt: Receipt, miner_signature: str, coordinator: str,
                            signature: str) -> bool:
    """True when ``signature`` is the coordinator ``coordinator``'s (hex public key)
    countersignature of ``receipt`` and ``miner_signature``."""
    return _verify(coordinator, _counter_message(receipt, miner_signature), signature)
