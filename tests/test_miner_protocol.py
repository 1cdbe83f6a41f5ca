"""Miner sessions: signed hello, hostile miners, reconnects, the identity key file."""

from __future__ import annotations

import asyncio
import stat
import time

import httpx
import pytest
import websockets
from nacl.signing import SigningKey

from conftest import MODEL, Network
from covey.protocol import (
    Challenge,
    Delta,
    Hardware,
    Hello,
    Job,
    ModelOffer,
    Started,
    Welcome,
    decode_frame,
    encode_frame,
    sign_hello,
)


def _ws(net: Network) -> str:
    return net.url.replace("http://", "ws://") + "/v1/miners/connect"


def _hello(key: SigningKey, nonce: str, bad_signature: bool = False) -> str:
    body = Hello(
        public_key=key.verify_key.encode().hex(),
        nonce=nonce,
        hardware=Hardware(cpu_count=1, ram_bytes=1),
        models=(ModelOffer(name=MODEL, sha256="1" * 64, context_length=2048, backend="fake"),),
        slots=1,
        version="test",
        signature="0" * 128,
    ).model_dump(mode="json")
    body["signature"] = sign_hello(SigningKey.generate() if bad_signature else key, body)
    return encode_frame(Hello.model_validate(body))


async def _join(net: Network, key: SigningKey) -> websockets.ClientConnection:
    ws = await websockets.connect(_ws(net))
    challenge = decode_frame(await ws.recv())
    assert isinstance(challenge, Challenge)
    await ws.send(_hello(key, challenge.nonce))
    assert isinstance(decode_frame(await ws.recv()), Welcome)
    return ws


def test_wrong_hello_signature_is_refused(bare_network: Network):
    async def run() -> int | None:
        async with websockets.connect(_ws(bare_network)) as ws:
            challenge = decode_frame(await ws.recv())
            await ws.send(_hello(SigningKey.generate(), challenge.nonce, bad_signature=True))
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            return info.value.rcvd.code

    assert asyncio.run(run()) == 1008
    assert bare_network.live_miners() == 0
    r = httpx.post(
        f"{bare_network.url}/v1/completions",
        headers=bare_network.headers,
        json={"model": MODEL, "prompt": "x"},
    )
    assert r.status_code == 503


def test_replayed_hello_for_another_nonce_is_refused(bare_network: Network):
    key = SigningKey.generate()

    async def run() -> int | None:
        async with websockets.connect(_ws(bare_network)) as ws:
            await ws.recv()
            await ws.send(_hello(key, "00" * 32))  # validly signed, but for another nonce
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            return info.value.rcvd.code

    assert asyncio.run(run()) == 1008
    assert bare_network.live_miners() == 0


@pytest.mark.parametrize("misbehaviour", ["garbage", "disconnect"])
def test_misbehaving_miner_gives_clear_error_and_coordinator_survives(
    bare_network: Network, misbehaviour: str
):
    async def fake_miner(ready: asyncio.Event) -> None:
        ws = await _join(bare_network, SigningKey.generate())
        ready.set()
        job = decode_frame(await ws.recv())
        assert isinstance(job, Job)
        await ws.send(encode_frame(Started(job_id=job.job_id, prompt_tokens=3)))
        await ws.send(encode_frame(Delta(job_id=job.job_id, text="Hel", token_ids=(1,))))
        if misbehaviour == "garbage":
            await ws.send("{not json at all")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        await ws.close()

    async def client() -> list[str]:
        ready = asyncio.Event()
        miner = asyncio.create_task(fake_miner(ready))
        await ready.wait()
        async with httpx.AsyncClient(timeout=20) as http:
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 5, "stream": True}
            async with http.stream(
                "POST",
                f"{bare_network.url}/v1/completions",
                headers=bare_network.headers,
                json=body,
            ) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines() if line]
        await miner
        return lines

    lines = asyncio.run(client())
    assert lines[-1] == "data: [DONE]"
    assert '"miner_disconnected"' in lines[-2] and '"error"' in lines[-2]
    assert httpx.get(f"{bare_network.url}/healthz").json()["status"] == "ok"
    assert bare_network.live_miners() == 0


def test_miner_disconnect_before_streaming_is_502(bare_network: Network):
    async def fake_miner(ready: asyncio.Event) -> None:
        ws = await _join(bare_network, SigningKey.generate())
        ready.set()
        await ws.recv()
        await ws.close()

    async def client() -> httpx.Response:
        ready = asyncio.Event()
        miner = asyncio.create_task(fake_miner(ready))
        await ready.wait()
        async with httpx.AsyncClient(timeout=20) as http:
            r = await http.post(
                f"{bare_network.url}/v1/chat/completions",
                headers=bare_network.headers,
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
        await miner
        return r

    r = asyncio.run(client())
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "miner_disconnected"


def test_miner_reconnects_after_coordinator_restart_and_key_is_private(bare_network: Network):
    miner = bare_network.add_miner("--ctx", "512")
    key_file = bare_network.tmp / "miner-0" / "miner.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    first_id = httpx.get(f"{bare_network.url}/v1/miners").json()["data"][0]["id"]
    bare_network.restart_coordinator()
    bare_network.wait_miners(1, timeout=30)
    miners = httpx.get(f"{bare_network.url}/v1/miners").json()["data"]
    assert [m["id"] for m in miners] == [first_id]  # same identity, one session
    r = httpx.post(
        f"{bare_network.url}/v1/completions",
        headers=bare_network.headers,
        timeout=30,
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 3},
    )
    assert r.status_code == 200
    assert miner.popen.poll() is None


def test_world_readable_key_is_refused(bare_network: Network):
    key_file = bare_network.tmp / "loose.key"
    key_file.write_text(SigningKey.generate().encode().hex())
    key_file.chmod(0o644)
    miner = bare_network.add_miner("--key", str(key_file), wait=False)
    deadline = time.monotonic() + 30
    while miner.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert miner.popen.returncode == 2
    assert "chmod 600" in miner.output()
