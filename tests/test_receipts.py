"""Signed receipts: the miner signs what it did, the coordinator countersigns, anyone
re-checks offline; one changed byte fails the check."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys

import httpx
import pytest
from nacl.signing import SigningKey

from conftest import MODEL, Network
from covey.protocol import Delta, Done, Job, Started, decode_frame, encode_frame
from covey.protocol.receipts import Receipt, request_digest, sign_receipt
from test_miner_protocol import _join


def covey(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covey", *args], capture_output=True,
                          text=True, timeout=60)


def test_a_request_has_a_receipt_that_verifies_and_tampering_fails(network: Network,
                                                                    tmp_path):
    r = httpx.post(f"{network.url}/v1/completions", headers=network.headers, timeout=60,
                   json={"model": MODEL, "prompt": "The sky is", "max_tokens": 8,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    got = httpx.get(f"{network.url}/v1/receipts/{body['id']}", headers=network.headers)
    assert got.status_code == 200, got.text
    signed = got.json()
    receipt = signed["receipt"]
    miners = {m["id"]: m for m in httpx.get(f"{network.url}/v1/miners").json()["data"]}
    assert body["system_fingerprint"] == f"miner-{receipt['miner'][:16]}"
    assert receipt["model_sha256"] == miners[receipt["miner"]]["models"][0]["sha256"]
    text = body["choices"][0]["text"]
    assert receipt["output_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert receipt["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert receipt["completion_tokens"] == body["usage"]["completion_tokens"]

    good = tmp_path / "receipt.json"
    good.write_text(json.dumps(signed))
    ok = covey("receipts", "verify", str(good))
    assert ok.returncode == 0 and "receipt OK" in ok.stdout, ok.stdout + ok.stderr
    by_id = covey("receipts", "verify", body["id"], "--url", network.url, "--api-key",
                  network.api_key, "--coordinator", signed["coordinator"])
    assert by_id.returncode == 0, by_id.stderr

    raw = good.read_text()
    for field in ("output_sha256", "miner_signature", "coordinator_signature"):
        value = signed["receipt"].get(field) or signed[field]
        flipped = value[:10] + ("0" if value[10] != "0" else "1") + value[11:]
        bad = tmp_path / f"bad-{field}.json"
        bad.write_text(raw.replace(value, flipped))
        failed = covey("receipts", "verify", str(bad))
        assert failed.returncode == 1, (field, failed.stdout)
    n = receipt["completion_tokens"]
    assert f'"completion_tokens": {n}' in raw
    tokens = tmp_path / "bad-usage.json"
    tokens.write_text(raw.replace(f'"completion_tokens": {n}', f'"completion_tokens": {n + 1}'))
    assert covey("receipts", "verify", str(tokens)).returncode == 1
    other = covey("receipts", "verify", str(good), "--coordinator", "ab" * 32)
    assert other.returncode == 1 and "not the required" in other.stderr
    pinned = httpx.get(f"{network.url}/healthz").json()["coordinator"]
    assert pinned == signed["coordinator"]
    assert covey("receipts", "verify", str(good), "--coordinator",
                 pinned.upper()).returncode == 0
    missing = covey("receipts", "verify", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\xff not json")
    failed = covey("receipts", "verify", str(junk))
    assert failed.returncode == 1 and "is not JSON" in failed.stderr


def test_receipts_belong_to_their_account(network: Network):
    r = httpx.post(f"{network.url}/v1/completions", headers=network.headers, timeout=60,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream": True})
    first = next(line for line in r.text.splitlines() if line.startswith("data: {"))
    job_id = json.loads(first[6:])["id"]
    assert httpx.get(f"{network.url}/v1/receipts/{job_id}",
                     headers=network.headers).status_code == 200
    stranger = httpx.post(f"{network.url}/v1/accounts").json()["api_key"]
    r = httpx.get(f"{network.url}/v1/receipts/{job_id}",
                  headers={"Authorization": f"Bearer {stranger}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "receipt_not_found"


@pytest.mark.parametrize("lie", ["output", "usage", "unsigned"])
def test_a_false_receipt_is_not_stored_and_costs_reputation(bare_network: Network, lie: str):
    net = bare_network
    key = SigningKey.generate()
    miner_id = key.verify_key.encode().hex()

    async def fake_miner(ready: asyncio.Event) -> None:
        ws = await _join(net, key)
        ready.set()
        job = decode_frame(await ws.recv())
        assert isinstance(job, Job)
        await ws.send(encode_frame(Started(job_id=job.job_id, prompt_tokens=3)))
        await ws.send(encode_frame(Delta(job_id=job.job_id, text="Hello", token_ids=(1, 2))))
        said = "Goodbye" if lie == "output" else "Hello"
        receipt = Receipt(job_id=job.job_id, miner=miner_id, model_sha256="1" * 64,
                          request_sha256=request_digest(job),
                          output_sha256=hashlib.sha256(said.encode()).hexdigest(),
                          prompt_tokens=3, completion_tokens=9 if lie == "usage" else 2)
        done = Done(job_id=job.job_id, finish_reason="stop", prompt_tokens=3,
                    completion_tokens=2, receipt=None if lie == "unsigned" else receipt,
                    signature=None if lie == "unsigned" else sign_receipt(key, receipt))
        await ws.send(encode_frame(done))
        await asyncio.sleep(1)
        await ws.close()

    async def run() -> dict:
        ready = asyncio.Event()
        miner = asyncio.create_task(fake_miner(ready))
        await ready.wait()
        async with httpx.AsyncClient(timeout=20) as http:
            r = await http.post(f"{net.url}/v1/completions", headers=net.headers,
                                json={"model": MODEL, "prompt": "hello", "max_tokens": 5})
            data = (await http.get(f"{net.url}/v1/miners")).json()["data"]
        await miner
        assert r.status_code == 200, r.text
        return {"answer": r.json(), "miner": data[0]}

    out = asyncio.run(run())
    assert out["answer"]["choices"][0]["text"] == "Hello"
    assert out["miner"]["reputation"] == 0.8
    r = httpx.get(f"{net.url}/v1/receipts/{out['answer']['id']}", headers=net.headers)
    assert r.status_code == 404
