"""Failover mid-stream: a miner killed (SIGKILL) or frozen (SIGSTOP) while answering.

Real processes on 127.0.0.1, the bundled model, greedy decoding: the client must get the
answer an uninterrupted miner gives, token for token, and pay for it once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import MODEL, Network, Proc, ledger_verify, metric

STORY = {"model": MODEL, "temperature": 0, "max_tokens": 120,
         "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper "
                                                  "and a storm."}]}


@pytest.fixture
def two_miners(tmp_path) -> Iterator[Network]:
    """A coordinator that moves a job off a miner silent for 2 s, and two miners that send
    every token in its own frame (so the test can count tokens as they arrive)."""
    net = Network(tmp_path, "--stall-timeout", "2")
    try:
        for _ in range(2):
            net.add_miner("--ctx", "1024", "--stream-interval", "0", wait=False)
        net.wait_miners(2)
        yield net
    finally:
        for m in net.miners:  # a test may leave one stopped
            if m.popen.poll() is None:
                os.kill(m.popen.pid, signal.SIGCONT)
        net.close()


def miner_proc(net: Network, miner_id: str) -> Proc:
    """The process of the miner with public key ``miner_id`` (from its start-up line)."""
    return next(m for m in net.miners if f"miner {miner_id[:16]}" in m.output())


def busy_miner(net: Network) -> str:
    data = httpx.get(f"{net.url}/v1/miners", timeout=5).json()["data"]
    return next(m["id"] for m in data if m["active"])


def reference_answer(net: Network) -> tuple[str, int]:
    r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, json=STORY,
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


def stream_with(net: Network, after_tokens: int, act) -> tuple[str, list[dict], float]:
    """Stream STORY; call ``act()`` once ``after_tokens`` chunks have arrived. Returns the
    text, every event, and the longest gap between chunks (s)."""
    text, events, gap = [], [], 0.0
    last = None
    with httpx.stream("POST", f"{net.url}/v1/chat/completions", headers=net.headers,
                      json={**STORY, "stream": True,
                            "stream_options": {"include_usage": True}}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            events.append(event)
            now = time.monotonic()
            if last is not None:
                gap = max(gap, now - last)
            last = now
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    text.append(piece)
                    if len(text) == after_tokens:
                        act()
    return "".join(text), events, gap


def charges(net: Network) -> list[dict]:
    r = httpx.get(f"{net.url}/v1/account/transactions", headers=net.headers, timeout=10)
    r.raise_for_status()
    return r.json()["data"]


def earned_jobs(net: Network, miner_id: str) -> int:
    r = httpx.get(f"{net.url}/v1/miners/{miner_id}/earnings", timeout=5)
    r.raise_for_status()
    return r.json()["jobs"]


def test_sigkill_mid_stream_resumes_exactly_on_the_other_miner(two_miners: Network):
    net = two_miners
    expected, expected_tokens = reference_answer(net)
    assert expected_tokens >= 60, "the reference answer must be long enough to cut"
    before = metric(net, "covey_failovers_total")
    killed: list[str] = []

    def kill() -> None:
        victim = busy_miner(net)
        killed.append(victim)
        miner_proc(net, victim).popen.send_signal(signal.SIGKILL)

    miners = [m["id"] for m in httpx.get(f"{net.url}/v1/miners").json()["data"]]
    jobs_before = {m: earned_jobs(net, m) for m in miners}
    text, events, _ = stream_with(net, 10, kill)
    assert killed
    assert not any("error" in e for e in events), events[-3:]
    assert text == expected  # no gap, no duplicate: the greedy answer, token for token
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == expected_tokens
    assert metric(net, "covey_failovers_total") == before + 1

    # Charged once, for the whole answer, paid to the miner that finished it.
    time.sleep(0.5)
    job_id = events[0]["id"]
    mine = [t for t in charges(net) if job_id in json.dumps(t)]
    holds = [t for t in mine if t["kind"] == "hold"]
    assert len(holds) == 1, mine
    survivor = next(m for m in miners if m != killed[0])
    assert events[0]["system_fingerprint"] == f"miner-{killed[0][:16]}"
    assert events[-2]["system_fingerprint"] == f"miner-{survivor[:16]}"  # who finished it
    assert earned_jobs(net, killed[0]) == jobs_before[killed[0]]  # not paid for its attempt
    assert earned_jobs(net, survivor) == jobs_before[survivor] + 1
    assert ledger_verify(net.tmp / "coordinator").returncode == 0


def test_sigstop_mid_stream_fails_over_after_the_stall_timeout(two_miners: Network):
    net = two_miners
    expected, expected_tokens = reference_answer(net)
    stopped: list[Proc] = []

    def freeze() -> None:
        proc = miner_proc(net, busy_miner(net))
        stopped.append(proc)
        os.kill(proc.popen.pid, signal.SIGSTOP)

    balance_before = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
    text, events, gap = stream_with(net, 10, freeze)
    assert stopped
    assert text == expected
    assert 1.5 < gap < 10, gap  # the stall timeout (2 s), then the other miner takes over
    charged = events[-1]["usage"]
    assert charged["completion_tokens"] == expected_tokens
    assert metric(net, 'covey_failovers_total{model="smollm2-135m-instruct",reason="stalled"}') == 1

    # The frozen miner wakes up: its late frames reach nobody and nobody pays twice.
    time.sleep(0.5)
    after = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
    os.kill(stopped[0].popen.pid, signal.SIGCONT)
    time.sleep(3)
    later = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
    assert later == after and after["held"] == 0
    assert after["balance"] < balance_before["balance"]
    job_id = events[0]["id"]
    mine = [t for t in charges(net) if job_id in json.dumps(t)]
    assert [t["kind"] for t in mine].count("hold") == 1, mine
    assert [t["kind"] for t in mine].count("refund") <= 1, mine
    net.wait_miners(2, timeout=30)  # it comes back once, not twice
    assert ledger_verify(net.tmp / "coordinator").returncode == 0


def test_when_every_miner_is_gone_the_client_gets_an_error_and_its_money_back(
        bare_network: Network):
    net = bare_network
    net.add_miner("--ctx", "1024", "--stream-interval", "0")
    before = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
    t0 = time.monotonic()
    text, events, _ = stream_with(net, 10, lambda: net.miners[0].popen.send_signal(
        signal.SIGKILL))
    assert time.monotonic() - t0 < 15
    assert "error" in events[-1], events[-1]
    assert events[-1]["error"]["code"] == "miner_disconnected"
    assert text  # it had streamed part of the answer
    time.sleep(0.5)
    after = httpx.get(f"{net.url}/v1/account", headers=net.headers).json()
    assert after["balance"] == before["balance"] and after["held"] == 0


def test_a_sampled_stream_survives_a_kill_too(two_miners: Network):
    net = two_miners
    story = {**STORY, "temperature": 0.8, "seed": 7}
    body = {**story, "stream": True, "stream_options": {"include_usage": True}}
    pieces, events = [], []
    with httpx.stream("POST", f"{net.url}/v1/chat/completions", headers=net.headers,
                      json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            events.append(json.loads(line[6:]))
            for choice in events[-1].get("choices", []):
                if choice["delta"].get("content"):
                    pieces.append(choice["delta"]["content"])
                    if len(pieces) == 10:
                        miner_proc(net, busy_miner(net)).popen.send_signal(signal.SIGKILL)
    assert not any("error" in e for e in events), events[-2:]
    assert len(pieces) > 10 and events[-1]["usage"]["completion_tokens"] >= len(pieces)
    assert metric(net, "covey_failovers_total") == 1
