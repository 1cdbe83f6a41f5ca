"""Clients' registered evaluation keys for encrypted scoring, kept on disk per account by
SHA-256.

A CKKS evaluation-key set is megabytes (3.7 MB for the bundled scheme): a client registers
it once (``POST /v1/scores/keys``) and names it by digest in each encrypted request; the
coordinator hands it to a miner the first time that miner needs it (``key_chunk`` frames).
Each account keeps at most :data:`KEY_SETS_PER_ACCOUNT` sets: registering one more drops
the one used least recently, so storage is bounded per account and registering is free. The keys are
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

KEY_SETS_PER_ACCOUNT = 4
"""Evaluation-key sets an account keeps (a client uses one; a few leave room for rotation)."""


class KeyStore:
    """Evaluation-key sets under ``folder`` (a folder per account, one file per SHA-256),
    at most ``max_bytes`` each."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    def _account_folder(self, account: str) -> Path:
        # an account id may hold any character: its digest names the folder
        return self.folder / hashlib.sha256(account.encode()).hexdigest()[:32]

    def _path(self, account: str, sha256: str) -> Path:
        if not _DIGEST.match(sha256):
            raise ApiError(400, "keys_sha256 is 64 lower-case hex digits.",
                           code="invalid_value", param="keys_sha256")
        return self._account_folder(account) / f"{sha256}.keys"

    def put(self, account: str, data: bytes) -> str:
        """Store ``data`` for ``account`` (idempotent), dropping its least recently used set
        beyond :data:`KEY_SETS_PER_ACCOUNT`; the keys' SHA-256 (hex).

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
        path = self._path(account, sha256)
        if path.is_file():
            path.touch()
            return sha256
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        kept = sorted(path.parent.glob("*.keys"), key=lambda p: p.stat().st_mtime_ns)
        for old in kept[:-KEY_SETS_PER_ACCOUNT]:
            old.unlink(missing_ok=True)
        return sha256

    def size(self, account: str, sha256: str) -> int:
        """Bytes of ``account``'s key set ``sha256``.

        Raises:
            ApiError: 400 naming ``keys_sha256`` when it is not registered.
        """
        try:
            return self._path(account, sha256).stat().st_size
        except FileNotFoundError:
            raise _unknown(sha256) from None

    def get(self, account: str, sha256: str) -> bytes:
        """``account``'s key set ``sha256`` (marked as just used).

        Raises:
            ApiError: 400 naming ``keys_sha256`` when it is not registered.
        """
        path = self._path(account, sha256)
        try:
            data = path.read_bytes()
            path.touch()
        except FileNotFoundError:
            raise _unknown(sha256) from None
        return data


def _unknown(sha256: str) -> ApiError:
    return ApiError(400, f"No evaluation keys {sha256[:16]}… are registered for this account "
                    f"(an account keeps its last {KEY_SETS_PER_ACCOUNT}): POST them to "
                    "/v1/scores/keys first (covey.client.scores does it for you).",
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
