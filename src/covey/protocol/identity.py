"""Ed25519 identity keys (a miner's, the coordinator's), in files only their owner can read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nacl.signing import SigningKey


class IdentityError(Exception):
    """The key file exists but is unreadable, malformed or readable by others."""


def load_or_create(path: Path) -> SigningKey:
    """Load the hex seed in ``path``, or create it with mode 0600 on first run.

    Raises:
        IdentityError: the file is group- or world-accessible (like ssh, we refuse it) or
            does not hold a 32-byte hex seed.
    """
    path = path.expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.encode().hex() + "\n")
        return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"{path} has mode {mode:o}; an identity key must be private: chmod 600 {path}"
        )
    try:
        seed = bytes.fromhex(path.read_text().strip())
        return SigningKey(seed)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path} does not hold a 32-byte hex Ed25519 seed") from exc
