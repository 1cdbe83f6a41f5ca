"""Watermarking (Kirchenbauer et al., 2023): the keyed green-list rule and its z-test, the
miner's bias, honest re-checks of watermarked answers, and POST /v1/watermark/detect on a
real network of the bundled model."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import MODEL, Network, metric
from covey.coordinator.api import watermark as route
from covey.coordinator.errors import ApiError
from covey.coordinator.miners import MinerRegistry, MinerSession
from covey.miner.backends.watermark import GreenList
from covey.protocol import Hardware, Hello, ModelOffer, Tokenize, Tokens, decode_frame
from covey.protocol.watermark import (
    GAMMA,
    derive_key,
    detect,
    is_green,
    parse_key,
    prev_offset,
    threshold,
    token_table,
    token_value,
)

KEY = hashlib.sha256(b"covey test watermark key").digest()
FORCED = "smollm2-always-watermarked"  # the bundled weights under a second name
MIN_TOKENS = 100  # an answer shorter than this is asked again with another seed
TOPICS = ("a dragon who learns to bake bread", "a lighthouse keeper and a lost whale",
          "a robot that wants to become a gardener", "two rival chess players on a train",
          "a village where it never stops snowing", "a girl who finds a map in a library",
          "a detective cat in Paris", "a spaceship crew that discovers an ocean planet",
          "an old clockmaker and his apprentice", "a knight who is afraid of horses",
          "a musician who can hear colours", "a boy who builds a boat from books",
          "the last tree in a desert city", "a pirate who collects maps of the sky",
          "a fox who runs a small bookshop", "a mountain climber and a talking crow",
          "a baker who opens a shop on the moon", "twin sisters who swap places for a day",
          "a storm that carries a house across the sea", "a scientist who shrinks herself")


# --- the rule and the z-test (no network) ---------------------------------------------


def test_table_and_mask_equal_the_per_token_rule():
    n = 3000
    table = np.frombuffer(token_table(KEY, n), dtype="<u4")
    assert [int(x) for x in table[:50]] == [token_value(KEY, t) for t in range(50)]
    green = GreenList(KEY, n)
    for prev in (0, 1, 17, 2999, 123_456):
        mask = green.mask(prev)
        assert mask.tolist() == [is_green(KEY, prev, t) for t in range(n)]
        assert abs(mask.mean() - GAMMA) < 0.04  # a γ share of the vocabulary
    scores = np.zeros(n, dtype=np.float32)
    biased = green(np.array([5, 9, 17]), scores)
    assert biased.dtype == np.float32
    assert np.array_equal(biased, np.where(green.mask(17), 2.0, 0.0))
    rows = green.bias_rows(np.zeros((3, n)), np.array([0, 1, 17]))
    for row, prev in zip(rows, (0, 1, 17), strict=True):
        assert np.array_equal(row, np.where(green.mask(prev), 2.0, 0.0))


def test_green_lists_depend_on_the_key_and_the_previous_token():
    other = bytes(32)
    same_key = np.mean([is_green(KEY, 1, t) == is_green(KEY, 2, t) for t in range(4000)])
    same_prev = np.mean([is_green(KEY, 1, t) == is_green(other, 1, t) for t in range(4000)])
    # unrelated lists agree on a share γ² + (1 − γ)² = 0.625 of tokens
    assert abs(same_key - 0.625) < 0.05 and abs(same_prev - 0.625) < 0.05
    assert prev_offset(KEY, 1) != prev_offset(other, 1)


def _green_chain(key: bytes, length: int, rng: random.Random) -> list[int]:
    """A sequence whose every token is green after the one before it."""
    ids = [rng.randrange(50_000)]
    while len(ids) < length:
        t = rng.randrange(50_000)
        if is_green(key, ids[-1], t):
            ids.append(t)
    return ids


def test_z_score_of_synthetic_sequences():
    rng = random.Random(7)
    all_green = detect(KEY, _green_chain(KEY, 101, rng))
    assert (all_green.tokens_scored, all_green.green_tokens) == (100, 100)
    assert math.isclose(all_green.z_score, 75 / math.sqrt(100 * 0.25 * 0.75))
    assert all_green.watermarked and all_green.p_value < 1e-30
    # Random text: z is standard normal, p uniform.
    zs = [detect(KEY, [rng.randrange(50_000) for _ in range(200)]).z_score
          for _ in range(300)]
    assert abs(statistics.mean(zs)) < 0.2 and 0.85 < statistics.stdev(zs) < 1.15
    assert not any(z > 4 for z in zs)
    # Another key sees no watermark in the green chain.
    assert abs(detect(bytes(32), _green_chain(KEY, 201, rng)).z_score) < 4
    # Half the tokens green: z = (g − γT)/√(Tγ(1−γ)) by hand, p from the normal tail.
    mixed = detect(KEY, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    g = sum(is_green(KEY, p, t) for p, t in zip(range(1, 9), range(2, 10), strict=True))
    assert mixed.green_tokens == g and mixed.tokens_scored == 8
    z = (g - 2) / math.sqrt(8 * 0.25 * 0.75)
    assert math.isclose(mixed.z_score, z)
    assert math.isclose(mixed.p_value, 0.5 * math.erfc(z / math.sqrt(2)))


def test_repeated_pairs_are_scored_once():
    ids = [11, 22] * 50
    assert detect(KEY, ids).tokens_scored == 2
    assert detect(KEY, ids, unique=False).tokens_scored == 99
    with pytest.raises(ValueError, match="at least 2 tokens"):
        detect(KEY, [5])
    with pytest.raises(ValueError):
        threshold(1.0)
    assert threshold(0.25) == 2**30


def test_keys():
    seed = bytes(range(32))
    assert derive_key(seed) == derive_key(seed) != derive_key(bytes(32))
    assert len(derive_key(seed)) == 32 and derive_key(seed) != seed
    assert parse_key(f" {KEY.hex()}\n") == KEY
    for bad in ("zz", "00" * 16):
        with pytest.raises(ValueError):
            parse_key(bad)


def test_the_coordinator_derives_its_key_from_its_identity(tmp_path: Path):
    from covey.coordinator.app import CoordinatorConfig, create_app
    from covey.protocol.identity import load_or_create

    app = create_app(CoordinatorConfig(data_dir=tmp_path))
    seed = load_or_create(tmp_path / "coordinator.key").encode()
    assert app.state.watermark_key == derive_key(seed)
    app = create_app(CoordinatorConfig(data_dir=tmp_path, watermark_key=KEY))
    assert app.state.watermark_key == KEY


class _FakeSocket:
    """Stands in for a miner's WebSocket: answers ``tokenize`` as told."""

    def __init__(self, session: list[MinerSession], answer: str) -> None:
        self.session, self.answer = session, answer

    async def send_text(self, raw: str) -> None:
        frame = decode_frame(raw)
        assert isinstance(frame, Tokenize)
        queue = self.session[0].jobs[frame.job_id]
        if self.answer == "ids":
            queue.put_nowait(Tokens(job_id=frame.job_id, token_ids=(1, 2, 3)))
        elif self.answer == "gone":
            self.session[0].fail_open_jobs()


