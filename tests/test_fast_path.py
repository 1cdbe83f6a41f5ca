"""The completion endpoints' fast path (``coordinator/api/fast.py``) answers exactly as the
FastAPI routes do, and hands them everything it does not serve with the body intact."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import MODEL, Network
from covey.coordinator.api.fast import FastInference
from covey.coordinator.app import CoordinatorConfig, create_app

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3,
        "temperature": 0}
SLOW = "application/json; charset=utf-8"
"""A content type the fast path leaves to the FastAPI route (it takes bare JSON only)."""


def _fast_layer(app: object) -> FastInference:
    layer = app.middleware_stack  # type: ignore[attr-defined]
    while not isinstance(layer, FastInference):
        layer = layer.app
    return layer


def _counted(layer: FastInference) -> list[str]:
    """Count what the fast path hands on to the FastAPI stack (bodies as they arrive)."""
    handed: list[str] = []
    inner = layer.app

    async def counting(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http" or scope["method"] != "POST":
            await inner(scope, receive, send)
            return
        first = await receive()
        handed.append(first.get("body", b"").decode())
        sent = [first]

        async def replay():  # type: ignore[no-untyped-def]
            return sent.pop() if sent else await receive()
        await inner(scope, replay, send)

    layer.app = counting
    return handed


def test_the_fast_path_serves_the_common_case_and_hands_on_the_rest(tmp_path: Path):
    app = create_app(CoordinatorConfig(data_dir=tmp_path))
    with TestClient(app) as client:
        key = client.post("/v1/accounts").json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        body = {**CHAT, "model": "smollm2-135m-instruct"}
        # A key's first use looks it up (the long way) and caches it; this builds the
        # middleware stack too.
        client.post("/v1/chat/completions", json=body, headers=auth)
        handed = _counted(_fast_layer(app))

        # Known key, bare JSON that validates: served here (no miner: 503), never handed on.
        r = client.post("/v1/chat/completions", json=body, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_miner_available"
        r = client.post("/v1/completions", headers=auth,
                        json={"model": "smollm2-135m-instruct", "prompt": "hi"})
        assert r.status_code == 503
        # Refused by the request's own terms (tools) after validating: also served here,
        # and counted as a refusal, as the route's error handler does.
        before = _refused(client)
        r = client.post("/v1/chat/completions", headers=auth,
                        json={**body, "tools": [{"type": "function"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        assert _refused(client) == before + 1
        assert handed == []

        # Everything else reaches the route, body intact, and gets the route's answer.
        bad = json.dumps({**body, "temperature": "hot"})
        r = client.post("/v1/chat/completions", content=bad,
                        headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        assert handed[-1] == bad
        r = client.post("/v1/chat/completions", content=b'{"model": ',
                        headers={**auth, "Content-Type": "application/json"})
        assert r.json()["error"]["code"] == "invalid_json"
        r = client.post("/v1/chat/completions", json=body,
                        headers={"Authorization": "Bearer sk-covey-unknown"})
        assert r.status_code == 401
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 401
        r = client.post("/v1/chat/completions", content=json.dumps(body),
                        headers={**auth, "Content-Type": "text/plain"})
        assert r.status_code == 400
        assert len(handed) == 5
        r = client.post("/v1/chat/completions", content=json.dumps(body),
                        headers={**auth, "Content-Type": SLOW})
        assert r.status_code == 503 and handed[-1] == json.dumps(body)
        big = b'{"model": "' + b"x" * (8 * 2**20) + b'"}'
        r = client.post("/v1/completions", content=big,
                        headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"]
        assert len(handed) == 7
        # JSON nested deeper than the parser goes: the route's 400, never a 500.
        deep = b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        r = client.post("/v1/chat/completions", content=deep,
                        headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        # Repeated headers: the route decides which counts (the first: a 401 here).
        r = client.post("/v1/chat/completions", content=json.dumps(body), headers=[
            ("Authorization", "Bearer sk-covey-wrong"), ("Authorization", auth["Authorization"]),
            ("Content-Type", "application/json")])
        assert r.status_code == 401
        r = client.post("/v1/chat/completions", content=json.dumps(body), headers=[
            ("Authorization", auth["Authorization"]), ("Content-Type", "text/plain"),
            ("Content-Type", "application/json")])
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body"
        assert len(handed) == 10
        r = client.get("/v1/completions", headers=auth)
        assert r.status_code == 405


def _refused(client: TestClient) -> float:
    text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('covey_requests_total{model="",status="400"}'))


def _shape(r: httpx.Response) -> object:
    """What must match between the two paths: the status, an error's whole body, an
    answer's fields and kinds (ids, times and text may differ)."""
    if r.status_code != 200:
        return r.status_code, r.json()
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        return 200, [e if e == "[DONE]" else sorted(json.loads(e)) for e in events][-2:]
    body = r.json()
    return 200, sorted(body), body["object"], sorted(body["usage"])


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 2}),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-17"}),
    ("/v1/chat/completions", {**CHAT, "n": 2}),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**9}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}),
])
def test_both_paths_answer_alike(network: Network, path: str, body: dict):
    data = json.dumps(body).encode()
    answers = []
    for content_type in ("application/json", SLOW):
        r = httpx.post(f"{network.url}{path}", content=data, timeout=60,
                       headers={**network.headers, "Content-Type": content_type})
        answers.append(_shape(r))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("content_type", ["application/json", SLOW], ids=["fast", "route"])
def test_an_internal_error_answers_500_and_frees_the_keys_slot(tmp_path: Path,
                                                               content_type: str):
    """A bug in the request path is a 500 in OpenAI's shape, and the request leaves the
    key's concurrency count (a key allowed one request at a time is not locked out)."""
    from covey.coordinator.quotas import KeyLimitPolicy

    config = CoordinatorConfig(data_dir=tmp_path,
                               key_limits=KeyLimitPolicy(concurrency=1, per_minute=0))
    app = create_app(config)
    with TestClient(app, raise_server_exceptions=False) as client:
        key = client.post("/v1/accounts").json()["api_key"]
        auth = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
        body = json.dumps({**CHAT, "model": "smollm2-135m-instruct"})
        client.post("/v1/chat/completions", content=body, headers=auth)  # caches the key
        serving = app.state.serving

        async def broken(*args: object) -> None:
            raise RuntimeError("a bug")

        serving._start = broken
        for _ in range(3):
            r = client.post("/v1/chat/completions", content=body, headers=auth)
            assert r.status_code == 500, r.text
            assert r.json()["error"]["code"] == "internal_error"
            assert "Traceback" not in r.text
        assert serving.limits.open(serving.billing.bank.cached_account(key)) == 0
