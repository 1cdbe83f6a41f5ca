"""Every error leaves in OpenAI's shape with the right status."""

from __future__ import annotations

import threading

import httpx
import pytest

from conftest import MODEL, Network


def assert_openai_error(
    r: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_unknown_model_is_404(network: Network):
    r = httpx.post(
        f"{network.url}/v1/chat/completions",
        headers=network.headers,
        json={**CHAT, "model": "gpt-17"},
    )
    assert_openai_error(r, 404, "model_not_found", "model")


def test_malformed_json_is_400(network: Network):
    r = httpx.post(
        f"{network.url}/v1/chat/completions",
        content=b'{"model": ',
        headers={**network.headers, "Content-Type": "application/json"},
    )
    assert_openai_error(r, 400, "invalid_json")


@pytest.mark.parametrize(
    "field,value,param",
    [
        ("temperature", "hot", "temperature"),
        ("temperature", 3.5, "temperature"),
        ("max_tokens", -1, "max_tokens"),
        ("messages", "hello", "messages"),
        ("top_p", 0, "top_p"),
        ("stop", ["a", "b", "c", "d", "e"], "stop"),
    ],
)
def test_wrong_field_is_400_naming_it(network: Network, field, value, param):
    r = httpx.post(
        f"{network.url}/v1/chat/completions", headers=network.headers, json={**CHAT, field: value}
    )
    assert_openai_error(r, 400, param=param)


def test_missing_field_is_400(network: Network):
    r = httpx.post(f"{network.url}/v1/completions", headers=network.headers, json={"model": MODEL})
    assert_openai_error(r, 400, "missing_required_parameter", "prompt")


def test_bad_message_role_names_nested_field(network: Network):
    r = httpx.post(
        f"{network.url}/v1/chat/completions",
        headers=network.headers,
        json={**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
    )
    err = assert_openai_error(r, 400)
    assert err["param"].startswith("messages[0].role")


def test_n_greater_than_one_is_refused(network: Network):
    r = httpx.post(
        f"{network.url}/v1/chat/completions", headers=network.headers, json={**CHAT, "n": 2}
    )
    assert_openai_error(r, 400, "unsupported_parameter", "n")


def test_prompt_longer_than_context_is_400_with_both_numbers(network: Network):
    # The shared miners run with a 1024-token context.
    r = httpx.post(
        f"{network.url}/v1/completions",
        headers=network.headers,
        json={"model": MODEL, "prompt": "hello " * 1500, "max_tokens": 4},
    )
    err = assert_openai_error(r, 400, "context_length_exceeded", "prompt")
    assert "1024" in err["message"] and "1501" in err["message"]


def test_unknown_path_and_method_keep_the_shape(network: Network):
    assert_openai_error(httpx.get(f"{network.url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{network.url}/v1/chat/completions"), 405)


def test_known_model_without_miners_is_503_at_once(bare_network: Network):
    r = httpx.post(
        f"{bare_network.url}/v1/chat/completions",
        headers=bare_network.headers,
        json=CHAT,
        timeout=5,
    )
    assert_openai_error(r, 503, "no_miner_available")
    models = httpx.get(f"{bare_network.url}/v1/models").json()["data"]
    assert {"id": MODEL, "miners": 0}.items() <= next(m for m in models if m["id"] == MODEL).items()


def test_full_queue_is_429_with_retry_after(tmp_path):
    net = Network(tmp_path, "--queue-size", "0")
    try:
        net.add_miner("--ctx", "1024")
        started = threading.Event()

        def long_stream() -> None:
            body = {
                "model": MODEL,
                "prompt": "Count: 1, 2, 3,",
                "max_tokens": 400,
                "temperature": 0,
                "stream": True,
            }
            with httpx.stream(
                "POST", f"{net.url}/v1/completions", headers=net.headers, json=body, timeout=60
            ) as r:
                for _ in r.iter_lines():
                    started.set()

        t = threading.Thread(target=long_stream)
        t.start()
        assert started.wait(30)
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, json=CHAT, timeout=10)
        err = assert_openai_error(r, 429, "queue_full")
        assert err["type"] == "rate_limit_error"
        assert int(r.headers["Retry-After"]) >= 1
        t.join(60)
    finally:
        net.close()


def test_oversized_body_is_413(network: Network):
    big = {"model": MODEL, "prompt": "x" * (9 * 2**20)}
    r = httpx.post(f"{network.url}/v1/completions", headers=network.headers, json=big, timeout=30)
    assert_openai_error(r, 413, "request_too_large")
