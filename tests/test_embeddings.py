"""``POST /v1/embeddings``: the real ``openai`` client against a real coordinator and one
miner process serving the bundled chat model and all-MiniLM-L6-v2 at once; vectors compared
with sentence-transformers in this process; errors, billing and verification."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from openai import BadRequestError, OpenAI

from conftest import MODEL, Network, Proc, ledger_verify, metric
from covey.miner.backends.adversary import ENV, HONEST_FIRST_ENV, make_embedding_impostor
from covey.miner.models import BUNDLED_EMBEDDING_MODEL as EMBED
from covey.miner.models import bundled_path
from test_billing import account, sign_up
from test_verify import SLASH, checks_of, stake

SENTENCES = ["A cat sat on the mat.", "The stock market fell sharply today.",
             "Ein Hund läuft im Park. 🐕", "x"]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A coordinator and one miner process serving the chat and the embedding model."""
    net = Network(tmp_path_factory.mktemp("embed"))
    try:
        net.add_miner("--ctx", "1024", "--model", MODEL, "--model", EMBED, wait=False)
        net.wait_miners(1)
        net.wait_miners(1, EMBED)
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def reference():
    """all-MiniLM-L6-v2 in this process, as a user of sentence-transformers runs it."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    return SentenceTransformer(str(bundled_path(EMBED)), device="cpu")


def _client(net: Network) -> OpenAI:
    return OpenAI(base_url=f"{net.url}/v1", api_key=net.api_key, max_retries=0)


def _cosine_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return 1 - dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_openai_client_gets_the_vectors_sentence_transformers_computes(net, reference):
    client = _client(net)
    want = reference.encode(SENTENCES)
    tokens = sum(len(ids) for ids in reference.tokenizer(SENTENCES)["input_ids"])

    batch = client.embeddings.create(model=EMBED, input=SENTENCES)
    assert [d.index for d in batch.data] == list(range(len(SENTENCES)))
    for d, w in zip(batch.data, want, strict=True):
        assert len(d.embedding) == 384
        assert _cosine_distance(d.embedding, w.tolist()) < 1e-5
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == tokens
    assert batch.model == EMBED

    single = client.embeddings.create(model=EMBED, input=SENTENCES[0])
    assert len(single.data) == 1
    assert _cosine_distance(single.data[0].embedding, want[0].tolist()) < 1e-5

    # base64: little-endian float32, as OpenAI sends it
    b64 = client.embeddings.create(model=EMBED, input=SENTENCES[:2], encoding_format="base64")
    raw = base64.b64decode(b64.data[1].embedding)
    assert _cosine_distance(list(struct.unpack("<384f", raw)), want[1].tolist()) < 1e-5


def test_token_id_inputs_embed_like_their_text(net, reference):
    ids = reference.tokenizer(SENTENCES[:2], add_special_tokens=False)["input_ids"]
    by_ids = _client(net).embeddings.create(model=EMBED, input=ids)
    want = reference.encode(SENTENCES[:2])
    for d, w in zip(by_ids.data, want, strict=True):
        assert _cosine_distance(d.embedding, w.tolist()) < 1e-5
    one = _client(net).embeddings.create(model=EMBED, input=ids[0])
    assert _cosine_distance(one.data[0].embedding, want[0].tolist()) < 1e-5


def test_one_miner_serves_chat_and_embeddings(net):
    models = {m["id"]: m for m in httpx.get(f"{net.url}/v1/models").json()["data"]}
    assert models[MODEL]["kind"] == "chat" and models[EMBED]["kind"] == "embedding"
    assert models[EMBED]["context_length"] == 256 and models[EMBED]["dimensions"] == 384
    miners = httpx.get(f"{net.url}/v1/miners").json()["data"]
    assert len(miners) == 1
    assert {m["name"] for m in miners[0]["models"]} == {MODEL, EMBED}
    chat = _client(net).chat.completions.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Say hi."}])
    assert chat.choices[0].message.content
    assert _client(net).embeddings.create(model=EMBED, input="hi").data[0].embedding


def test_embeddings_are_billed_per_input_token(net):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    r = httpx.post(f"{net.url}/v1/embeddings", headers=headers, timeout=30,
                   json={"model": EMBED, "input": SENTENCES})
    assert r.status_code == 200, r.text
    tokens = r.json()["usage"]["prompt_tokens"]
    after = account(net, headers)
    # the network's floor: 0.1 credit per 1M input tokens, rounded up to whole µcr
    assert before - after["balance"] == -(-tokens * 100_000 // 1_000_000)
    assert after["held"] == 0
    assert after["usage"][EMBED]["prompt_tokens"] == tokens
    receipt = httpx.get(f"{net.url}/v1/receipts/{r.json()['id']}", headers=headers)
    assert receipt.status_code == 200, receipt.text
    assert receipt.json()["receipt"]["prompt_tokens"] == tokens


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"model": MODEL, "input": "hi"}, 400, "invalid_value", "model"),
    ({"model": EMBED, "input": ""}, 400, "invalid_value", "input"),
    ({"model": EMBED, "input": []}, 400, "invalid_value", "input"),
    ({"model": EMBED, "input": "hi", "dimensions": 128}, 400, "invalid_value", "dimensions"),
    ({"model": EMBED, "input": "word " * 400}, 400, "context_length_exceeded", "input"),
    ({"model": EMBED, "input": [[10**8]]}, 400, "invalid_value", "input"),
    ({"model": EMBED, "input": "hi", "encoding_format": "int8"}, 400, "invalid_value",
     "encoding_format"),
    ({"model": "nope", "input": "hi"}, 404, "model_not_found", "model"),
    ({"input": "hi"}, 400, "missing_required_parameter", "model"),
])
def test_bad_requests_get_openai_errors_and_cost_nothing(net, body, status, code, param):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    r = httpx.post(f"{net.url}/v1/embeddings", headers=headers, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"]
    after = account(net, headers)
    assert (after["balance"], after["held"]) == (before, 0)


def test_an_empty_input_is_named_plainly(net):
    r = httpx.post(f"{net.url}/v1/embeddings", headers=net.headers, timeout=30,
                   json={"model": EMBED, "input": ["a", ""]})
    assert r.json()["error"]["message"] == (
        "Invalid value for 'input': an input string is empty; every input needs text.")


def test_quote_gives_an_embeddings_requests_maximum_cost(net):
    r = httpx.post(f"{net.url}/v1/quote", headers=net.headers, timeout=30,
                   json={"model": EMBED, "input": ["héllo", "world"]})
    assert r.status_code == 200, r.text
    quote = r.json()
    # UTF-8 bytes + 4 special tokens per input, at the floor of 0.1 credit per 1M tokens
    assert quote["max_prompt_tokens"] == (6 + 4) + (5 + 4)
    assert quote["max_cost"] == 2 and quote["max_completion_tokens"] == 0
    r = httpx.post(f"{net.url}/v1/quote", headers=net.headers, timeout=30,
                   json={"model": MODEL, "input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_text_json_cannot_carry_is_400_and_frees_the_keys_slot(net):
    headers = sign_up(net)
    body = b'{"model": "%s", "input": ["ok", "a\\ud800 b"]}' % EMBED.encode()
    for _ in range(40):  # more than the key's concurrency limit (32)
        r = httpx.post(f"{net.url}/v1/embeddings", content=body, timeout=30,
                       headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_value"
    r = httpx.post(f"{net.url}/v1/embeddings", headers=headers, timeout=30,
                   json={"model": EMBED, "input": "still served"})
    assert r.status_code == 200, r.text
    assert account(net, headers)["held"] == 0


@pytest.mark.parametrize(("value", "says"), [
    (["a"] * 2049, "at most 2048"), ([[1]] * 2049, "at most 2048"), ([-1], "0 to 2^31"),
    (["a", 1], "strings only or token ids only"), (None, "expected a string"),
])
def test_malformed_inputs_are_named_plainly(net, value, says):
    r = httpx.post(f"{net.url}/v1/embeddings", headers=net.headers, timeout=30,
                   json={"model": EMBED, "input": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert says in r.json()["error"]["message"]


def test_a_long_task_reports_progress_instead_of_stalling(tmp_path: Path):
    """With a 4 s stall timeout, a task of many full-length inputs outlasts it: the miner's
    progress frames keep it alive, and nobody's reputation suffers."""
    net = Network(tmp_path, "--stall-timeout", "4")
    try:
        net.add_miner("--model", EMBED, wait=False)
        net.wait_miners(1, EMBED)
        started = time.monotonic()
        r = httpx.post(f"{net.url}/v1/embeddings", headers=net.headers, timeout=300,
                       json={"model": EMBED, "input": ["word " * 300] * 192,
                             "truncate": True})
        assert r.status_code == 200, r.text
        assert time.monotonic() - started > 4  # it did outlast the stall timeout
        assert r.json()["usage"]["prompt_tokens"] == 192 * 256
        miner = httpx.get(f"{net.url}/v1/miners").json()["data"][0]
        assert miner["jobs_failed"] == 0
    finally:
        net.close()


