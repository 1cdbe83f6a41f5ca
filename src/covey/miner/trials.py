"""Recording trial references: a model's greedy answers to the trial prompts, with the
margin of each choice, for the coordinator's :class:`~covey.coordinator.verify.trials.TrialBook`.

Run by whoever publishes a model to a network (``covey trials record MODEL.gguf``); the
bundled model's file ships with Covey.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from covey.miner.backends.llama_cpp import LlamaCppBackend
from covey.miner.backends.llama_eval import PREFILL_CHUNK, eval_logits
from covey.protocol import Delta, Done, Generate, SamplingParams
from covey.protocol.frames import ChatMessage


def _margins(logits: np.ndarray) -> list[float]:
    top2 = -np.sort(-np.partition(logits, -2, axis=1)[:, -2:], axis=1)
    return [round(float(a - b), 4) for a, b in top2]


async def record(backend: LlamaCppBackend, prompts: Sequence[Sequence[dict[str, str]]],
                 max_tokens: int) -> list[dict[str, object]]:
    """The greedy answer to each prompt (chat messages) as reference entries:
    ``{"messages", "token_ids", "margins", "finish"}``; ``margins`` has one entry per token
    (top logit minus second logit where it was chosen) and one more after the last token
    when the answer ended on an end-of-generation token."""
    out: list[dict[str, object]] = []
    for i, messages in enumerate(prompts):
        job = Generate(job_id=f"trial-{i}", model=backend.offer.name,
                  messages=tuple(ChatMessage(**m) for m in messages),
                  params=SamplingParams(temperature=0, max_tokens=max_tokens))
        ids: list[int] = []
        finish = "length"
        async for frame in backend.generate(job):
            if isinstance(frame, Delta):
                ids.extend(frame.token_ids)
            elif isinstance(frame, Done):
                finish = frame.finish_reason
        llm = backend._slots[0].llm
        prompt = backend.tokenize_job(llm, job)
        forced = ids if finish == "stop" else ids[:-1]
        llm.reset()
        rows = [eval_logits(llm, prompt[s: s + PREFILL_CHUNK])[-1:]
                for s in range(0, len(prompt), PREFILL_CHUNK)][-1:]
        rows += [eval_logits(llm, forced[s: s + PREFILL_CHUNK])
                 for s in range(0, len(forced), PREFILL_CHUNK)]
        margins = _margins(np.vstack(rows))
        out.append({"messages": [dict(m) for m in messages], "token_ids": ids,
                    "margins": margins, "finish": finish})
    return out


def record_sync(backend: LlamaCppBackend, prompts: Sequence[Sequence[dict[str, str]]],
                max_tokens: int) -> list[dict[str, object]]:
    """:func:`record` from synchronous code."""
    return asyncio.run(record(backend, prompts, max_tokens))
