"""Private models: a permuted-vocabulary copy answers token for token as the plain model,
holds no vocabulary string, refuses text, and joins a network."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest

from conftest import Network
from covey.client.private import PrivateModel
from covey.coordinator.billing import prompt_token_bound
from covey.miner.backends.base import BackendError
from covey.miner.backends.llama_cpp import LlamaCppBackend, LlamaCppConfig
from covey.miner.models import BUNDLED_MODEL, ModelFile, bundled_path
from covey.protocol import Check, Delta, Done, Job, SamplingParams, Started
from covey.protocol.frames import ChatMessage
from covey.protocol.permutation import KeyFileError, inverse, load_key, permutation

PLAIN = bundled_path(BUNDLED_MODEL)
SHA = "0" * 64  # the backends never check their own hash
MAX_TOKENS = 24

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
    "List three fruits.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to code.",
    "Who wrote Romeo and Juliet?",
    "Describe the colour blue to someone who cannot see.",
    "What is photosynthesis?",
    "Name a famous scientist and say why.",
    "Say hello in a friendly way.",
    "Why is the sky blue?",
    "Suggest a name for a cat.",
    "What does DNA stand for?",
    "Tell me a fun fact about octopuses.",
    "How many days are in a leap year?",
    "Write one line of Python that prints hi.",
    "What is the boiling point of water?",
    "Summarise the plot of Cinderella.",
]
STOPS = {3: ("\n",), 7: (" and",), 12: ("because",), 16: (".",)}
"""Prompts whose requests carry stop strings (honoured by the plain miner, and for the
private model by the client's decoder)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    """(private GGUF, key file, stderr of `covey model private`) made by the CLI."""
    tmp = tmp_path_factory.mktemp("private")
    key, out = tmp / "model.key", tmp / "private.gguf"
    run = subprocess.run([sys.executable, "-m", "covey", "model", "private", "--key", str(key),
                          BUNDLED_MODEL, str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    yield out, key, run.stderr


@pytest.fixture(scope="module")
def client(files: tuple[Path, Path, str]) -> Iterator[PrivateModel]:
    with PrivateModel.from_key_file(files[1], PLAIN) as pm:
        yield pm


def _backend(path: Path, name: str) -> LlamaCppBackend:
    return LlamaCppBackend(ModelFile(name, path), SHA, 1,
                           LlamaCppConfig(n_ctx=512, n_threads=1, stream_interval=0))


async def _answer(backend: LlamaCppBackend, job: Job) -> tuple[int, list[int], str, str]:
    """(prompt tokens, token ids, text, finish reason) of one job."""
    prompt, ids, text, finish = -1, [], [], ""
    async for frame in backend.generate(job):
        if isinstance(frame, Started):
            prompt = frame.prompt_tokens
        elif isinstance(frame, Delta):
            ids.extend(frame.token_ids)
            text.append(frame.text)
        elif isinstance(frame, Done):
            finish = frame.finish_reason
    return prompt, ids, "".join(text), finish


def test_cli_writes_a_private_model_and_a_private_key(files: tuple[Path, Path, str]):
    out, key, stderr = files
    assert "created a new key" in stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(load_key(key)) == 32
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["covey.private"].contents() is True
    assert fields["tokenizer.ggml.model"].contents() == "none"
    assert fields["llama.vocab_size"].contents() == 49152


def test_permutation_is_keyed_deterministic_and_invertible(tmp_path: Path):
    a, b = bytes(range(32)), bytes(range(1, 33))
    p = permutation(a, 1000)
    assert p == permutation(a, 1000) and sorted(p) == list(range(1000))
    assert p != permutation(b, 1000)
    assert [inverse(p)[t] for t in p] == list(range(1000))
    with pytest.raises(ValueError):
        permutation(b"short", 10)
    loose = tmp_path / "loose.key"
    loose.write_text(a.hex())
    loose.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(loose)


def test_private_answers_match_the_plain_model(files: tuple[Path, Path, str],
                                               client: PrivateModel):
    """Greedy, 20 prompts × 24 tokens: the same ids (mapped back) and the same text."""
    plain, private = _backend(PLAIN, "plain"), _backend(files[0], "private")
    assert private.offer.private and not plain.offer.private

    async def run() -> None:
        stopped = []
        for i, prompt in enumerate(PROMPTS):
            messages = [{"role": "user", "content": prompt}]
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=STOPS.get(i, ()))
            want = await _answer(plain, Job(
                job_id=f"p{i}", model="plain", params=params,
                messages=tuple(ChatMessage(**m) for m in messages)))
            job = Job(job_id=f"q{i}", model="private", params=params,
                      prompt_ids=tuple(client.chat_ids(messages)), stop_ids=client.stop_ids)
            got = await _answer(private, job)
            assert got[0] == want[0]  # same prompt length
            assert got[2] == ""  # a private model streams ids only
            real = client.unmap(got[1])
            decoder = client.decoder(STOPS.get(i, ()))
            text = decoder.feed(got[1]) + decoder.finish()
            assert text == want[2], prompt
            if i in STOPS and want[3] == "stop":
                # the miner cannot see stop strings: the client cut the same text
                assert real[: len(want[1])] == want[1]
            else:
                assert real == want[1], prompt
                assert got[3] == want[3]
            if got[3] == "stop" and i not in STOPS:
                stopped.append((job, got[1]))
        # A validator re-checks a private answer that ended on one of the job's stop ids.
        assert stopped, "no answer ended on an end-of-generation token"
        job, ids = stopped[0]
        report = await private.check(Check(job_id="c1", job=job, token_ids=tuple(ids),
                                           text="", finish_reason="stop"))
        assert report.text_matches and report.eos_checked
        assert max(report.gaps) == 0.0  # greedy: every token, the end too, is the argmax

    try:
        asyncio.run(run())
    finally:
        plain.close()
        private.close()


def test_private_model_refuses_text(files: tuple[Path, Path, str]):
    private = _backend(files[0], "smollm2-private")

    async def first(job: Job) -> object:
        async for frame in private.generate(job):
            return frame

    async def refusals() -> None:
        # One event loop for every call: a backend's free-slot queue belongs to the loop
        # it first ran on, and a slot freed after asyncio.run closed its loop is lost.
        for field, value in (("messages", (ChatMessage(role="user", content="hi"),)),
                             ("prompt", "hi")):
            with pytest.raises(BackendError) as caught:
                await first(Job(job_id="t", model="m", **{field: value}))
            assert caught.value.code == "invalid_value" and caught.value.param == field
            assert "smollm2-private is a private model: send token ids" in caught.value.message
        with pytest.raises(BackendError, match="outside this model's vocabulary"):
            await first(Job(job_id="t", model="m", prompt_ids=(1, 49152)))

    try:
        asyncio.run(refusals())
        with pytest.raises(BackendError, match="tokenize"):
            private.tokenize("hi")
    finally:
        private.close()


_KEEP = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
         *range(ord("®"), ord("ÿ") + 1)]
_TO_BYTE = {chr(b): b for b in _KEEP} | {
    chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in _KEEP)}