def _session(answer: str, name: str) -> MinerSession:
    offer = ModelOffer(name=MODEL, sha256="0" * 64, context_length=64, backend="test")
    hello = Hello(public_key=name * 64, nonce="0" * 64, hardware=Hardware(cpu_count=1,
                  ram_bytes=0), models=(offer,), slots=1, version="t", signature="0" * 128)
    holder: list[MinerSession] = []
    session = MinerSession(miner_id=name * 64, hello=hello,
                           websocket=_FakeSocket(holder, answer))  # type: ignore[arg-type]
    holder.append(session)
    session.welcomed.set()
    return session


def test_tokenize_asks_another_miner_and_maps_failures(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(route, "TOKENIZE_TIMEOUT", 0.2)

    async def status(registry: MinerRegistry, model: str = MODEL) -> int | list[int]:
        try:
            return await route.tokenize(registry, model, "some text")
        except ApiError as exc:
            return exc.status

    async def main() -> None:
        registry = MinerRegistry({MODEL: 64})
        assert await status(registry, "no-such-model") == 404
        assert await status(registry) == 503  # known, no miner
        registry.add(_session("gone", "a"))
        assert await status(registry) == 503  # the only miner left
        registry.add(_session("ids", "b"))
        for _ in range(5):  # whichever is asked first, the answer comes
            assert await status(registry) == [1, 2, 3]
        registry = MinerRegistry({MODEL: 64})
        registry.add(_session("silent", "c"))
        assert await status(registry) == 504

    asyncio.run(main())


# --- a real network ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """Two miners of the bundled model and one serving it as :data:`FORCED`, under a
    coordinator that re-checks every job and watermarks every answer of ``FORCED``."""
    tmp = tmp_path_factory.mktemp("watermark")
    key_file = tmp / "watermark.key"
    key_file.write_text(KEY.hex() + "\n")
    network = Network(tmp, "--check-rate", "1", "--watermark-key", str(key_file),
                      "--watermark", FORCED)
    try:
        network.add_miner("--ctx", "1024", wait=False)
        network.add_miner("--ctx", "1024", wait=False)
        network.wait_miners(2)
        network.add_miner("--ctx", "1024", "--model", str(_bundled()), "--name", FORCED,
                          wait=False)
        network.wait_miners(1, FORCED)
        yield network
    finally:
        network.close()


def _bundled() -> Path:
    from covey.miner.models import bundled_path

    return bundled_path(MODEL)


def _detect(net: Network, text: str, model: str = MODEL) -> httpx.Response:
    return httpx.post(f"{net.url}/v1/watermark/detect", headers=net.headers,
                      json={"model": model, "text": text}, timeout=30)


def _story(client: openai.OpenAI, i: int, watermark: bool, model: str = MODEL) -> str:
    """A story of at least :data:`MIN_TOKENS` tokens; another seed when one stops short."""
    for attempt in range(4):
        r = client.chat.completions.create(
            model=model, temperature=1.0, max_tokens=130, seed=i + 1000 * attempt,
            messages=[{"role": "user", "content": f"Write a long story about {TOPICS[i]}."}],
            extra_body={"watermark": True} if watermark else None)
        if r.usage is not None and r.usage.completion_tokens >= MIN_TOKENS:
            return r.choices[0].message.content or ""
    raise AssertionError(f"no answer of {MIN_TOKENS} tokens for topic {i} in 4 tries")


def test_watermarked_answers_are_detected_and_plain_ones_are_not(net: Network):
    client = openai.OpenAI(base_url=f"{net.url}/v1", api_key=net.api_key, max_retries=0,
                           timeout=300)
    with ThreadPoolExecutor(2) as pool:
        marked = list(pool.map(lambda i: _story(client, i, True), range(20)))
        plain = list(pool.map(lambda i: _story(client, i, False), range(20)))
    scores = {}
    for kind, texts in (("watermarked", marked), ("plain", plain)):
        found = []
        for text in texts:
            r = _detect(net, text)
            assert r.status_code == 200, r.text
            found.append(r.json())
        scores[kind] = [d["z_score"] for d in found]
        assert all(d["tokens_scored"] >= 50 for d in found), found
    z_marked, z_plain = scores["watermarked"], scores["plain"]
    print(f"watermarked z: min {min(z_marked):.2f} median {statistics.median(z_marked):.2f}; "
          f"plain max |z| {max(map(abs, z_plain)):.2f}, mean {statistics.mean(z_plain):.2f}; "
          f"all: {[round(z, 2) for z in z_marked]} {[round(z, 2) for z in z_plain]}")
    assert all(z > 4 for z in z_marked), z_marked
    # Plain text's z is standard normal, so "all 20 within ±2" fails 61% of the time
    # (1 − 0.954²⁰) for any key: assert what an honest detector guarantees instead. No
    # plain answer is judged watermarked, their mean is near 0 (its standard error is
    # 0.22; a leaked bias would push it far up), and few leave ±2 (P(≥ 4 of 20) = 1%).
    assert all(abs(z) < 4 for z in z_plain), z_plain
    assert abs(statistics.mean(z_plain)) < 1, z_plain
    assert sum(abs(z) >= 2 for z in z_plain) <= 3, z_plain
    d = _detect(net, marked[0]).json()
    assert d["watermarked"] and d["threshold"] == 4.0 and d["gamma"] == GAMMA
    assert d["model"] == MODEL and 0 <= d["p_value"] < 3e-5


def test_the_network_key_is_the_key_file(net: Network):
    """The coordinator scores with --watermark-key: the same ids score the same locally."""
    import llama_cpp

    text = "The quick brown fox jumps over the lazy dog, and then it runs far away."
    llm = llama_cpp.Llama(model_path=str(_bundled()), n_ctx=64, vocab_only=True,
                          verbose=False)
    local = detect(KEY, llm.tokenize(text.encode(), add_bos=False, special=False))
    remote = _detect(net, text).json()
    assert (remote["tokens_scored"], remote["green_tokens"]) == (
        local.tokens_scored, local.green_tokens)
    assert math.isclose(remote["z_score"], local.z_score)


def test_a_model_watermarked_by_the_coordinator_is_always_watermarked(net: Network):
    client = openai.OpenAI(base_url=f"{net.url}/v1", api_key=net.api_key, max_retries=0,
                           timeout=300)
    text = _story(client, 3, False, FORCED)  # not asked for: the coordinator adds it
    assert _detect(net, text, FORCED).json()["z_score"] > 4


def _settled_checks(net: Network, timeout: float = 90) -> float:
    """Sampled checks passed, once every answered request's check has ended."""
    def answered() -> float:
        text = httpx.get(f"{net.url}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("covey_requests_total{") and 'status="200"' in line)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = sum(metric(net, f'covey_checks_total{{kind="sampled",result="{r}"}}')
                    for r in ("passed", "failed", "skipped"))
        if ended >= answered():
            break
        time.sleep(0.3)
    return metric(net, 'covey_checks_total{kind="sampled",result="passed"}')


def test_watermarked_answers_pass_their_re_checks(net: Network):
    """Every job is re-checked (--check-rate 1); the validator applies the same bias, so an
    honest watermarked miner, greedy or sampled (top-p too), never fails one. A greedy
    answer would fail without it: the bias moves the argmax by up to δ = 2 logits."""
    body = {"model": MODEL, "max_tokens": 60, "watermark": True,
            "messages": [{"role": "user", "content": "Describe a forest in autumn."}]}
    before = _settled_checks(net)
    for extra in ({"temperature": 0}, {"temperature": 0.8, "top_p": 0.9},
                  {"temperature": 1.0, "seed": 5}):
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers,
                       json={**body, **extra}, timeout=120)
        assert r.status_code == 200, r.text
    assert _settled_checks(net) == before + 3
    assert metric(net, 'covey_checks_total{kind="sampled",result="failed"}') == 0
    for m in httpx.get(f"{net.url}/v1/miners", timeout=10).json()["data"]:
        r = httpx.get(f"{net.url}/v1/miners/{m['id']}/checks", timeout=10)
        assert r.status_code == 200 and r.json()["data"] == [], r.text


def test_detect_refuses_bad_input_in_openai_shape(net: Network):
    def error(r: httpx.Response, status: int) -> dict:
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert set(body) == {"message", "type", "param", "code"}
        return body

    assert error(_detect(net, ""), 400)["param"] == "text"
    short = error(_detect(net, "a"), 400)
    assert short["code"] == "text_too_short" and "at least 2" in short["message"]
    assert error(_detect(net, "some text", "no-such-model"), 404)["code"] == "model_not_found"
    r = httpx.post(f"{net.url}/v1/watermark/detect", json={"model": MODEL, "text": "hi there"},
                   timeout=10)
    error(r, 401)
    r = httpx.post(f"{net.url}/v1/watermark/detect", headers=net.headers,
                   json={"model": MODEL}, timeout=10)
    assert error(r, 400)["param"] == "text"
