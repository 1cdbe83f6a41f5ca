"""Inputs that once slipped past: each gets a clean OpenAI-style answer, and nothing leaks."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import websockets
from nacl.signing import SigningKey

from conftest import MODEL, Network
from covey.protocol import Challenge, Hardware, Hello, ModelOffer, decode_frame, sign_hello
from test_errors import CHAT, assert_openai_error


def test_lone_surrogate_is_400_not_a_miner_failure(network: Network):
    raw = '{"model": "' + MODEL + '", "messages": [{"role": "user", "content": "\\ud800"}]}'
    r = httpx.post(
        f"{network.url}/v1/chat/completions",
        content=raw.encode(),
        headers={**network.headers, "Content-Type": "application/json"},
    )
    assert_openai_error(r, 400, "invalid_value")


def test_empty_prompt_is_400(network: Network):
    r = httpx.post(
        f"{network.url}/v1/completions",
        headers=network.headers,
        json={"model": MODEL, "prompt": "", "max_tokens": 2},
    )
    assert_openai_error(r, 400, "invalid_prompt", "prompt")


def test_chunked_oversized_body_is_413(network: Network):
    def body():
        yield b'{"model": "x", "prompt": "'
        for _ in range(10):
            yield b"x" * 2**20
        yield b'"}'

    r = httpx.post(
        f"{network.url}/v1/completions",
        content=body(),
        headers={**network.headers, "Content-Type": "application/json"},
        timeout=30,
    )
    err = assert_openai_error(r, 413, "request_too_large")
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "seed,ok", [(2**64, False), (-(2**63) - 1, False), (-1, True), (0xFFFFFFFF, True)]
)
def test_seeds_are_range_checked_and_deterministic(network: Network, seed: int, ok: bool):
    body = {
        "model": MODEL,
        "prompt": "My pet is a",
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": seed,
    }
    r1 = httpx.post(f"{network.url}/v1/completions", headers=network.headers, json=body, timeout=30)
    if not ok:
        assert_openai_error(r1, 400, param="seed")
        return
    r2 = httpx.post(f"{network.url}/v1/completions", headers=network.headers, json=body, timeout=30)
    assert r1.json()["choices"][0]["text"] == r2.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    "body,code,param",
    [
        (b"", "missing_body", None),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
            "invalid_value",
            "messages[0].content",
        ),
        (b'{"model": "m", "prompt": "x", "stream": "yes"}', "invalid_value", "stream"),
        (b'{"model": "m", "prompt": "\xff\xfe"}', "invalid_json", None),
    ],
)
def test_error_details(network: Network, body: bytes, code: str, param: str | None):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = httpx.post(
        f"{network.url}{path}",
        content=body,
        headers={**network.headers, "Content-Type": "application/json"},
    )
    err = assert_openai_error(r, 400, code)
    assert err["param"] == param
    assert "None" not in err["message"]


def test_client_leaving_a_non_streaming_request_cancels_its_job(bare_network: Network):
    bare_network.add_miner("--ctx", "1024")
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 900,
        "temperature": 1.0,
        "seed": 3,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{bare_network.url}/v1/completions",
            headers=bare_network.headers,
            json=body,
            timeout=1.5,
        )
    assert bare_network.wait_idle(1.5)
    # It received no token, so it pays for its prompt only.
    usage = httpx.get(f"{bare_network.url}/v1/account", headers=bare_network.headers).json()
    assert usage["usage"]["smollm2-135m-instruct"]["completion_tokens"] == 0
    assert usage["held"] == 0
    r = httpx.post(
        f"{bare_network.url}/v1/chat/completions",
        headers=bare_network.headers,
        json=CHAT,
        timeout=10,
    )
    assert r.status_code == 200


def test_long_prefill_is_not_mistaken_for_a_stall(tmp_path):
    net = Network(tmp_path, "--stall-timeout", "2")
    try:
        net.add_miner("--ctx", "1024")
        r = httpx.post(
            f"{net.url}/v1/completions",
            headers=net.headers,
            timeout=60,
            json={"model": MODEL, "prompt": "hello world " * 450, "max_tokens": 2},
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 850
    finally:
        net.close()


def _ws(net: Network) -> str:
    return net.url.replace("http://", "ws://") + "/v1/miners/connect"


def _signed_hello(key: SigningKey, nonce: str, **overrides) -> str:
    fields = dict(
        public_key=key.verify_key.encode().hex(),
        nonce=nonce,
        hardware=Hardware(cpu_count=1, ram_bytes=1),
        models=(
            ModelOffer(name=MODEL, sha256="1" * 64, context_length=1, backend="fake"),
            ModelOffer(name="fake-model", sha256="2" * 64, context_length=64, backend="fake"),
        ),
        slots=1,
        version="test",
        signature="0" * 128,
    )
    fields.update(overrides)
    body = Hello(**fields).model_dump(mode="json")
    body["signature"] = sign_hello(key, body)
    return Hello.model_validate(body).model_dump_json()


def test_a_miner_cannot_rewrite_or_outlive_what_it_offered(network: Network):
    async def run() -> None:
        async with websockets.connect(_ws(network)) as ws:
            nonce = decode_frame(await ws.recv())
            assert isinstance(nonce, Challenge)
            await ws.send(_signed_hello(SigningKey.generate(), nonce.nonce))
            await ws.recv()  # welcome
            models = {m["id"]: m for m in httpx.get(f"{network.url}/v1/models").json()["data"]}
            assert models[MODEL]["context_length"] == 1024  # the real miners' value wins
            assert models["fake-model"]["miners"] == 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ids = [m["id"] for m in httpx.get(f"{network.url}/v1/models").json()["data"]]
            if "fake-model" not in ids:
                break
            await asyncio.sleep(0.05)
        assert "fake-model" not in ids
        r = httpx.post(
            f"{network.url}/v1/completions",
            headers=network.headers,
            json={"model": "fake-model", "prompt": "x"},
        )
        assert_openai_error(r, 404, "model_not_found")

    asyncio.run(run())
    network.wait_miners(2)


def test_wrong_protocol_version_and_binary_garbage_are_closed(bare_network: Network):
    async def run() -> tuple[int, int]:
        async with websockets.connect(_ws(bare_network)) as ws:
            nonce = decode_frame(await ws.recv()).nonce
            await ws.send(_signed_hello(SigningKey.generate(), nonce, protocol_version=99))
            with pytest.raises(websockets.ConnectionClosed) as refused:
                await ws.recv()
        async with websockets.connect(_ws(bare_network)) as ws:
            nonce = decode_frame(await ws.recv()).nonce
            await ws.send(_signed_hello(SigningKey.generate(), nonce))
            await ws.recv()
            await ws.send(b"\x00\x01 binary garbage")
            with pytest.raises(websockets.ConnectionClosed) as garbage:
                while True:
                    await ws.recv()
        return refused.value.rcvd.code, garbage.value.rcvd.code

    assert asyncio.run(run()) == (1008, 1003)
    assert httpx.get(f"{bare_network.url}/healthz").json()["status"] == "ok"
    assert "Exception in ASGI application" not in bare_network.coordinator.output()


def test_hello_fields_are_bounded():
    with pytest.raises(ValueError):
        Hardware(cpu_count=1, ram_bytes=1, gpus=("g",) * 1000)
    with pytest.raises(ValueError):
        Hardware(cpu_count=10**40, ram_bytes=1)
    with pytest.raises(ValueError):
        ModelOffer(name="m", sha256="0" * 64, context_length=10**40, backend="x")
