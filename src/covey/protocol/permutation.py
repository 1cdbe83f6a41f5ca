"""The secret vocabulary permutation of private models, and its key files.

A private model (``covey model private``) is a copy of a GGUF whose embedding and output rows
are reordered by a permutation of the token ids derived from a 32-byte key: token ``i`` of
the real vocabulary becomes token ``perm[i]`` of the private file. The client maps prompt ids
through ``perm`` and answer ids back through its inverse; the miner sees only permuted ids.

Construction (stdlib only, so client, CLI and tests derive the same permutation):

- **Keyed stream.** HMAC-SHA256 (RFC 2104) of the key over ``DOMAIN ‖ n ‖ counter`` (both
  8-byte big-endian), counter = 0, 1, 2 …: a pseudorandom function in counter mode, the
  construction of NIST SP 800-108 §4.1. ``n`` is in the input so keys reused across
  vocabulary sizes give unrelated permutations. The stream is cut into 64-bit words.
- **Uniform draws without modulo bias.** A draw below ``m`` takes words until one is below
  the largest multiple of ``m`` that fits in 64 bits, and returns it modulo ``m`` (the
  "simple discard method", NIST SP 800-90A Rev. 1 §A.5.1); a word is rejected with
  probability < m / 2**64.
- **Shuffle.** Durstenfeld's in-place Fisher–Yates shuffle (Fisher & Yates 1938; Durstenfeld,
  CACM 7(7), 1964, Algorithm 235; Knuth, TAOCP vol. 2, §3.4.2, Algorithm P): for
  ``i = n−1 … 1`` swap element ``i`` with element ``j``, ``j`` drawn uniformly in
  ``[0, i]``. With uniform draws every one of the n! permutations is equally likely
  (as far as HMAC-SHA256 is a PRF).

A fixed permutation is a substitution cipher over tokens: it hides which token is which, not
how often each occurs (see ``bench/privacy_attack.py`` and the README).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["DOMAIN", "KEY_BYTES", "KeyFileError", "inverse", "load_key", "load_or_create_key",
           "new_key", "permutation"]

DOMAIN = b"covey/vocab-permutation/v1"
"""Domain separation: this key's HMAC stream is used for nothing else."""
KEY_BYTES = 32
"""Key length: 256 bits, HMAC-SHA256's block-size-safe key length (RFC 2104 §3)."""


class KeyFileError(Exception):
    """A permutation key file is unreadable, malformed or readable by others."""


def _words(key: bytes, n: int) -> Iterator[int]:
    """Unsigned 64-bit words of the keyed stream for a vocabulary of ``n`` tokens."""
    prefix = DOMAIN + n.to_bytes(8, "big")
    counter = 0
    while True:
        block = hmac.digest(key, prefix + counter.to_bytes(8, "big"), hashlib.sha256)
        for i in range(0, len(block), 8):
            yield int.from_bytes(block[i: i + 8], "big")
        counter += 1


def permutation(key: bytes, n: int) -> list[int]:
    """The permutation of ``range(n)`` that ``key`` selects: ``perm[i]`` is the private id of
    real token ``i``. Deterministic; ~50 ms for n = 49 152 on one core.

    Raises:
        ValueError: ``key`` is not :data:`KEY_BYTES` bytes, or ``n`` < 1 or ≥ 2**31.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"a permutation key is {KEY_BYTES} bytes, not {len(key)}")
    if not 1 <= n < 2**31:
        raise ValueError(f"vocabulary size {n} is out of range")
    perm = list(range(n))
    words = _words(key, n)
    for i in range(n - 1, 0, -1):
        m = i + 1
        limit = 2**64 - 2**64 % m  # largest multiple of m that fits: draws below it are fair
        w = next(words)
        while w >= limit:
            w = next(words)
        j = w % m
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def inverse(perm: Sequence[int]) -> list[int]:
    """``inv`` with ``inv[perm[i]] == i``: private id → real id.

    Raises:
        ValueError: ``perm`` is not a permutation of ``range(len(perm))``.
    """
    inv = [-1] * len(perm)
    for i, p in enumerate(perm):
        if not 0 <= p < len(perm) or inv[p] != -1:
            raise ValueError("not a permutation")
        inv[p] = i
    return inv


def new_key() -> bytes:
    """A fresh random key (:data:`KEY_BYTES` bytes from the OS CSPRNG)."""
    return secrets.token_bytes(KEY_BYTES)


def load_key(path: Path) -> bytes:
    """The key in ``path``: 32 bytes as 64 hex digits (a trailing newline is fine).

    Raises:
        KeyFileError: missing, group- or world-accessible (like ssh, we refuse it), or not
            a 32-byte hex key.
    """
    path = path.expanduser()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise KeyFileError(f"{path} has mode {mode:o}; a permutation key must be private: "
                           f"chmod 600 {path}")
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path} does not hold a {KEY_BYTES}-byte hex key")
    return key


def load_or_create_key(path: Path) -> tuple[bytes, bool]:
    """(key, created): the key in ``path``, or a new one written there with mode 0600.

    Raises:
        KeyFileError: as :func:`load_key`.
    """
    path = path.expanduser()
    if path.exists():
        return load_key(path), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    # O_EXCL: never overwrite a key another process just wrote (its files would be lost).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key, True
