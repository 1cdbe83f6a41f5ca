"""``--model hf:ORG/REPO[@REV][/PATH/FILE.gguf]``: models fetched from the Hugging Face Hub.

Two shapes of reference:

- ``hf:ORG/REPO/FILE.gguf`` (or ``hf:ORG/REPO/sub/dir/FILE.gguf``): one GGUF file, fetched with
  ``huggingface_hub.hf_hub_download``; resolves to that file.
- ``hf:ORG/REPO``: a whole repository (a transformers or sentence-transformers folder), fetched
  with ``huggingface_hub.snapshot_download``; resolves to the snapshot directory.

``@REV`` after the repository name picks a branch, tag or commit (default ``main``); a revision
containing ``/`` (``refs/pr/1``) cannot be written this way.

Files land in the hub's own cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``, default
``~/.cache/huggingface/hub``), shared with every other tool that uses it. The cache is always
tried first with ``local_files_only=True``, so a model that is already there resolves with no
network at all; the hub (``$HF_ENDPOINT``, default https://huggingface.co) is asked only when it
is not, and never with ``HF_HUB_OFFLINE=1``. Consequence: a cached branch such as ``main`` is
not refreshed when the repository moves on; pin ``@COMMIT`` or delete the cached copy
(``hf cache rm model/ORG/REPO``) to take a newer one. Private and gated repositories need
``HF_TOKEN``.

Progress: downloads draw huggingface_hub's own tqdm bars on stderr (one per file; "Fetching N
files" for a snapshot). They are re-enabled here if some library turned them off, unless the
user set ``HF_HUB_DISABLE_PROGRESS_BARS``; like every tqdm bar they only draw when stderr is a
terminal, so under a pipe or a service manager the log line "downloading …" is all there is.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from covey.miner.models import ModelNotFound

PREFIX = "hf:"
"""What starts a Hugging Face Hub reference in ``--model``."""

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf:`` reference.

    ``repo_id`` is ``ORG/REPO``; ``filename`` the path of a ``.gguf`` inside it, with ``/``
    separators, or None for the whole repository; ``revision`` a branch, tag or commit, or None
    for the hub's default (``main``).
    """

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    @property
    def served_name(self) -> str:
        """Default public name: the GGUF's file name without ``.gguf``, else the repository's
        name, lower-cased."""
        if self.filename is not None:
            base = self.filename.rsplit("/", 1)[-1]
            return base[: -len(".gguf")].lower()
        return self.repo_id.split("/", 1)[1].lower()

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        path = f"/{self.filename}" if self.filename else ""
        return f"{PREFIX}{self.repo_id}{rev}{path}"


def is_hub_ref(name_or_path: str) -> bool:
    """True when ``--model`` is a Hugging Face Hub reference (starts with ``hf:``)."""
    return name_or_path.startswith(PREFIX)


def parse_hub_ref(spec: str) -> HubRef:
    """Parse ``hf:ORG/REPO[@REV][/PATH/FILE.gguf]``.

    Raises:
        ModelNotFound: not of that shape (missing org or repo, odd characters, ``..`` or empty
            path segments, a file that does not end in ``.gguf``).
    """
    usage = f"{spec!r}: expected hf:ORG/REPO[@REVISION] or hf:ORG/REPO[@REVISION]/FILE.gguf"
    if not is_hub_ref(spec):
        raise ModelNotFound(usage)
    parts = spec[len(PREFIX) :].split("/")
    if len(parts) < 2:
        raise ModelNotFound(usage)
    org, repo, rest = parts[0], parts[1], parts[2:]
    repo, at, revision = repo.partition("@")
    if not (_NAME.fullmatch(org) and _NAME.fullmatch(repo)):
        raise ModelNotFound(usage)
    if at and not _REVISION.fullmatch(revision):
        raise ModelNotFound(f"{usage} (revision {revision!r})")
    filename = None
    if rest:
        if any(p in ("", ".", "..") for p in rest):
            raise ModelNotFound(usage)
        filename = "/".join(rest)
        if not filename.lower().endswith(".gguf"):
            raise ModelNotFound(
                f"{spec!r}: a file inside a repository must be a .gguf; "
                f"use hf:{org}/{repo} for a whole transformers or sentence-transformers repository"
            )
    return HubRef(f"{org}/{repo}", filename, revision or None)


