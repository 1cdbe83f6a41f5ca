"""The rules every text job obeys live once (covey.miner.harness): the synthetic backend
refuses what llama.cpp refuses, with the same codes and fields."""

from __future__ import annotations

import asyncio

import pytest

from covey.miner import harness
from covey.miner.backends.base import BackendError
from covey.miner.backends.synthetic import VOCAB, SyntheticBackend
from covey.protocol import Job, Resume, SamplingParams
from covey.protocol.frames import ChatMessage


def _job(**kw: object) -> Job:
    return Job(job_id="j", model="synthetic", **kw)  # type: ignore[arg-type]


def _first_frame(backend: SyntheticBackend, job: Job) -> object:
    async def run() -> object:
        gen = backend.generate(job)
        try:
            return await gen.__anext__()
        finally:
            await gen.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize(("job", "code", "param"), [
    (_job(prompt=""), "invalid_prompt", "prompt"),
    (_job(prompt_ids=()), "invalid_prompt", "prompt_ids"),
    (_job(prompt="x" * 4 * 300), "context_length_exceeded", "prompt"),
    (_job(prompt="hello", resume=Resume(token_ids=(VOCAB + 5,), text_chars=0)),
     "invalid_value", "resume"),
    (_job(prompt="hello", params=SamplingParams(max_tokens=2),
          resume=Resume(token_ids=(1, 2, 3), text_chars=0)), "invalid_value", "resume"),
    (_job(prompt="hello", resume=Resume(token_ids=(1,) * 255, text_chars=0)),
     "context_length_exceeded", "resume"),
])
def test_the_synthetic_backend_obeys_the_harness(job: Job, code: str, param: str):
    backend = SyntheticBackend(slots=1, tokens_per_second=0, context_length=256)
    with pytest.raises(BackendError) as caught:
        _first_frame(backend, job)
    assert (caught.value.code, caught.value.param) == (code, param)


def test_the_budget_counts_max_tokens_from_the_start_and_stops_at_the_context():
    messages = (ChatMessage(role="user", content="hi"),)
    assert harness.admit(_job(messages=messages), 10, 100, 50) == 90
    capped = _job(messages=messages, params=SamplingParams(max_tokens=20),
                  resume=Resume(token_ids=(1,) * 5, text_chars=0))
    assert harness.admit(capped, 10, 100, 50) == 15  # 20 in all, 5 already delivered
    assert harness.admit(capped, 90, 100, 50) == 5  # the context ends first


def test_text_for_a_private_model_is_refused_naming_its_field():
    with pytest.raises(BackendError) as caught:
        harness.refuse_text(_job(messages=(ChatMessage(role="user", content="hi"),)), "p")
    assert (caught.value.code, caught.value.param) == ("invalid_value", "messages")
    harness.refuse_text(_job(prompt_ids=(1, 2)), "p")  # token ids pass