"""GPT-2's byte-level alphabet, reversed (``bytes_to_unicode`` in GPT-2's ``encoder.py``)."""


def _byte_level_forms(token: str) -> set[bytes]:
    """A token's raw UTF-8 form and its bytes after undoing GPT-2's byte-to-unicode map
    (``Ġ`` → space, ``Ċ`` → newline …)."""
    forms = {token.encode()}
    if all(c in _TO_BYTE for c in token):
        forms.add(bytes(_TO_BYTE[c] for c in token))
    return forms


def test_private_file_holds_no_vocabulary_string(files: tuple[Path, Path, str]):
    """Every plain token string of ≥ 4 bytes is absent from the private file's metadata,
    except those that are also words of the structural metadata the file must keep (key
    names, tensor names, string values: general.* such as "HuggingFaceTB", and "none" of
    tokenizer.ggml.model), and the tensor
    data is the plain model's, rows moved, byte for byte: nothing of the vocabulary was
    added there (a quantized weight may spell 4–5 bytes of a token by chance, as in the
    plain file)."""
    plain, private = gguf.GGUFReader(str(PLAIN)), gguf.GGUFReader(str(files[0]))
    field = plain.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    forms = {f for t in tokens for f in _byte_level_forms(t) if len(f) >= 4}
    assert len(forms) > 40_000
    header = files[0].read_bytes()[: private.data_offset]
    structural = b"\n".join(
        [f.name.encode() for f in private.fields.values()]
        + [t.name.encode() for t in private.tensors]
        + [str(f.contents()).encode() for f in private.fields.values()
           if f.types[-1] == gguf.GGUFValueType.STRING])
    found = {f for f in forms if f in header}
    excused = {f for f in found if f in structural}
    assert found - excused == set()
    assert len(excused) < 200  # words such as b"weight", b"attention", b"general"
    assert not any(f.name.startswith("tokenizer.") and f.name != "tokenizer.ggml.model"
                   for f in private.fields.values())

    perm = permutation(load_key(files[1]), 49152)
    by_name = {t.name: t for t in plain.tensors}
    padding = np.ones(files[0].stat().st_size, dtype=bool)
    padding[: private.data_offset] = False
    for t in private.tensors:
        data = np.asarray(t.data)
        if t.name == "token_embd.weight":
            data = data[perm]  # private row perm[i] is plain row i
        assert np.array_equal(data, np.asarray(by_name[t.name].data)), t.name
        padding[t.data_offset: t.data_offset + t.n_bytes] = False
    # the rest of the file is alignment padding, all zero bytes
    assert not np.fromfile(files[0], dtype=np.uint8)[padding].any()


def test_private_job_bills_its_exact_prompt_length():
    assert prompt_token_bound(Job(job_id="j", model="m", prompt_ids=(5, 6, 7))) == 3


def test_private_miners_join_a_network(files: tuple[Path, Path, str], tmp_path: Path):
    """Two miners serve the private file (the second could be trialled by the first, but
    trial prompts are text: it is admitted untried) and show up in /v1/models."""
    net = Network(tmp_path)
    try:
        for _ in range(2):
            net.add_miner("--model", str(files[0]), "--name", "smollm2-private", "--ctx", "512",
                          wait=False)
        net.wait_miners(2, model="smollm2-private")
        models = httpx.get(f"{net.url}/v1/models", timeout=5).json()["data"]
        assert {"id": "smollm2-private", "miners": 2}.items() <= next(
            m for m in models if m["id"] == "smollm2-private").items()
        miners = httpx.get(f"{net.url}/v1/miners", timeout=5).json()["data"]
        assert all(m["models"][0]["private"] and not m["held"] for m in miners)
    finally:
        net.close()