def fetch(ref: HubRef) -> Path:
    """Local path of ``ref``: from the hub's cache if there, else downloaded into it.

    Returns the GGUF file (a symlink into the cache's ``blobs/``) for a file reference, or the
    snapshot directory (``.../snapshots/<commit>``) for a repository.

    Raises:
        ModelNotFound: not cached and the hub cannot be reached (or ``HF_HUB_OFFLINE=1``); the
            repository, revision or file does not exist or is private or gated; or the download
            failed. The message names the reference and the cause; no hub exception escapes.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return _download(ref, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # an odd cache must not stand in the way of a good download
        log.debug("cache lookup of %s failed: %r", ref, exc)
    if _offline(constants):
        raise ModelNotFound(
            f"{ref}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
            f"is set; unset it or copy the model into the cache"
        )
    _enable_progress_bars()
    log.info("downloading %s from %s into %s", ref, constants.ENDPOINT, constants.HF_HUB_CACHE)
    try:
        if ref.filename is not None:
            _check_reachable(ref)
        return _download(ref, local_files_only=False)
    except Exception as exc:  # any failure becomes one clear message, never a traceback
        raise ModelNotFound(_explain(ref, exc, constants)) from None


def _download(ref: HubRef, *, local_files_only: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    if ref.filename is not None:
        path = hf_hub_download(
            ref.repo_id, ref.filename, revision=ref.revision, local_files_only=local_files_only
        )
    else:
        path = snapshot_download(
            ref.repo_id, revision=ref.revision, local_files_only=local_files_only
        )
    return Path(path)


class _Unreachable(Exception):
    """The hub did not answer at all (refused, DNS, timeout, TLS, proxy): see ``__cause__``."""


def _check_reachable(ref: HubRef) -> None:
    """One HEAD for the file, with no retries: ``hf_hub_download`` retries an unreachable hub
    with backoff for ~25 s before giving up, which only delays the same answer.

    Raises:
        _Unreachable: no HTTP answer. The hub's own errors (no such repository, revision or
            file; gated) propagate as huggingface_hub raises them.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    assert ref.filename is not None
    url = hf_hub_url(ref.repo_id, ref.filename, revision=ref.revision)
    try:
        get_hf_file_metadata(url)
    except HfHubHTTPError:
        raise
    except Exception as exc:  # whatever the HTTP client's transport error type is
        raise _Unreachable(str(exc)) from exc


def _offline(constants: object) -> bool:
    is_offline = getattr(constants, "is_offline_mode", None)
    if callable(is_offline):
        return bool(is_offline())
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _enable_progress_bars() -> None:
    """Undo a library's ``disable_progress_bars()``; the user's environment variable wins."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        return
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    if are_progress_bars_disabled():
        enable_progress_bars()


def _explain(ref: HubRef, exc: Exception, constants: object) -> str:
    """One line saying why ``ref`` could not be fetched."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = getattr(constants, "ENDPOINT", "the hub")
    cache = getattr(constants, "HF_HUB_CACHE", "the Hugging Face cache")
    if isinstance(exc, LocalEntryNotFoundError | _Unreachable):
        cause = exc.__cause__ or exc.__context__
        detail = f": {type(cause).__name__}: {_first_line(cause)}" if cause else ""
        return (
            f"{ref}: not in the Hugging Face cache ({cache}) and {endpoint} could not be "
            f"reached{detail}"
        )
    if isinstance(exc, GatedRepoError):
        return f"{ref}: {ref.repo_id} is gated on {endpoint}; accept its terms and set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"{ref}: no repository {ref.repo_id!r} on {endpoint} "
            f"(or it is private: set HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{ref}: repository {ref.repo_id!r} has no revision {ref.revision!r}"
    if isinstance(exc, EntryNotFoundError):
        rev = ref.revision or "main"
        return f"{ref}: repository {ref.repo_id!r} has no file {ref.filename!r} at {rev!r}"
    if isinstance(exc, HfHubHTTPError):
        return f"{ref}: {endpoint} answered an error: {_first_line(exc)}"
    return f"{ref}: download failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