def test_a_client_that_leaves_cancels_the_task_and_pays_nothing(net):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{net.url}/v1/embeddings", headers=headers, timeout=1.0,
                   json={"model": EMBED, "input": ["word " * 300] * 512, "truncate": True})
    assert net.wait_idle(10), "the coordinator still counts the task"
    # The miner stops computing too (within one chunk of work), not minutes later.
    miner = psutil.Process(net.miners[0].popen.pid)
    time.sleep(2)
    cpu = miner.cpu_times()
    time.sleep(2)
    busy = sum(miner.cpu_times()[:2]) - sum(cpu[:2])
    assert busy < 1.0, f"the miner used {busy:.1f} CPU seconds in 2 s after the cancel"
    deadline = time.monotonic() + 10
    while account(net, headers)["held"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = account(net, headers)
    assert (after["balance"], after["held"]) == (before, 0)
    # The miner's slot is free again: a small request is served at once.
    started = time.monotonic()
    r = httpx.post(f"{net.url}/v1/embeddings", headers=headers, timeout=30,
                   json={"model": EMBED, "input": "hello"})
    assert r.status_code == 200 and time.monotonic() - started < 5


def test_truncate_cuts_long_inputs_instead(net):
    r = httpx.post(f"{net.url}/v1/embeddings", headers=net.headers, timeout=30,
                   json={"model": EMBED, "input": "word " * 400, "truncate": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 256


def test_chat_request_to_an_embedding_model_is_400(net):
    with pytest.raises(BadRequestError) as caught:
        _client(net).chat.completions.create(
            model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert caught.value.body["param"] == "model"


def test_a_miner_returning_random_vectors_is_caught_and_slashed(tmp_path: Path):
    net = Network(tmp_path, "--check-rate", "1")
    try:
        headers = sign_up(net)
        net.add_miner("--model", EMBED, wait=False)
        net.wait_miners(1, EMBED)
        honest = httpx.get(f"{net.url}/v1/miners").json()["data"][0]["id"]
        # Honest on its one trial task, random vectors from then on.
        net.add_miner("--model", EMBED, wait=False,
                      env={ENV: "random-vectors", HONEST_FIRST_ENV: "1"})
        net.wait_miners(2, EMBED)
        cheat = stake(net, 1, headers)
        found: list[dict] = []
        for i in range(20):
            r = httpx.post(f"{net.url}/v1/embeddings", headers=headers, timeout=60,
                           json={"model": EMBED, "input": [f"sentence number {i}"] * 2})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 10
            while not found and time.monotonic() < deadline:
                found = checks_of(net, cheat)
                time.sleep(0.2)
            if found:
                break
        assert found, "random vectors were not caught"
        check = found[0]
        assert check["kind"] == "sampled" and check["verdict"]["passed"] is False
        assert "cosine" in check["verdict"]["reasons"][0]
        assert check["slashed"] == SLASH and check["validator"] == honest
        assert metric(net, 'covey_checks_total{kind="sampled",result="failed"}') >= 1
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_miner_serving_another_embedding_model_fails_its_trial(tmp_path: Path):
    impostor = make_embedding_impostor(bundled_path(EMBED), tmp_path / "impostor")
    net = Network(tmp_path)
    try:
        headers = sign_up(net)
        net.add_miner("--model", EMBED, wait=False)
        net.wait_miners(1, EMBED)
        honest = net.add_miner("--model", EMBED, wait=False)
        net.wait_miners(2, EMBED)
        cheat = stake(net, 1, headers)
        honest.stop()
        net.wait_miners(1, EMBED)
        # The same key and name, other weights under the bundled model's digest.
        proc = Proc([*honest.args], tmp_path / "impostor.log", {ENV: f"wrong-model:{impostor}"})
        net.miners.append(proc)
        proc.popen.wait(120)
        assert proc.popen.returncode == 1
        assert "failed its trial" in proc.output()
        found = checks_of(net, cheat)
        assert len(found) == 1 and found[0]["kind"] == "trial"
        assert "cosine" in found[0]["verdict"]["reasons"][0]
        assert found[0]["slashed"] == SLASH
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_web_page_compares_two_sentences(net):
    from test_web import CHROMIUM, CHROMIUM_ARGS, _browser_or_skip

    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The page's CSP forbids the eval that wait_for_function uses.
            page = browser.new_page(bypass_csp=True)
            page.goto(net.url + "/")
            button = page.locator(f'#models button[data-model="{EMBED}"]')
            button.wait_for()
            assert "embedding" in button.inner_text()
            page.click("#signup")
            page.wait_for_function(
                "document.querySelector('#account-info').textContent.includes('credits')")
            button.click()
            assert page.is_visible("#compare-pane") and not page.is_visible("#chat-pane")
            page.fill("#sentence-a", "A cat sat on the mat.")
            page.fill("#sentence-b", "A kitten was lying on the rug.")
            page.click("#compare")
            page.wait_for_function("document.querySelector('#similarity').dataset.value")
            close = float(page.get_attribute("#similarity", "data-value") or "nan")
            page.fill("#sentence-b", "Quarterly earnings beat analyst expectations.")
            page.click("#compare")
            page.wait_for_function(
                f"document.querySelector('#similarity').dataset.value !== '{close:.4f}'")
            far = float(page.get_attribute("#similarity", "data-value") or "nan")
            assert 0.3 < close <= 1.0 and far < close
            assert "input tokens" in page.inner_text("#compare-usage")
        finally:
            browser.close()


def test_recorded_embedding_references_match_the_bundled_ones_and_load(tmp_path: Path):
    from importlib import resources

    from covey.coordinator.verify.embeddings import load_references, split_reference_files

    out = tmp_path / "refs.json"
    done = subprocess.run([sys.executable, "-m", "covey", "trials", "record-embeddings", EMBED,
                           "-o", str(out), "--data-dir", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    bundled = load_references()
    recorded = load_references([out])
    (sha, ref), = json.loads(out.read_text()).items()
    assert len(ref["vectors"]) == 4 and len(ref["vectors"][0]) == 384
    for mine, theirs in zip(recorded[sha].vectors, bundled[sha].vectors, strict=True):
        assert _cosine_distance(list(mine), list(theirs)) < 1e-6
    chat = Path(str(resources.files("covey.coordinator.verify").joinpath("trials.json")))
    assert split_reference_files([out, chat]) == ([chat], [out])
