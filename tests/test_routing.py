"""Requests spread over live miners."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import MODEL, Network


def test_twenty_requests_are_spread_over_both_miners(network: Network):
    def ask(i: int) -> str:
        r = httpx.post(f"{network.url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": f"Number {i}:", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["system_fingerprint"]

    with ThreadPoolExecutor(4) as pool:
        served_by = list(pool.map(ask, range(20)))
    counts = {fp: served_by.count(fp) for fp in set(served_by)}
    assert len(counts) == 2, counts
    assert min(counts.values()) >= 5, counts
    miners = httpx.get(f"{network.url}/v1/miners").json()["data"]
    assert len(miners) == 2 and all(m["active"] == 0 for m in miners)
