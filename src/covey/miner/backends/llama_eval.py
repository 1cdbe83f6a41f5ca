"""Evaluating tokens with llama.cpp in the canonical batch schedule, and reading logits.

Shared by generation, the validator's re-check and trial recording: all three must evaluate
a prompt in the same batches for their numbers to agree.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import llama_cpp
import numpy as np

__all__ = ["PREFILL_CHUNK", "eval_logits", "last_logits", "llama_seed", "prefill"]


PREFILL_CHUNK = 128
"""Prompt tokens per prefill batch, between cancellation checks and ``progress`` frames: a
cancel lands within a fraction of a second on a CPU, and batching still pays (CPU prefill
throughput flattens out well below 128 tokens a batch)."""


def prefill(llm: llama_cpp.Llama, tokens: list[int], resumed: list[int],
             cancel: threading.Event, progress: Callable[[int], None], exact: bool = True
             ) -> bool:
    """Evaluate the prompt (and any resumed tokens) in the canonical schedule; False if
    cancelled part-way.

    ``exact`` (greedy requests) evaluates resumed tokens one at a time, as decoding did, so
    the continuation is the one the first miner would have produced; it takes as long as
    decoding them did. Otherwise (sampled requests, whose continuation is a fresh sample
    anyway) they are evaluated in batches, like the prompt, which is many times faster.

    The canonical schedule is batches ``[0:C], [C:2C], …`` of the prompt (C =
    :data:`PREFILL_CHUNK`), then one token at a time, as decoding evaluates them. llama.cpp's
    numerics depend on batch shapes, so an answer is reproducible (the same greedy text
    whatever the slot ran before, checkable by a validator, and resumable token for token on
    another miner) only if every run evaluates the same batches. The KV cache is therefore
    reused only up to a batch boundary below the end of the prompt; the rest is evaluated
    here, and ``Llama.generate`` then finds everything cached and samples at once from the
    logits of the last token.
    """
    limit = min(llm.n_tokens, len(tokens) - 1)
    differ = np.flatnonzero(llm.input_ids[:limit] != np.asarray(tokens[:limit]))
    common = int(differ[0]) if len(differ) else limit
    llm.n_tokens = common - common % PREFILL_CHUNK  # eval() drops the KV cache past n_tokens
    for start in range(llm.n_tokens, len(tokens), PREFILL_CHUNK):
        if cancel.is_set():
            return False
        llm.eval(tokens[start: start + PREFILL_CHUNK])
        progress(llm.n_tokens)
    step = 1 if exact else PREFILL_CHUNK
    for i in range(0, len(resumed), step):
        if cancel.is_set():
            return False
        llm.eval(resumed[i: i + step])
        if not exact or i % PREFILL_CHUNK == PREFILL_CHUNK - 1:
            progress(llm.n_tokens)
    return True


def last_logits(llm: llama_cpp.Llama, rows: int) -> np.ndarray:
    """A copy of the logits of the last ``rows`` outputs of the latest decode, shape
    ``(rows, n_vocab)``."""
    n_vocab = llm.n_vocab()
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(rows * n_vocab,)).reshape(
        rows, n_vocab).copy()


def eval_logits(llm: llama_cpp.Llama, tokens: list[int]) -> np.ndarray:
    """Evaluate ``tokens`` as one batch (like ``Llama.eval``) and return the logits of every
    position, shape ``(len(tokens), n_vocab)``: the teacher-forced prefill of a re-check.

    ``Llama.eval`` keeps only the last position's logits unless the whole context was built
    with ``logits_all`` (a ``n_ctx × n_vocab`` buffer per slot), so this asks llama.cpp for
    all outputs of just this batch.
    """
    n_past = llm.n_tokens
    llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
    llm._batch.set_batch(batch=tokens, n_past=n_past, logits_all=True)
    llm._ctx.decode(llm._batch)
    llm.input_ids[n_past: n_past + len(tokens)] = tokens
    llm.n_tokens += len(tokens)
    return last_logits(llm, len(tokens))


def llama_seed(seed: int | None) -> int:
    """Map an OpenAI seed (any int64, or None for random) to llama.cpp's uint32 seed space.

    0xFFFFFFFF means "random" to llama.cpp (``LLAMA_DEFAULT_SEED``), so the range is one short
    of 2**32: every given seed stays deterministic.
    """
    if seed is None:
        return random.getrandbits(31)
    return seed % 0xFFFFFFFF
