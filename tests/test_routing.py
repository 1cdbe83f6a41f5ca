"""Requests spread over live miners."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import MODEL, Network


def test_twenty_requests_are_spread_over_both_miners(network: Network):
    def ask(i: int) -> str:
        r = httpx.post(
            f"{network.url}/v1/completions",
            headers=network.headers,
            timeout=60,
            json={"model": MODEL, "prompt": f"Number {i}:", "max_tokens": 4, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        return r.json()["system_fingerprint"]

    with ThreadPoolExecutor(4) as pool:
        served_by = list(pool.map(ask, range(20)))
    counts = {fp: served_by.count(fp) for fp in set(served_by)}
    assert len(counts) == 2, counts
    assert min(counts.values()) >= 5, counts
    miners = httpx.get(f"{network.url}/v1/miners").json()["data"]
    assert len(miners) == 2 and all(m["active"] == 0 for m in miners)


def test_slots_run_jobs_at_once_and_disconnect_frees_them(bare_network: Network):
    bare_network.add_miner("--slots", "2", "--ctx", "1024")
    body = {
        "model": MODEL,
        "prompt": "Count: 1, 2, 3,",
        "max_tokens": 500,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
        with (
            a.stream(
                "POST",
                f"{bare_network.url}/v1/completions",
                headers=bare_network.headers,
                json=body,
            ) as ra,
            b.stream(
                "POST",
                f"{bare_network.url}/v1/completions",
                headers=bare_network.headers,
                json=body,
            ) as rb,
        ):
            lines_a, lines_b = ra.iter_lines(), rb.iter_lines()
            assert next(lines_a).startswith("data: ") and next(lines_b).startswith("data: ")
            miner = httpx.get(f"{bare_network.url}/v1/miners").json()["data"][0]
            assert miner["active"] == 2
    # Both clients hung up mid-stream: their jobs are cancelled and the slots freed at once.
    assert bare_network.wait_idle(1.0)
    t0 = time.monotonic()
    r = httpx.post(
        f"{bare_network.url}/v1/completions",
        headers=bare_network.headers,
        timeout=30,
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
    )
    assert r.status_code == 200
    assert time.monotonic() - t0 < 5
