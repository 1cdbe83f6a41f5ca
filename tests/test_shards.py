"""Sharded models: a chain of shard miners serves the bundled model, none holding it all.

Real coordinator and miner processes on 127.0.0.1, the bundled SmolLM2 GGUF read by
transformers. Greedy answers must equal the unsharded transformers answer token for token,
through 2 or 3 shards, and after a shard is killed (SIGKILL) or frozen (SIGSTOP) mid-answer;
the user is charged once and the ledger verifies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from conftest import MODEL, Network, Proc, ledger_verify, metric
from covey.miner.backends.adversary import ENV
from covey.protocol.identity import load_or_create
from covey.protocol.receipts import Receipt, verify_countersignature, verify_receipt
from test_billing import sign_up
from test_verify import SLASH, checks_of, stake

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?"]
STORY = {"model": MODEL, "temperature": 0, "max_tokens": 60,
         "messages": [{"role": "user", "content": "Write a long story about a lighthouse "
                                                  "keeper and a storm."}]}


@pytest.fixture(scope="module")
def reference() -> Iterator[object]:
    """Greedy answers of the unsharded model in this process (transformers' own
    ``generate``), as token ids and text."""
    from covey.miner.backends.transformers_shard import load_float_model
    from covey.miner.models import resolve_model, weights_sha256

    path = resolve_model(MODEL).path
    model, tokenizer = load_float_model(path, weights_sha256(path))

    def answer(content: str, max_tokens: int) -> tuple[list[int], str]:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
        ids = out[0, enc["input_ids"].shape[1]:].tolist()
        ids = [t for t in ids if t not in (tokenizer.eos_token_id, 2)]
        return ids, tokenizer.decode(ids, skip_special_tokens=True)

    yield answer


def shard_network(tmp_path, *ranges: str, args: tuple[str, ...] = (),
                  env: dict[int, dict[str, str]] | None = None) -> Network:
    """A coordinator and one shard miner per range (``env``: by index, a miner's extra
    environment)."""
    net = Network(tmp_path, "--stall-timeout", "2", *args)
    for i, blocks in enumerate(ranges):
        net.add_miner("--blocks", blocks, "--ctx", "512", wait=False,
                      env=(env or {}).get(i))
    net.wait_miners(len(ranges), timeout=180)
    return net


@pytest.fixture
def three_shards(tmp_path) -> Iterator[Network]:
    net = shard_network(tmp_path, "0:10", "10:20", "20:30")
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def spare_shards(tmp_path) -> Iterator[Network]:
    """Two miners for each half of the model: any one can die."""
    net = shard_network(tmp_path, "0:15", "0:15", "15:", "15:", args=("--check-rate", "1"))
    try:
        yield net
    finally:
        for m in net.miners:  # a test may leave one stopped
            if m.popen.poll() is None:
                os.kill(m.popen.pid, signal.SIGCONT)
        net.close()


def card(net: Network) -> dict:
    return httpx.get(f"{net.url}/v1/models/{MODEL}", timeout=5).json()


def test_two_and_three_shard_greedy_answers_equal_the_unsharded_one(tmp_path, reference):
    net = shard_network(tmp_path, "0:15", "15:")
    try:
        _same_answers(net, reference)
        info = card(net)
        assert info["status"] == "up" and info["shards"]["missing"] == []
        assert sorted((h["start"], h["end"]) for h in info["shards"]["held"]) == [(0, 15),
                                                                                 (15, 30)]
    finally:
        net.close()
    (tmp_path / "three").mkdir()
    three = shard_network(tmp_path / "three", "0:10", "10:20", "20:30")
    try:
        _same_answers(three, reference)
        miners = httpx.get(f"{three.url}/v1/miners", timeout=5).json()["data"]
        assert sorted(m["models"][0]["shard"]["start"] for m in miners) == [0, 10, 20]
        assert ledger_verify(three.tmp / "coordinator").returncode == 0
    finally:
        three.close()


def _same_answers(net: Network, reference) -> None:
    client = OpenAI(base_url=f"{net.url}/v1", api_key=net.api_key, max_retries=0)
    for prompt in PROMPTS:
        ids, text = reference(prompt, 40)
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=40,
            temperature=0)
        assert r.choices[0].message.content == text, prompt
        assert r.usage.completion_tokens == len(ids)
        # Every position ran through every shard: the prompt and each answer token but a
        # last one that hit max_tokens (nothing followed it; an end-of-text token did).
        _receipts_hold(net, r.id, r.usage.prompt_tokens + r.usage.completion_tokens
                       - (r.choices[0].finish_reason == "length"))
        streamed = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=40,
            temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed
                       if c.choices) == text


def _receipts_hold(net: Network, job_id: str, positions: int) -> None:
    """Each shard signed a receipt for its session, countersigned, checkable offline."""
    body = httpx.get(f"{net.url}/v1/receipts/{job_id}", headers=net.headers, timeout=10).json()
    assert body["object"] == "receipt.shards", body
    miners = {m["id"] for m in httpx.get(f"{net.url}/v1/miners", timeout=5).json()["data"]}
    assert {s["receipt"]["miner"] for s in body["shards"]} == miners
    for shard in body["shards"]:
        r = Receipt.model_validate(shard["receipt"])
        assert r.job_id.startswith(f"{job_id}.")
        assert verify_receipt(r, shard["miner_signature"])
        assert verify_countersignature(r, shard["miner_signature"], shard["coordinator"],
                                       shard["coordinator_signature"])
        assert r.prompt_tokens == positions
    saved = net.tmp / f"{job_id}.json"
    saved.write_text(json.dumps(body))
    checked = subprocess.run([sys.executable, "-m", "covey", "receipts", "verify", str(saved)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.count("receipt OK") == len(miners)


def test_an_incomplete_model_is_listed_as_such_and_refused_clearly(tmp_path):
    net = shard_network(tmp_path, "0:15")
    try:
        info = card(net)
        assert info["status"] == "incomplete"
        assert info["shards"]["missing"] == [[15, 30]]
        before = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503, r.text
        assert "15:30" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "no_miner_available"
        assert r.headers["retry-after"] == "5"
        after = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
        assert after == before
    finally:
        net.close()


def test_what_a_chain_cannot_serve_is_a_400_and_costs_nothing(three_shards: Network):
    net = three_shards
    quote = httpx.post(f"{net.url}/v1/quote", headers=net.headers, timeout=10, json={
        "model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    assert quote.status_code == 200 and quote.json()["max_completion_tokens"] == 10, quote.text
    before = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
    long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]}
    r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, json=long,
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    wm = {"model": MODEL, "watermark": True,
          "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, json=wm, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    after = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
    assert after["balance"] == before["balance"] and after["held"] == 0
    # The shards are free again and still answer.
    r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, timeout=60,
                   json={"model": MODEL, "max_tokens": 5,
                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text


def shard_of(net: Network, start: int) -> tuple[str, Proc]:
    """The id and process of the miner now running blocks from ``start`` in a chain."""
    data = httpx.get(f"{net.url}/v1/miners", timeout=5).json()["data"]
    busy = next(m["id"] for m in data if m["active"] and m["models"][0]["shard"]["start"]
                == start)
    return busy, next(p for p in net.miners if f"miner {busy[:16]}" in p.output())


def stream(net: Network, after: int, act) -> tuple[str, list[dict], float]:
    """Stream STORY; ``act()`` once ``after`` chunks arrived. Returns the text, the events
    and the longest gap between chunks in seconds."""
    pieces, events, gap, last = [], [], 0.0, None
    with httpx.stream("POST", f"{net.url}/v1/chat/completions", headers=net.headers,
                      json={**STORY, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            events.append(event)
            now = time.monotonic()
            gap = max(gap, now - last) if last is not None else gap
            last = now
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    pieces.append(choice["delta"]["content"])
                    if len(pieces) == after:
                        act()
    return "".join(pieces), events, gap


@pytest.mark.parametrize(("sig", "start"), [(signal.SIGKILL, 15), (signal.SIGSTOP, 0)])
def test_a_shard_that_dies_mid_answer_is_rebuilt_and_the_answer_goes_on(
        spare_shards: Network, reference, sig: int, start: int):
    net = spare_shards
    ids, expected = reference(STORY["messages"][0]["content"], STORY["max_tokens"])
    before = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
    hit: list[str] = []

    def strike() -> None:
        victim, proc = shard_of(net, start)
        hit.append(victim)
        os.kill(proc.popen.pid, sig)

    text, events, gap = stream(net, 10, strike)
    assert hit
    assert not any("error" in e for e in events), events[-3:]
    assert text == expected  # the uninterrupted greedy answer, token for token
    assert events[-1]["usage"]["completion_tokens"] == len(ids)
    if sig == signal.SIGSTOP:
        assert 1.5 < gap < 10, gap  # the stall timeout (2 s), then the rebuild
    time.sleep(0.5)
    after = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
    assert after["held"] == 0 and after["balance"] < before["balance"]
    job = events[0]["id"]
    mine = [t for t in httpx.get(f"{net.url}/v1/account/transactions", headers=net.headers,
                                 timeout=10).json()["data"] if job in json.dumps(t)]
    assert [t["kind"] for t in mine].count("hold") == 1, mine
    # The struck miner is paid nothing; the two that finished share the pay by blocks.
    earned = httpx.get(f"{net.url}/v1/miners/{hit[0]}/earnings", timeout=5).json()
    assert earned["balance"] == 0, earned
    assert ledger_verify(net.tmp / "coordinator").returncode == 0


def test_honest_shards_pass_their_re_checks(spare_shards: Network):
    net = spare_shards
    for i in range(3):
        # Greedy answers may have their last shard's tokens checked, sampled ones not.
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, timeout=60,
                       json={"model": MODEL, "max_tokens": 12, "temperature": 0.7 * (i == 0),
                             "seed": i,
                             "messages": [{"role": "user", "content": f"Tell me about {i}."}]})
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    passed = 'covey_checks_total{kind="sampled",result="passed"}'
    while metric(net, passed) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(net, passed) == 3
    assert metric(net, 'covey_checks_total{kind="sampled",result="failed"}') == 0


def test_a_shard_sending_perturbed_activations_is_caught_and_slashed(tmp_path):
    # Both 0:15 miners are idle between requests, so the chain takes the one with the
    # smaller id: the cheat gets the key that sorts first.
    ids = [load_or_create(tmp_path / f"miner-{i}" / "miner.key").verify_key.encode().hex()
           for i in range(2)]
    cheat_index = ids.index(min(ids))
    net = shard_network(tmp_path, "0:15", "0:15", "15:", args=("--check-rate", "1"),
                        env={cheat_index: {ENV: "perturb-activations:0.05"}})
    try:
        headers = sign_up(net)
        cheat = stake(net, cheat_index, headers)
        honest = ids[1 - cheat_index]
        found: list[dict] = []
        for i in range(5):
            # Sampled: only links that send hidden states are re-checked then.
            r = httpx.post(f"{net.url}/v1/chat/completions", headers=headers, timeout=60,
                           json={"model": MODEL, "max_tokens": 8, "temperature": 0.5,
                                 "seed": i,
                                 "messages": [{"role": "user", "content": f"Count to {i}."}]})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 15
            while not found and time.monotonic() < deadline:
                found = checks_of(net, cheat)
                time.sleep(0.2)
            if found:
                break
        assert found, "perturbed activations were not caught"
        check = found[0]
        assert check["kind"] == "sampled" and check["verdict"]["passed"] is False
        assert "relative L2" in check["verdict"]["reasons"][0]
        assert check["verdict"]["figures"]["max_relative_distance"] > 0.02
        assert check["slashed"] == SLASH and check["validator"] == honest
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_load_and_fail_cycles_never_lose_a_request_or_list_a_dead_miner(tmp_path, reference):
    """20 rounds of starting and killing shard miners at random while a client streams:
    every request completes with the greedy answer or ends with a clear error, a killed
    miner leaves the list at once, and nothing stays held."""
    import random
    import threading

    rng = random.Random(7)
    net = shard_network(tmp_path, "0:15", "0:15", "15:", "15:")
    _, expected = reference("Name three colours.", 16)
    results: list[tuple[str, str]] = []
    took: list[float] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            body = {"model": MODEL, "temperature": 0, "max_tokens": 16, "stream": True,
                    "messages": [{"role": "user", "content": "Name three colours."}]}
            pieces, error = [], None
            began = time.monotonic()
            with httpx.stream("POST", f"{net.url}/v1/chat/completions", headers=net.headers,
                              json=body, timeout=60) as r:
                if r.status_code != 200:
                    error = json.loads(r.read())["error"]["message"]
                else:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            event = json.loads(line[6:])
                            if "error" in event:
                                error = event["error"]["message"]
                            for c in event.get("choices", []):
                                pieces.append(c["delta"].get("content") or "")
            results.append(("error", error) if error else ("text", "".join(pieces)))
            took.append(round(time.monotonic() - began, 2))
            if error:  # a model with a gap: wait a little, as a client would
                time.sleep(0.2)

    thread = threading.Thread(target=client)
    thread.start()
    live = list(range(4))
    try:
        for _ in range(20):
            listed = {m["id"] for m in httpx.get(f"{net.url}/v1/miners", timeout=5)
                      .json()["data"]}
            connected = [i for i in live if _miner_id(net, i) in listed]
            # At most 5 miners at once: each start loads torch and the model on 2 cores.
            if len(connected) > 2 and (len(live) >= 5 or rng.random() < 0.5):
                i = rng.choice(connected)
                live.remove(i)
                miner_id = _miner_id(net, i)
                net.miners[i].popen.send_signal(signal.SIGKILL)
                deadline = time.monotonic() + 3
                while any(m["id"] == miner_id for m in httpx.get(
                        f"{net.url}/v1/miners", timeout=5).json()["data"]):
                    assert time.monotonic() < deadline, "a killed miner is still listed"
                    time.sleep(0.05)
            elif len(live) < 5:
                blocks = rng.choice(["0:15", "15:"])
                net.add_miner("--blocks", blocks, "--ctx", "512", wait=False)
                live.append(len(net.miners) - 1)
            time.sleep(rng.uniform(0.5, 2.0))
    finally:
        done.set()
        thread.join(90)
        for i in live:
            net.miners[i].stop()
        net.coordinator.stop()
    assert len(results) >= 5, (took, results)
    for kind, value in results:
        if kind == "text":
            assert value == expected, results
        else:
            assert value, "an error without a message"
    errors = {value for kind, value in results if kind == "error"}
    assert sum(kind == "text" for kind, _ in results) >= 5, errors
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _miner_id(net: Network, i: int) -> str | None:
    """Miner ``i``'s id, once it has made its key (None before)."""
    key = net.tmp / f"miner-{i}" / "miner.key"
    try:
        return load_or_create(key).verify_key.encode().hex() if key.is_file() else None
    except Exception:  # noqa: BLE001 - the miner is still writing it
        return None


