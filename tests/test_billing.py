"""Paying for inference: keys, escrow, exact charges, refunds, concurrency and crashes."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import MODEL, Network, ledger_verify, postgres_database
from test_errors import CHAT, assert_openai_error

GRANT = 10_000_000
PRICE_PROMPT, PRICE_COMPLETION, FEE_BPS = 100_000, 200_000, 500  # the defaults


def cost(prompt: int, completion: int) -> int:
    return -(-(prompt * PRICE_PROMPT + completion * PRICE_COMPLETION) // 1_000_000)


def sign_up(net: Network) -> dict[str, str]:
    r = httpx.post(f"{net.url}/v1/accounts", timeout=10)
    assert r.status_code == 201
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def account(net: Network, headers: dict[str, str]) -> dict:
    r = httpx.get(f"{net.url}/v1/account", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/account"])
@pytest.mark.parametrize("auth", [None, "Bearer sk-covey-wrong", "Basic abc"])
def test_401_without_a_valid_key(network: Network, path: str, auth: str | None):
    headers = {"Authorization": auth} if auth else {}
    method = "GET" if path == "/v1/account" else "POST"
    body = {**CHAT, "prompt": "x"}
    r = httpx.request(method, f"{network.url}{path}", json=body, headers=headers)
    assert_openai_error(r, 401, "invalid_api_key")


def test_exact_charge_shows_on_account_and_miner_earnings(network: Network):
    headers = sign_up(network)
    before = account(network, headers)
    assert before["balance"] == GRANT and before["held"] == 0
    r = httpx.post(f"{network.url}/v1/chat/completions", headers=headers, timeout=60,
                   json={**CHAT, "max_tokens": 16, "temperature": 0})
    usage = r.json()["usage"]
    miner_id = r.json()["system_fingerprint"].removeprefix("miner-")
    charge = cost(usage["prompt_tokens"], usage["completion_tokens"])
    after = account(network, headers)
    assert after["balance"] == GRANT - charge
    assert after["held"] == 0
    assert after["usage"][MODEL] == {"requests": 1, "prompt_tokens": usage["prompt_tokens"],
                                     "completion_tokens": usage["completion_tokens"],
                                     "cost": charge}
    miners = httpx.get(f"{network.url}/v1/miners").json()["data"]
    full_id = next(m["id"] for m in miners if m["id"].startswith(miner_id))
    earned = httpx.get(f"{network.url}/v1/miners/{full_id}/earnings").json()
    assert earned["jobs"] >= 1 and earned["balance"] > 0
    history = httpx.get(f"{network.url}/v1/account/transactions", headers=headers).json()
    kinds = [t["kind"] for t in history["data"]]
    assert kinds[-1] == "grant" and "hold" in kinds
    check = ledger_verify(network.tmp / "coordinator")
    assert check.returncode == 0, check.stdout + check.stderr


def test_quote_is_what_is_held(network: Network):
    headers = sign_up(network)
    body = {**CHAT, "max_tokens": 10}
    quote = httpx.post(f"{network.url}/v1/quote", headers=headers, json=body).json()
    assert quote["max_completion_tokens"] == 10
    assert quote["max_cost"] == cost(quote["max_prompt_tokens"], 10)
    httpx.post(f"{network.url}/v1/chat/completions", headers=headers, json=body, timeout=60)
    data = httpx.get(f"{network.url}/v1/account/transactions", headers=headers).json()["data"]
    assert next(t["amount"] for t in data if t["kind"] == "hold") == quote["max_cost"]


def test_402_when_broke_and_no_work_done(tmp_path):
    net = Network(tmp_path, "--grant", "50")
    try:
        net.add_miner("--ctx", "1024")
        headers = sign_up(net)
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=headers,
                       json={**CHAT, "max_tokens": 500})
        err = assert_openai_error(r, 402, "insufficient_quota")
        assert err["type"] == "insufficient_quota"
        assert httpx.get(f"{net.url}/v1/miners").json()["data"][0]["completed"] == 0
        assert account(net, headers)["balance"] == 50
    finally:
        net.close()


def test_client_that_leaves_pays_only_for_what_it_got(bare_network: Network):
    bare_network.add_miner("--ctx", "1024")
    headers = bare_network.headers
    start = account(bare_network, headers)["balance"]
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 600, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{bare_network.url}/v1/completions", headers=headers, json=body,
                      timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(10):
            next(lines)
    deadline = threading.Event()
    for _ in range(40):
        a = account(bare_network, headers)
        if a["held"] == 0 and a["usage"]:
            break
        deadline.wait(0.05)
    used = a["usage"][MODEL]
    assert 5 <= used["completion_tokens"] < 100
    assert a["balance"] == start - used["cost"]
    assert used["cost"] == cost(used["prompt_tokens"], used["completion_tokens"])


def _load(net: Network, users: int, per_user: int) -> list[dict[str, str]]:
    keys = [sign_up(net) for _ in range(users)]

    def run(headers: dict[str, str]) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(per_user):
                r = http.post(f"{net.url}/v1/completions", headers=headers, json={
                    "model": MODEL, "prompt": f"Item {i}:", "max_tokens": 3,
                    "temperature": 0, "stream": i % 2 == 0})
                assert r.status_code == 200, r.text

    with ThreadPoolExecutor(users) as pool:
        list(pool.map(run, keys))
    return keys


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_200_requests_from_20_users_on_2_miners_balance_exactly(tmp_path, db: str):
    with postgres_database() if db == "postgresql" else contextlib.nullcontext() as url:
        args = ["--database-url", url] if url else []
        net = Network(tmp_path, *args, "--queue-size", "256")
        try:
            net.add_miner("--ctx", "512", wait=False)
            net.add_miner("--ctx", "512", wait=False)
            net.wait_miners(2)
            keys = _load(net, users=20, per_user=10)
            for headers in keys:
                a = account(net, headers)
                assert a["held"] == 0
                assert a["usage"][MODEL]["requests"] == 10
                assert a["balance"] == GRANT - a["usage"][MODEL]["cost"]
            check = ledger_verify(tmp_path / "coordinator", url)
            assert check.returncode == 0, check.stdout + check.stderr
        finally:
            net.close()


def test_sigkill_mid_streams_refunds_every_escrow_on_restart(tmp_path):
    net = Network(tmp_path)
    try:
        net.add_miner("--ctx", "1024", wait=False)
        net.add_miner("--ctx", "1024", wait=False)
        net.wait_miners(2)
        headers = sign_up(net)
        started = threading.Semaphore(0)

        def stream(i: int) -> None:
            body = {"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 300,
                    "stream": True}
            try:
                with httpx.stream("POST", f"{net.url}/v1/completions", headers=headers,
                                  json=body, timeout=60) as r:
                    started.release()
                    for _ in r.iter_lines():
                        pass
            except httpx.HTTPError:
                pass

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for _ in range(2):  # two streams are producing tokens; the rest wait in the queue
            assert started.acquire(timeout=30)
        assert account(net, headers)["held"] > 0
        net.coordinator.popen.send_signal(signal.SIGKILL)
        net.coordinator.popen.wait()
        for t in threads:
            t.join(30)
        net.restart_coordinator()
        a = account(net, headers)
        assert a["held"] == 0
        assert a["balance"] == GRANT  # nothing finished, nothing charged, all refunded
        check = ledger_verify(tmp_path / "coordinator")
        assert check.returncode == 0, check.stdout + check.stderr
        net.wait_miners(2, timeout=30)  # and the network serves again
        r = httpx.post(f"{net.url}/v1/completions", headers=headers, timeout=30,
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        net.close()


def test_tampered_database_row_fails_ledger_verify(network: Network):
    import sqlite3

    sign_up(network)
    db = network.tmp / "coordinator" / "covey.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE transfers SET amount = amount + 1 WHERE seq = 1")
    try:
        check = ledger_verify(network.tmp / "coordinator")
        assert check.returncode == 1
        assert "entry 1" in check.stderr + check.stdout
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE transfers SET amount = amount - 1 WHERE seq = 1")


def test_miner_asks_set_the_price_and_the_cheaper_miner_is_preferred(bare_network: Network):
    dear = 3_000_000
    bare_network.add_miner("--ctx", "512", "--ask-completion", str(dear))
    headers = sign_up(bare_network)
    body = {**CHAT, "max_tokens": 8, "temperature": 0}
    quote = httpx.post(f"{bare_network.url}/v1/quote", headers=headers, json=body).json()
    assert quote["price"]["completion"] == dear
    r = httpx.post(f"{bare_network.url}/v1/chat/completions", headers=headers, json=body,
                   timeout=60).json()
    u = r["usage"]
    expected = -(-(u["prompt_tokens"] * PRICE_PROMPT + u["completion_tokens"] * dear)
                 // 1_000_000)
    assert account(bare_network, headers)["usage"][MODEL]["cost"] == expected

    bare_network.add_miner("--ctx", "512")  # asks nothing: the floor price
    cheap = next(m["id"] for m in httpx.get(f"{bare_network.url}/v1/miners").json()["data"]
                 if m["models"][0]["ask_completion"] == 0)
    for _ in range(3):  # one at a time: both idle each time, so price decides
        r = httpx.post(f"{bare_network.url}/v1/chat/completions", headers=headers, json=body,
                       timeout=60).json()
        assert cheap.startswith(r["system_fingerprint"].removeprefix("miner-"))
    a = account(bare_network, headers)
    assert a["held"] == 0 and a["usage"][MODEL]["requests"] == 4
    check = ledger_verify(bare_network.tmp / "coordinator")
    assert check.returncode == 0, check.stdout + check.stderr


def test_client_hanging_up_at_once_leaves_no_escrow_open(network: Network):
    import json as _json
    import socket

    headers = sign_up(network)
    body = _json.dumps({**CHAT, "max_tokens": 20}).encode()
    port = int(network.url.rsplit(":", 1)[1])
    for stream in (False, True):
        payload = _json.dumps({**CHAT, "max_tokens": 20, "stream": stream}).encode()
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\n"
                          + f"{list(headers)[0]}: {list(headers.values())[0]}\r\n".encode()
                          + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    del body
    a = {}
    for _ in range(100):
        a = account(network, headers)
        if a["held"] == 0:
            break
        threading.Event().wait(0.1)
    assert a["held"] == 0
    assert a["balance"] + sum(u["cost"] for u in a["usage"].values()) == GRANT


def test_transfers_refuse_unknown_accounts_and_conflicting_retries(network: Network):
    alice, bob = sign_up(network), sign_up(network)
    bob_id = account(network, bob)["id"]
    url = f"{network.url}/v1/account/transfers"
    r = httpx.post(url, headers=alice, json={"to": "0123456789abcdef", "amount": 10,
                                             "idempotency_key": "k0"})
    assert_openai_error(r, 404, "account_not_found", "to")
    r = httpx.post(url, headers=alice, json={"to": "miner:" + "ab" * 32, "amount": 10,
                                             "idempotency_key": "k1"})
    assert_openai_error(r, 404, "account_not_found", "to")
    ok = httpx.post(url, headers=alice, json={"to": bob_id, "amount": 100,
                                              "idempotency_key": "k2"})
    assert ok.json()["applied"] is True
    again = httpx.post(url, headers=alice, json={"to": bob_id, "amount": 100,
                                                 "idempotency_key": "k2"})
    assert again.json()["applied"] is False
    r = httpx.post(url, headers=alice, json={"to": bob_id, "amount": 5000,
                                             "idempotency_key": "k2"})
    assert_openai_error(r, 409, "idempotency_conflict", "idempotency_key")
    assert account(network, bob)["balance"] == GRANT + 100


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/account/transactions?before=99999999999999999999999", None),
    ("POST", "/v1/quote", '{"model": "smollm2-135m-instruct", "prompt": "\\ud800"}'),
    ("POST", "/v1/quote", "[" * 100_000 + "]" * 100_000),
    ("GET", "/v1/miners/ZZZ/earnings", None),
])
def test_money_endpoints_answer_bad_input_with_400(network: Network, method, path, body):
    r = httpx.request(method, f"{network.url}{path}", content=body,
                      headers={**network.headers, "Content-Type": "application/json"})
    assert_openai_error(r, 400)


def test_floor_price_per_model_from_the_command_line(tmp_path):
    net = Network(tmp_path, "--price", f"{MODEL}=1000000,3000000")
    try:
        net.add_miner("--ctx", "512")
        quote = httpx.post(f"{net.url}/v1/quote", headers=net.headers,
                           json={**CHAT, "max_tokens": 4}).json()
        assert quote["price"] == {"prompt": 1_000_000, "completion": 3_000_000,
                                  "per_tokens": 1_000_000}
    finally:
        net.close()
    bad = subprocess.run([sys.executable, "-m", "covey", "coordinator", "--price", "oops",
                          "--data-dir", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "MODEL=PROMPT,COMPLETION" in bad.stderr
