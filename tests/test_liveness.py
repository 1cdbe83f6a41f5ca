"""Liveness: silent miners are evicted within 10 s; a miner comes back as one session."""

from __future__ import annotations

import os
import signal
import time

import httpx

from conftest import MODEL, Network, metric


def _ids(net: Network) -> list[str]:
    return [m["id"] for m in httpx.get(f"{net.url}/v1/miners", timeout=5).json()["data"]]


def test_a_frozen_miner_is_evicted_within_10_s_and_returns_once(bare_network: Network):
    net = bare_network
    proc = net.add_miner("--ctx", "512")
    (miner_id,) = _ids(net)
    os.kill(proc.popen.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        while net.live_miners() and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        evicted_after = time.monotonic() - t0
        assert net.live_miners() == 0
        assert evicted_after < 10, evicted_after
        assert _ids(net) == []
        models = httpx.get(f"{net.url}/v1/models").json()["data"]
        assert next(m for m in models if m["id"] == MODEL)["miners"] == 0
        assert metric(net, 'covey_evictions_total{reason="heartbeat_timeout"}') == 1
        r = httpx.post(f"{net.url}/v1/completions", headers=net.headers, timeout=10,
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_miner_available"
    finally:
        os.kill(proc.popen.pid, signal.SIGCONT)
    net.wait_miners(1, timeout=30)
    time.sleep(1)
    assert _ids(net) == [miner_id]  # the same identity, one session


def test_a_killed_miner_restarted_with_its_key_shows_once(bare_network: Network):
    net = bare_network
    first = net.add_miner("--ctx", "512")
    (miner_id,) = _ids(net)
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait()
    t0 = time.monotonic()
    while net.live_miners() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert net.live_miners() == 0  # a closed socket is noticed at once
    assert time.monotonic() - t0 < 2
    net.miners.remove(first)
    net.add_miner("--ctx", "512", "--key", str(net.tmp / "miner-0" / "miner.key"))
    time.sleep(1)
    assert _ids(net) == [miner_id]
    r = httpx.post(f"{net.url}/v1/completions", headers=net.headers, timeout=30,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_two_miner_processes_with_one_key_do_not_flap(bare_network: Network):
    net = bare_network
    args = ("--backend", "synthetic", "--data-dir", str(net.tmp / "shared-miner"))
    first = net.add_miner(*args, wait=False)
    net.wait_miners(1, model="synthetic")
    second = net.add_miner(*args, wait=False)
    # The newer session wins; the older process is told why and stops instead of fighting.
    assert first.popen.wait(20) == 1
    assert "give each miner its own --data-dir" in first.output()
    time.sleep(2)
    assert second.popen.poll() is None
    assert net.live_miners("synthetic") == 1
    assert metric(net, 'covey_evictions_total{reason="replaced"}') == 1
