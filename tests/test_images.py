"""Images through the network: the real ``openai`` client against a real coordinator and two
miner processes serving a tiny Stable Diffusion pipeline built in the test (the real
diffusers classes, small and randomly initialised: no text-to-image weights ship in any
package here). Same seed, same image on either miner; billing per image and size; bad
input; a miner returning random images caught and slashed."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError, OpenAI

from conftest import Network, ledger_verify
from covey.miner.backends.adversary import ENV, HONEST_FIRST_ENV
from test_billing import account, sign_up
from test_verify import SLASH, checks_of, stake

pytest.importorskip("diffusers")
pytest.importorskip("imagehash")

MODEL = "tiny-sd"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from covey.miner.backends.diffusers import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe") / MODEL, seed=0)


@pytest.fixture(scope="module")
def net(pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    net = Network(tmp_path_factory.mktemp("images"))
    try:
        net.add_miner("--model", str(pipeline), wait=False)
        net.wait_miners(1, MODEL, timeout=120)
        net.add_miner("--model", str(pipeline), wait=False)
        net.wait_miners(2, MODEL, timeout=120)
        yield net
    finally:
        net.close()


def _client(net: Network) -> OpenAI:
    return OpenAI(base_url=f"{net.url}/v1", api_key=net.api_key, max_retries=0)


def test_the_model_is_listed_with_its_sizes(net):
    card = next(m for m in httpx.get(f"{net.url}/v1/models").json()["data"]
                if m["id"] == MODEL)
    assert card["kind"] == "image" and card["miners"] == 2
    assert card["sizes"][0] == "64x64"


def test_the_same_seed_gives_the_same_image_on_either_miner(net):
    from PIL import Image

    headers = net.headers
    images, miners = set(), set()
    for _ in range(8):
        r = httpx.post(f"{net.url}/v1/images/generations", headers=headers, timeout=120,
                       json={"model": MODEL, "prompt": "a red boat", "size": "64x64",
                             "seed": 42, "steps": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        images.add(body["data"][0]["b64_json"])
        receipt = httpx.get(f"{net.url}/v1/receipts/{body['id']}", headers=headers).json()
        miners.add(receipt["receipt"]["miner"])
        if len(miners) == 2:
            break
    assert len(miners) == 2, "one miner served every request"
    assert len(images) == 1  # byte-identical PNGs from both miners
    with Image.open(io.BytesIO(base64.b64decode(images.pop()))) as image:
        assert image.size == (64, 64)


def test_openai_client_generates_n_images_with_seeds(net):
    client = _client(net)
    two = client.images.generate(model=MODEL, prompt="a lighthouse", n=2, size="64x64",
                                 extra_body={"seed": 7, "steps": 4})
    assert len(two.data) == 2 and two.data[0].b64_json != two.data[1].b64_json
    second = client.images.generate(model=MODEL, prompt="a lighthouse", size="64x64",
                                    extra_body={"seed": 8, "steps": 4})
    assert second.data[0].b64_json == two.data[1].b64_json  # image i has seed + i


def test_images_are_billed_per_image_and_size(net):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    r = httpx.post(f"{net.url}/v1/images/generations", headers=headers, timeout=120,
                   json={"model": MODEL, "prompt": "a cat", "size": "128x128", "n": 2,
                         "steps": 2})
    assert r.status_code == 200, r.text
    # 2 images of 128 × 128: 1 tile each; the floor is 1,000 µcr per 256-pixel tile
    assert r.json()["usage"]["tiles"] == 2
    after = account(net, headers)
    assert before - after["balance"] == 2 * 1000 and after["held"] == 0


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 11}, "n"),
    ({"size": "100x100"}, "size"),
    ({"size": "4096x4096"}, "size"),
    ({"response_format": "url"}, "response_format"),
    ({"prompt": ""}, "prompt"),
    ({"model": "smollm2-135m-instruct-nope"}, "model"),
    ({"seed": -1}, "seed"),
])
def test_bad_image_requests_cost_nothing(net, body, param):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    r = httpx.post(f"{net.url}/v1/images/generations", headers=headers, timeout=60,
                   json={"model": MODEL, "prompt": "a cat", **body})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param
    assert account(net, headers)["balance"] == before
    assert httpx.get(f"{net.url}/healthz").status_code == 200


def test_openai_client_sees_a_bad_size_as_bad_request(net):
    with pytest.raises(BadRequestError):
        _client(net).images.generate(model=MODEL, prompt="x", size="1024x1792")


def test_a_miner_returning_random_images_is_caught_and_slashed(pipeline: Path, tmp_path: Path):
    net = Network(tmp_path, "--check-rate", "1")
    try:
        headers = sign_up(net)
        net.add_miner("--model", str(pipeline), wait=False)
        net.wait_miners(1, MODEL, timeout=120)
        honest = httpx.get(f"{net.url}/v1/miners").json()["data"][0]["id"]
        # Honest on its trial (judged by the first miner), random pixels from then on.
        net.add_miner("--model", str(pipeline), wait=False,
                      env={ENV: "random-image", HONEST_FIRST_ENV: "1"})
        net.wait_miners(2, MODEL, timeout=120)
        cheat = stake(net, 1, headers)
        found: list[dict] = []
        for i in range(12):
            r = httpx.post(f"{net.url}/v1/images/generations", headers=headers, timeout=120,
                           json={"model": MODEL, "prompt": f"a tree {i}", "steps": 2})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 10
            while not found and time.monotonic() < deadline:
                found = checks_of(net, cheat)
                time.sleep(0.2)
            if found:
                break
        assert found, "random images were not caught"
        check = found[0]
        assert check["kind"] == "sampled" and check["verdict"]["passed"] is False
        assert "pHash" in check["verdict"]["reasons"][0]
        assert check["slashed"] == SLASH and check["validator"] == honest
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr
