"""Streaming never emits U+FFFD: characters split across tokens are held back until whole."""

from __future__ import annotations

import llama_cpp
import openai
import pytest

from conftest import MODEL, Network
from covey.miner.models import bundled_path

CASES = [
    ("chat", "Reply with three emoji about the sea, like 🌊🐚🐠."),
    ("chat", "Translate 'good morning' into Chinese and Japanese."),
    ("completion", "中文：你好，世界。我们"),
    ("completion", "Party time 🎉🎉🎉🎉"),
]


@pytest.fixture(scope="module")
def tokenizer():
    llm = llama_cpp.Llama(
        model_path=str(bundled_path(MODEL)), n_ctx=256, n_threads=1, verbose=False, vocab_only=True
    )
    yield llm
    llm.close()


def _split_chars(llm: llama_cpp.Llama, text: str) -> int:
    """How many of ``text``'s tokens are not valid UTF-8 on their own."""
    count = 0
    for tok in llm.tokenize(text.encode(), add_bos=False, special=False):
        try:
            llm.detokenize([tok]).decode("utf-8")
        except UnicodeDecodeError:
            count += 1
    return count


@pytest.mark.parametrize("kind,prompt", CASES)
def test_stream_has_no_replacement_chars(network: Network, tokenizer, kind: str, prompt: str):
    client = openai.OpenAI(base_url=f"{network.url}/v1", api_key=network.api_key, max_retries=0)
    if kind == "chat":
        kw = dict(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=40,
            temperature=0,
        )
        pieces = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kw, stream=True)
            if c.choices
        ]
        whole = client.chat.completions.create(**kw).choices[0].message.content
    else:
        kw = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        pieces = [
            c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices
        ]
        whole = client.completions.create(**kw).choices[0].text
    text = "".join(pieces)
    assert text == whole
    assert all("\ufffd" not in p for p in pieces), pieces
    assert any(ord(ch) > 0x2E80 for ch in text), text  # the answer has emoji or CJK
    # ...and some of its characters really were split across tokens.
    assert _split_chars(tokenizer, text) > 0
