"""End-to-end encryption: ``covey proxy`` and the SDK seal every request to the serving miner.

Real coordinator, miner and proxy processes on 127.0.0.1 with the bundled model. The
coordinator must never hold a recognisable prompt or answer: its database, its log (at
debug level) and its request log are searched for them, while the user gets the answer
through the real ``openai`` client, streamed or whole, across a failover too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import websockets
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from conftest import MODEL, Network, Proc, free_port, ledger_verify, metric
from covey.cli_audit import find_traces
from covey.client.proxy import LocalProxy
from covey.protocol.e2e import SERVER_MESSAGE, Route, RouteRequest, SealedJob
from covey.protocol.frames import SamplingParams
from covey.protocol.sealing import SealedContent, seal_job, sign_box_key, unb64, verify_route

SECRET = "Quimbleworth"
QUESTION = (f"My name is {SECRET} Vantablue and my cat is called Zorpadoodle. "
            "Repeat my full name back to me, then write a short poem about my cat.")


@pytest.fixture(scope="module")
def sealed_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A coordinator logging at debug level, re-checking every answer, and two miners that
    send every token in its own frame; failovers after 2 s of silence."""
    tmp = tmp_path_factory.mktemp("sealed")
    net = Network(tmp, "--log-level", "debug", "--check-rate", "1", "--stall-timeout", "2",
                  "--record-traffic", str(tmp / "traffic.log"))
    try:
        for _ in range(2):
            net.add_miner("--ctx", "1024", "--stream-interval", "0", wait=False)
        net.wait_miners(2)
        yield net
    finally:
        for m in net.miners:
            if m.popen.poll() is None:
                m.popen.send_signal(signal.SIGCONT)
        net.close()


@pytest.fixture(scope="module")
def proxy(sealed_net: Network) -> Iterator[str]:
    """A real ``covey proxy`` process; yields its OpenAI base URL."""
    port = free_port()
    proc = Proc(["proxy", "--coordinator", sealed_net.url, "--api-key", sealed_net.api_key,
                 "--port", str(port)], sealed_net.tmp / "proxy.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        raise RuntimeError("proxy did not start:\n" + proc.output())
    yield f"{base}/v1"
    proc.stop()


def traces(net: Network, *words: str) -> dict[tuple[str, str], int]:
    """Where ``words`` occur in the coordinator's database rows, its log, and everything it
    received and sent (``--record-traffic``)."""
    return find_traces(list(words), net.tmp / "coordinator",
                       logs=[net.coordinator.log, net.tmp / "traffic.log"])


def test_chat_through_the_proxy_never_shows_the_coordinator_the_words(sealed_net, proxy):
    client = openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0)
    plain = openai.OpenAI(base_url=f"{sealed_net.url}/v1", api_key=sealed_net.api_key,
                          max_retries=0)
    whole = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": QUESTION}])
    answer = whole.choices[0].message.content
    assert "Zorpadoodle" in answer, answer  # recognisable: searched for below
    assert whole.usage.completion_tokens > 10
    assert whole.system_fingerprint.startswith("miner-")

    stream = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": QUESTION}])
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    completion = client.completions.create(model=MODEL, prompt=f"{SECRET} is a name that",
                                           max_tokens=12, temperature=0)
    assert completion.choices[0].text

    time.sleep(1.0)  # let settlements and re-checks land
    # The search reaches the rows, log lines and traffic of these very requests...
    assert traces(sealed_net, whole.id), "the audit must see the request's own records"
    assert any(place.endswith("coordinator.log")
               for _, place in traces(sealed_net, "covey.coordinator"))
    # Billed by the miners' signed usage, like any request.
    usage = httpx.get(f"{sealed_net.url}/v1/account", headers=sealed_net.headers,
                      timeout=10).json()["usage"][MODEL]
    assert usage["requests"] == 3
    assert usage["completion_tokens"] == 2 * whole.usage.completion_tokens \
        + completion.usage.completion_tokens
    # ...and finds none of their words (the answer's lines as they are, and as JSON writes
    # them in frames and bodies).
    lines = [line for line in answer.splitlines() if len(line) >= 10]
    assert lines
    assert traces(sealed_net, SECRET, "Zorpadoodle", "Vantablue", *lines,
                  *(json.dumps(line)[1:-1] for line in lines)) == {}
    audit_args = [sys.executable, "-m", "covey", "audit", "--data-dir",
                  str(sealed_net.tmp / "coordinator"), "--log", str(sealed_net.coordinator.log),
                  "--log", str(sealed_net.tmp / "traffic.log")]
    audit = subprocess.run([*audit_args, SECRET, "Zorpadoodle"], capture_output=True,
                           text=True)
    assert audit.returncode == 0 and "not found" in audit.stdout, audit.stdout + audit.stderr
    # The right answer: the same greedy request in the clear gets the same text.
    clear = plain.chat.completions.create(model=MODEL, temperature=0, max_tokens=40,
                                          messages=[{"role": "user", "content": QUESTION}])
    assert clear.choices[0].message.content == answer
    # Sent in the clear, the same words are in what the coordinator received: the audit
    # would have found them.
    found = traces(sealed_net, SECRET, lines[0])
    assert {word for word, _ in found} == {SECRET, lines[0]}, found
    assert all(place.endswith("traffic.log") for _, place in found), found
    audit = subprocess.run([*audit_args, SECRET], capture_output=True, text=True)
    assert audit.returncode == 1 and "found 'Quimbleworth'" in audit.stdout, audit.stdout


