"""Clients' registered evaluation keys for encrypted scoring, kept on disk by SHA-256.

A CKKS evaluation-key set is tens of MB (``shared/MEASURED.md``): a client registers it once
(``POST /v1/scores/keys``) and names it by digest in each encrypted request; the coordinator
hands it to a miner the first time that miner needs it (``key_chunk`` frames). The keys are
public (no secret key is in them: whoever holds them can encrypt and compute, not decrypt),
so they are stored as they came. Each set is refused unless it loads as a TenSEAL context
without a secret key, when TenSEAL is installed here; otherwise the miner's load is the
check.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

from covey.coordinator.errors import ApiError

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class KeyStore:
    """Evaluation-key sets under ``folder`` (one file per SHA-256), at most ``max_bytes``
    each."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    def _path(self, sha256: str) -> Path:
        if not _DIGEST.match(sha256):
            raise ApiError(400, "keys_sha256 is 64 lower-case hex digits.",
                           code="invalid_value", param="keys_sha256")
        return self.folder / f"{sha256}.keys"

    def put(self, data: bytes) -> str:
        """Store ``data`` (idempotent); its SHA-256 (hex).

        Raises:
            ApiError: 400 ``invalid_value`` (param ``keys``) for an empty body, or bytes
                that are not a TenSEAL public context; 413 over ``max_bytes``.
        """
        if not data:
            raise ApiError(400, "The body is empty: send the serialized public TenSEAL "
                           "context (covey.scoring.he.ClientKeys.public) as "
                           "application/octet-stream.", code="invalid_value", param="keys")
        if len(data) > self.max_bytes:
            raise ApiError(413, f"Evaluation keys of {len(data)} bytes are over this "
                           f"coordinator's {self.max_bytes}-byte limit.",
                           code="request_too_large", param="keys")
        _check(data)
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._path(sha256)
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha256

    def has(self, sha256: str) -> bool:
        """Whether the key set ``sha256`` is registered."""
        return self._path(sha256).is_file()

    def size(self, sha256: str) -> int:
        """Bytes of the registered key set ``sha256``.

        Raises:
            ApiError: 400 naming ``keys_sha256`` when it is not registered.
        """
        try:
            return self._path(sha256).stat().st_size
        except FileNotFoundError:
            raise _unknown(sha256) from None

    def get(self, sha256: str) -> bytes:
        """The registered key set ``sha256``.

        Raises:
            ApiError: 400 naming ``keys_sha256`` when it is not registered.
        """
        try:
            return self._path(sha256).read_bytes()
        except FileNotFoundError:
            raise _unknown(sha256) from None


def _unknown(sha256: str) -> ApiError:
    return ApiError(400, f"No evaluation keys {sha256[:16]}… are registered here: POST them "
                    "to /v1/scores/keys first (covey.client does it for you).",
                    code="invalid_value", param="keys_sha256")


def _check(data: bytes) -> None:
    if importlib.util.find_spec("tenseal") is None:
        return  # no TenSEAL on this coordinator: the miner's load checks them
    from covey.scoring.he import EvalKeys, HEError

    try:
        EvalKeys.from_bytes(data)
    except HEError as exc:
        raise ApiError(400, f"These are not TenSEAL evaluation keys: {exc}",
                       code="invalid_value", param="keys") from None