def test_a_last_shard_sending_other_tokens_is_caught_and_slashed(tmp_path):
    # Two one-link chains (each miner holds every block, so its one link is the last):
    # the first request goes to the smaller id, the cheat's, and that link is re-checked.
    ids = [load_or_create(tmp_path / f"miner-{i}" / "miner.key").verify_key.encode().hex()
           for i in (0, 1)]
    cheat_index = ids.index(min(ids))
    net = shard_network(tmp_path, "0:", "0:", args=("--check-rate", "1"),
                        env={cheat_index: {ENV: "wrong-tokens"}})
    try:
        headers = sign_up(net)
        cheat = stake(net, cheat_index, headers)
        found: list[dict] = []
        judged = tuple(f'covey_checks_total{{kind="sampled",result="{r}"}}'
                       for r in ("passed", "failed", "skipped"))
        for i in range(10):
            before = sum(metric(net, m) for m in judged)
            r = httpx.post(f"{net.url}/v1/chat/completions", headers=headers, timeout=60,
                           json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                                 "messages": [{"role": "user", "content": f"Count to {i}."}]})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 15
            while sum(metric(net, m) for m in judged) == before:
                assert time.monotonic() < deadline, "no verdict"
                time.sleep(0.1)
            if metric(net, judged[1]):  # failed: its penalty is being written
                deadline = time.monotonic() + 10
                while not (found := checks_of(net, cheat)) and time.monotonic() < deadline:
                    time.sleep(0.2)
                break
        assert found, "other tokens were not caught"
        check = found[0]
        assert "greedy tokens are not the model's choice" in check["verdict"]["reasons"][0]
        assert check["slashed"] == SLASH and check["validator"] == ids[1 - cheat_index]
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_gap_is_closed_by_moving_a_redundant_shard_that_allows_it(tmp_path):
    net = Network(tmp_path, "--stall-timeout", "2")
    try:
        net.add_miner("--blocks", "0:15", "--ctx", "512", "--rebalance", wait=False)
        net.add_miner("--blocks", "0:15", "--ctx", "512", wait=False)
        last = net.add_miner("--blocks", "15:", "--ctx", "512", wait=False)
        net.wait_miners(3, timeout=180)
        last.popen.send_signal(signal.SIGKILL)
        # The model is incomplete now; the coordinator asks the miner that allows it to
        # load blocks 15:30, and it comes back holding them.
        deadline = time.monotonic() + 60
        while True:
            info = card(net)
            held = sorted((h["start"], h["end"]) for h in info["shards"]["held"])
            if held == [(0, 15), (15, 30)]:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        assert info["status"] == "up" and info["shards"]["missing"] == []
        assert "moved" not in net.miners[1].output()
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, timeout=60,
                       json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                             "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert "now serving blocks 15:30" in net.miners[0].output()
    finally:
        net.close()


def test_concurrent_requests_wait_for_a_free_chain(three_shards: Network):
    """Each shard runs one session at a time here (--slots 1): a second and third request
    wait for the chain rather than being refused."""
    from concurrent.futures import ThreadPoolExecutor

    net = three_shards

    def ask(i: int) -> int:
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, timeout=120,
                       json={"model": MODEL, "max_tokens": 6, "temperature": 0,
                             "messages": [{"role": "user", "content": f"Say {i}."}]})
        return r.status_code

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(ask, range(3))) == [200, 200, 200]
    assert net.wait_idle(5)