def test_sealed_answers_are_rechecked_by_a_validator_unless_the_user_opts_out(sealed_net,
                                                                              proxy):
    client = openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0)
    miners = [m["id"] for m in httpx.get(f"{sealed_net.url}/v1/miners").json()["data"]]

    def checks() -> list[dict]:
        return [c for m in miners for c in
                httpx.get(f"{sealed_net.url}/v1/miners/{m}/checks", timeout=5).json()["data"]]

    def sampled(result: str) -> float:
        return metric(sealed_net, f'covey_checks_total{{kind="sampled",result="{result}"}}')

    def settled() -> tuple[float, float, float]:
        """The sampled-check counters once earlier requests' checks are over."""
        assert sealed_net.wait_idle(60)
        time.sleep(0.5)
        return sampled("passed"), sampled("failed"), sampled("skipped")

    passed, failed, skipped = settled()
    client.chat.completions.create(model=MODEL, temperature=0.8, max_tokens=24,
                                   messages=[{"role": "user", "content": QUESTION}])
    deadline = time.monotonic() + 60
    while sampled("passed") == passed and time.monotonic() < deadline:
        time.sleep(0.2)
    # This sealed answer (every answer is sampled here) was opened and passed by a validator.
    assert settled() == (passed + 1, failed, skipped)
    assert checks() == []  # no failed check on any miner

    # Opted out: no validator sees it, so no check is counted for it.
    counted = settled()
    client.chat.completions.create(model=MODEL, temperature=0.8, max_tokens=16,
                                   messages=[{"role": "user", "content": QUESTION}],
                                   extra_body={"check": False})
    time.sleep(3)
    assert settled() == counted


def test_failover_mid_stream_reseals_to_the_next_miner(sealed_net, proxy):
    client = openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0)
    story = [{"role": "user", "content": "Write a long story about Brindlewomp the lighthouse "
                                         "keeper and a storm."}]
    reference = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=120,
                                               messages=story)
    expected = reference.choices[0].message.content
    assert reference.usage.completion_tokens >= 60

    pieces, killed = [], []
    stream = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=120,
                                            messages=story, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if len(pieces) == 10:
                busy = next(m["id"] for m in httpx.get(f"{sealed_net.url}/v1/miners"
                                                       ).json()["data"] if m["active"])
                proc = next(p for p in sealed_net.miners if f"miner {busy[:16]}" in p.output())
                proc.popen.send_signal(signal.SIGSTOP)  # frozen: its socket stays open
                killed.append(proc)
    assert killed
    assert "".join(pieces) == expected  # re-sealed with the resume point: no gap, no repeat
    killed[0].popen.send_signal(signal.SIGCONT)
    assert traces(sealed_net, "Brindlewomp", *expected.splitlines()[:1]) == {}
    assert ledger_verify(sealed_net.tmp / "coordinator").returncode == 0


def test_in_process_sdk_seals_too(sealed_net):
    with LocalProxy(sealed_net.url, sealed_net.api_key) as local:
        client = openai.OpenAI(base_url=local.base_url, api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "Hi!"}])
        assert r.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL, max_tokens=0,
                                           messages=[{"role": "user", "content": "Hi!"}])
        assert bad.value.body["param"] == "max_tokens"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model",
                                           messages=[{"role": "user", "content": "Hi!"}])


async def _raw_channel(net: Network, tamper) -> list[dict]:
    """Open ``/v1/sealed`` by hand, ask for a route, seal, let ``tamper`` alter the sealed
    job, and return what the coordinator sends back until an end."""
    url = net.url.replace("http://", "ws://") + "/v1/sealed"
    async with websockets.connect(url, additional_headers=net.headers) as ws:
        await ws.send(RouteRequest(id="x1", model=MODEL, size=200,
                                   params=SamplingParams(max_tokens=8, temperature=0)
                                   ).model_dump_json())
        route = SERVER_MESSAGE.validate_json(await ws.recv())
        assert isinstance(route, Route)
        box = verify_route(route.miner, route.box_key, route.box_signature)
        sealed, _ = seal_job(box, SealedContent(prompt="Hello"))
        await ws.send(SealedJob(id="x1", sealed=tamper(sealed)).model_dump_json())
        out = []
        while not out or out[-1]["type"] not in ("done", "error"):
            out.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        return out


