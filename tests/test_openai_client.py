"""The official ``openai`` client against a real network with the bundled model."""

from __future__ import annotations

import openai
import pytest

from conftest import MODEL, Network


@pytest.fixture
def client(network: Network) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{network.url}/v1", api_key=network.api_key, max_retries=0)


def test_models_lists_bundled_model_with_two_miners(client: openai.OpenAI):
    models = {m.id: m for m in client.models.list().data}
    assert models[MODEL].model_extra["miners"] == 2


def test_chat_non_streaming(client: openai.OpenAI):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    text = r.choices[0].message.content
    assert text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_streaming_with_usage(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    u = chunks[-1].usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens <= 20


def test_streamed_text_equals_non_streamed_text_greedy(client: openai.OpenAI):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Say a short sentence."}],
        max_tokens=24,
        temperature=0,
    )
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kw, stream=True)
        if c.choices
    )
    assert streamed == whole


def test_completion_non_streaming_and_length_limit(client: openai.OpenAI):
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip()
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completion_streaming_with_usage(client: openai.OpenAI):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=12,
            temperature=0.7,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage.completion_tokens == 12


def test_seed_makes_sampling_repeatable(client: openai.OpenAI):
    kw = dict(
        model=MODEL,
        prompt="My favourite animal is",
        max_tokens=12,
        temperature=1.0,
        top_p=0.95,
        seed=1234,
    )
    assert (
        client.completions.create(**kw).choices[0].text
        == client.completions.create(**kw).choices[0].text
    )


def test_stop_sequence_ends_the_answer(client: openai.OpenAI):
    base = (
        client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    assert " 6" in base
    r = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(" 6")]


def test_penalties_are_accepted_and_change_output(client: openai.OpenAI):
    kw = dict(model=MODEL, prompt="the the the the the", max_tokens=16, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    penalised = (
        client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    )
    assert plain != penalised


def test_greedy_answer_equals_llama_cpp_in_process(client: openai.OpenAI):
    """The network adds nothing to the model: same template, same tokens, same text."""
    import llama_cpp

    from covey.miner.models import bundled_path

    llm = llama_cpp.Llama(
        model_path=str(bundled_path(MODEL)), n_ctx=1024, n_threads=1, verbose=False
    )
    messages = [{"role": "user", "content": "Give me two facts about the moon."}]
    local = llm.create_chat_completion(
        messages, max_tokens=32, temperature=0, top_k=0, min_p=0.0, repeat_penalty=1.0
    )
    remote = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=32, temperature=0
    )
    assert remote.choices[0].message.content == local["choices"][0]["message"]["content"]
    assert remote.usage.prompt_tokens == local["usage"]["prompt_tokens"]
    assert remote.usage.completion_tokens == local["usage"]["completion_tokens"]
    llm.close()


def test_greedy_is_repeatable_whatever_the_slot_ran_before(client: openai.OpenAI):
    """Cache reuse must not change numerics: same greedy request, same answer, always."""

    def ask(content: str) -> str:
        return (
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": content}],
                max_tokens=24,
                temperature=0,
            )
            .choices[0]
            .message.content
        )

    first = ask("Name a color.")
    answers = []
    for other in ("Name a colour, please.", "Tell me about owls. " * 40, "Name a color!"):
        ask(other)  # shares a prefix with the next request, to different lengths
        answers.append(ask("Name a color."))
    assert answers == [first] * 3
