"""Choosing and building a backend by name: a registry, so adding a runtime adds an entry.

:func:`backend_for` picks a model's backend from its files (a ``.gguf`` file: llama.cpp; a
sentence-transformers folder: sentence-transformers, and so on); :func:`build` constructs it from a
:class:`ModelSettings`. Each builder imports its runtime only when called, so a miner that
serves GGUF files never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from covey.miner.backends.base import Backend


class BackendUnavailable(Exception):
    """The backend's runtime is not installed, or the model cannot be served by it; the
    message says what to install or pass."""


@dataclass(frozen=True)
class ModelSettings:
    """One model to serve and how (the miner's command-line options for it).

    ``path`` is a GGUF file or a model folder (None for ``synthetic``); ``sha256`` the
    weights' digest; ``ctx`` context length in tokens; ``threads`` CPU threads per slot
    (None: the backend's default); prices in µcr per 1M tokens; ``tokens_per_second`` and
    ``stream_interval`` (seconds) pace streamed answers.
    """

    name: str
    path: Path | None = None
    sha256: str = ""
    slots: int = 1
    ctx: int = 4096
    threads: int | None = None
    gpu_layers: int = 0
    stream_interval: float = 0.02
    ask_prompt: int = 0
    ask_completion: int = 0
    tokens_per_second: float = 50.0
    blocks: tuple[int, int | None] | None = None
    """A shard's block range ``[start, end)`` (end None: to the model's last block)."""
    activations: str = "float32"
    """A shard's hidden-state dtype on the wire (float32, float16 or bfloat16)."""
    rebalance: bool = False
    """A shard the coordinator may move to blocks no miner holds."""


def parse_blocks(text: str) -> tuple[int, int | None]:
    """``"0:15"`` → (0, 15); ``"15:"`` → (15, None), to the model's last block.

    Raises:
        ValueError: not ``START:END`` with 0 ≤ START < END.
    """
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        lo, hi = int(start or 0), (int(end) if end else None)
    except ValueError:
        raise ValueError(f"--blocks {text!r}: expected START:END, e.g. 0:15 or 15:") from None
    if lo < 0 or (hi is not None and hi <= lo):
        raise ValueError(f"--blocks {text!r}: expected 0 <= START < END")
    return lo, hi


def _llama_cpp(s: ModelSettings) -> Backend:
    try:
        from covey.miner.backends.llama_cpp import LlamaCppBackend, LlamaCppConfig
        from covey.miner.models import ModelFile
    except ImportError as exc:
        raise BackendUnavailable("the llama.cpp backend needs: pip install 'covey[llama]'"
                                 ) from exc
    assert s.path is not None
    return LlamaCppBackend(ModelFile(s.name, s.path), s.sha256, s.slots, LlamaCppConfig(
        n_ctx=s.ctx, n_threads=s.threads, n_gpu_layers=s.gpu_layers,
        stream_interval=s.stream_interval, ask_prompt=s.ask_prompt,
        ask_completion=s.ask_completion))


def _sentence_transformers(s: ModelSettings) -> Backend:
    try:
        import sentence_transformers  # noqa: F401 - fail here with advice, not deep inside

        from covey.miner.backends.sentence_transformers import (
            EmbeddingConfig,
            SentenceTransformersBackend,
        )
    except ImportError as exc:
        raise BackendUnavailable("the sentence-transformers backend needs: "
                                 "pip install 'covey[embed]'") from exc
    assert s.path is not None
    return SentenceTransformersBackend(s.name, s.path, s.sha256, s.slots, EmbeddingConfig(
        threads=s.threads, ask_prompt=s.ask_prompt))


def _faster_whisper(s: ModelSettings) -> Backend:
    try:
        import faster_whisper  # noqa: F401 - fail here with advice, not deep inside

        from covey.miner.backends.faster_whisper import TranscriptionConfig, WhisperBackend
    except ImportError as exc:
        raise BackendUnavailable("the faster-whisper backend needs: pip install 'covey[audio]'"
                                 ) from exc
    assert s.path is not None
    return WhisperBackend(s.name, s.path, s.sha256, s.slots, TranscriptionConfig(
        threads=s.threads, ask_prompt=s.ask_prompt))


def _hibari(s: ModelSettings) -> Backend:
    try:
        import hibari  # noqa: F401 - fail here with advice, not deep inside

        from covey.miner.backends.hibari import HibariBackend, SpeechConfig
    except ImportError as exc:
        raise BackendUnavailable("the hibari backend needs: pip install 'covey[audio]'"
                                 ) from exc
    return HibariBackend(s.name, s.sha256, s.slots, SpeechConfig(
        threads=s.threads or 1, ask_prompt=s.ask_prompt))


def _diffusers(s: ModelSettings) -> Backend:
    try:
        import diffusers  # noqa: F401 - fail here with advice, not deep inside

        from covey.miner.backends.diffusers import DiffusersBackend, ImageConfig
    except ImportError as exc:
        raise BackendUnavailable("the diffusers backend needs: pip install 'covey[image]'"
                                 ) from exc
    assert s.path is not None
    return DiffusersBackend(s.name, s.path, s.sha256, s.slots, ImageConfig(
        threads=s.threads, ask_prompt=s.ask_prompt))


def _onnxruntime(s: ModelSettings) -> Backend:
    try:
        import onnxruntime  # noqa: F401 - fail here with advice, not deep inside

        from covey.miner.backends.onnx_scoring import OnnxScoringBackend, ScoringConfig
    except ImportError as exc:
        raise BackendUnavailable("the onnxruntime backend needs: pip install 'covey[score]'"
                                 ) from exc
    assert s.path is not None
    return OnnxScoringBackend(s.name, s.path, s.slots, ScoringConfig(
        ask_prompt=s.ask_prompt, ask_completion=s.ask_completion))


def _transformers(s: ModelSettings) -> Backend:
    try:
        from covey.miner.backends.transformers_shard import ShardBackend
    except ImportError as exc:
        raise BackendUnavailable("the transformers backend needs: pip install "
                                 "'covey[shard]'") from exc
    assert s.path is not None
    return ShardBackend(s.name, s.path, s.sha256, s.blocks or (0, None), slots=s.slots,
                        ctx=s.ctx, threads=s.threads or 1, activations=s.activations,
                        ask_prompt=s.ask_prompt, ask_completion=s.ask_completion,
                        rebalance=s.rebalance)


def _synthetic(s: ModelSettings) -> Backend:
    from covey.miner.backends.synthetic import SyntheticBackend

    return SyntheticBackend(s.name, s.slots, s.tokens_per_second, s.ctx, s.stream_interval)


BUILDERS: dict[str, Callable[[ModelSettings], Backend]] = {
    "llama.cpp": _llama_cpp,
    "sentence-transformers": _sentence_transformers,
    "faster-whisper": _faster_whisper,
    "hibari": _hibari,
    "diffusers": _diffusers,
    "onnxruntime": _onnxruntime,
    "transformers": _transformers,
    "synthetic": _synthetic,
}
"""Backend name → builder; ``covey miner --backend`` takes these names (or ``auto``)."""


def backend_for(path: Path) -> str:
    """The backend that serves the model at ``path``: ``llama.cpp`` for a file; for a
    folder, ``sentence-transformers`` (a ``modules.json``), ``diffusers`` (a
    ``model_index.json``), ``faster-whisper`` (a CTranslate2 ``model.bin``), ``hibari``
    (a ``hibari.onnx``) or ``onnxruntime`` (a scoring model: ``model.onnx`` and
    ``card.json``).

    Raises:
        BackendUnavailable: a folder no backend here knows how to serve.
    """
    if path.is_file():
        return "llama.cpp"
    for marker, backend in (("modules.json", "sentence-transformers"),
                            ("model_index.json", "diffusers"),
                            ("model.bin", "faster-whisper"),
                            ("hibari.onnx", "hibari"),
                            ("card.json", "onnxruntime")):
        if (path / marker).is_file():
            return backend
    raise BackendUnavailable(f"{path} is a folder no backend here serves (expected a "
                             "sentence-transformers, diffusers, CTranslate2 whisper, "
                             "hibari or scoring folder)")


def build(backend: str, settings: ModelSettings) -> Backend:
    """Construct ``backend`` (a :data:`BUILDERS` name) for ``settings``.

    Raises:
        BackendUnavailable: unknown name, or its runtime is not installed.
        ValueError: the runtime cannot load the model.
    """
    builder = BUILDERS.get(backend)
    if builder is None:
        raise BackendUnavailable(f"unknown backend {backend!r}; expected one of "
                                 f"{', '.join(BUILDERS)}")
    return builder(settings)