def test_a_tampered_ciphertext_is_refused_with_a_clear_error(sealed_net):
    import base64

    def flip(sealed: str) -> str:
        raw = bytearray(unb64(sealed))
        raw[40] ^= 1
        return base64.b64encode(bytes(raw)).decode()

    out = asyncio.run(_raw_channel(sealed_net, flip))
    assert out[-1]["type"] == "error" and out[-1]["status"] == 400, out
    assert out[-1]["error"]["code"] == "invalid_ciphertext"
    assert "altered" in out[-1]["error"]["message"]
    # Nothing was charged and the miner is fine: the same channel works untampered.
    ok = asyncio.run(_raw_channel(sealed_net, lambda s: s))
    assert ok[-1]["type"] == "done"
    assert ledger_verify(sealed_net.tmp / "coordinator").returncode == 0


def test_a_route_signed_by_the_wrong_key_is_refused(tmp_path):
    """A coordinator that hands out its own box key under a miner's name: the proxy
    refuses to seal to it, and the user gets a clear 502."""
    miner, impostor = SigningKey.generate(), PrivateKey.generate()
    forged = sign_box_key(SigningKey.generate(), impostor.public_key)  # not the miner's
    sealed_seen = []

    async def fake(ws) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "request":
                await ws.send(Route(id=msg["id"], job_id="chatcmpl-fake",
                                    miner=miner.verify_key.encode().hex(),
                                    box_key=bytes(impostor.public_key).hex(),
                                    box_signature=forged).model_dump_json())
            elif msg["type"] == "job":
                sealed_seen.append(msg)

    async def scenario() -> tuple[int, dict]:
        port = free_port()
        async with websockets.serve(fake, "127.0.0.1", port):
            app_url = f"http://127.0.0.1:{port}"
            from covey.client.proxy import create_proxy_app

            app = create_proxy_app(app_url, "key")
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as c:
                r = await c.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": SECRET}]})
            await app.state.channel.close()
            return r.status_code, r.json()

    status, body = asyncio.run(scenario())
    assert status == 502
    assert body["error"]["code"] == "route_signature_invalid"
    assert "not signed by miner" in body["error"]["message"]
    assert not sealed_seen  # nothing was sealed to the impostor's key


def test_private_model_through_the_proxy_answers_like_the_plain_model(sealed_net, proxy,
                                                                      tmp_path):
    """A private (permuted-vocabulary) copy served by a real miner: the proxy tokenizes
    locally, the miner sees permuted ids only, and the user gets the plain model's answer."""
    plain_proxy = proxy
    key = tmp_path / "private.key"
    private_file = tmp_path / "private.gguf"
    made = subprocess.run([sys.executable, "-m", "covey", "model", "private", "--key",
                           str(key), MODEL, str(private_file)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    miner = sealed_net.add_miner("--model", str(private_file), "--name", "secret-smol",
                                 "--ctx", "1024", wait=False)
    sealed_net.wait_miners(1, model="secret-smol")
    port = free_port()
    proc = Proc(["proxy", "--coordinator", sealed_net.url, "--api-key", sealed_net.api_key,
                 "--port", str(port), "--private", f"secret-smol={key}:{MODEL}"],
                tmp_path / "proxy.log")
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        ask = {"temperature": 0, "max_tokens": 30, "messages": [{"role": "user", "content":
               "My dog Fennimorglet likes to run. Write a short poem about my dog."}]}
        plain = client.chat.completions.create(model=MODEL, **ask)
        private = client.chat.completions.create(model="secret-smol", **ask)
        assert private.choices[0].message.content == plain.choices[0].message.content
        assert private.usage.completion_tokens == plain.usage.completion_tokens
        streamed = client.chat.completions.create(model="secret-smol", stream=True, **ask)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == plain.choices[0].message.content
        # A stop string is found by the proxy in the decoded text (the miner sees ids only).
        cut = plain.choices[0].message.content.split()[2]
        stopped = client.chat.completions.create(model="secret-smol", stop=[cut], **ask)
        assert stopped.choices[0].message.content == \
            plain.choices[0].message.content.split(cut)[0]
        assert stopped.choices[0].finish_reason == "stop"
        # Text never reaches a private model's miner, sealed or not; nor a watermark.
        hello = {**ask, "messages": [{"role": "user", "content": "hello"}]}
        with pytest.raises(openai.BadRequestError) as text:
            openai.OpenAI(base_url=f"{sealed_net.url}/v1", api_key=sealed_net.api_key,
                          max_retries=0).chat.completions.create(model="secret-smol", **hello)
        assert text.value.body["param"] == "model" and "covey proxy" in str(text.value)
        with pytest.raises(openai.BadRequestError) as text:
            openai.OpenAI(base_url=plain_proxy, api_key="unused", max_retries=0
                          ).chat.completions.create(model="secret-smol", **hello)
        assert text.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as marked:
            client.chat.completions.create(model="secret-smol", extra_body={"watermark": True},
                                           **ask)
        assert marked.value.body["param"] == "watermark"
        # Its miners hold no tokenizer: watermark detection says so.
        r = httpx.post(f"{sealed_net.url}/v1/watermark/detect", headers=sealed_net.headers,
                       json={"model": "secret-smol", "text": "any text at all"}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    finally:
        proc.stop()
        miner.stop()
    assert "Fennimorglet" not in miner.output()  # its log holds no word of the request
    assert traces(sealed_net, "Fennimorglet") == {}
