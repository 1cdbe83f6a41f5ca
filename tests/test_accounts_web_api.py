"""Accounts for the web page's Account panel: invite codes (`covey invite create`,
`--invite-only`), API keys made and revoked by their owner, usage per day. Against real
coordinators: an invite-only one on SQLite with a synthetic miner, an open one on
PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import websockets
from alembic import command
from alembic.config import Config
from nacl.signing import SigningKey
from sqlalchemy import insert

from conftest import Network, postgres_database
from covey.coordinator.ledger import Ledger, store
from covey.coordinator.ledger.bank import Bank, BankPolicy
from covey.coordinator.ledger.keys import hash_key, list_keys
from covey.coordinator.ledger.schema import api_keys, usage
from covey.coordinator.ledger.store import make_engine
from test_errors import assert_openai_error

GRANT = 7_000_000  # the invite-only coordinator's faucet grant
DAY_US = 86_400_000_000
INVITE_REQUIRED = ("This network is invite-only: sign up with an invite code (the operator "
                   "makes them with `covey invite create`).")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """Invite-only, on SQLite, with one synthetic miner (usage needs a real request)."""
    n = Network(tmp_path_factory.mktemp("invite-only"), "--invite-only", "--grant", str(GRANT))
    try:
        n.add_miner("--backend", "synthetic", "--tokens-per-second", "0", wait=False)
        n.wait_miners(1, model="synthetic")
        yield n
    finally:
        n.close()


@pytest.fixture(scope="module")
def pg_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Network, str]]:
    """Open sign-up, on PostgreSQL (skipped without one)."""
    with postgres_database() as url:
        n = Network(tmp_path_factory.mktemp("open-pg"), "--database-url", url)
        try:
            yield n, url
        finally:
            n.close()


def invite(*args: str, data_dir: Path | None = None, url: str | None = None
           ) -> subprocess.CompletedProcess:
    """Run `covey invite create` as an operator would."""
    where = ["--data-dir", str(data_dir)] if data_dir else []
    where += ["--database-url", url] if url else []
    return subprocess.run([sys.executable, "-m", "covey", "invite", "create", *where, *args],
                          capture_output=True, text=True, timeout=60)


def new_code(net: Network, *args: str) -> str:
    done = invite(*args, data_dir=net.tmp / "coordinator")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1, done.stdout  # one line, for scripts
    return done.stdout.strip()


def sign_up(url: str, body: object = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/accounts", json=body, timeout=10)


@pytest.fixture(scope="module")
def pool_code(net: Network) -> str:
    """One code for the accounts that tests of other things need."""
    return new_code(net, "--uses", "100")


def member(net: Network, code: str) -> tuple[str, dict[str, str]]:
    """A new account on the invite-only network: (its id, its auth header)."""
    r = sign_up(net.url, {"invite_code": code})
    assert r.status_code == 201, r.text
    return r.json()["id"], {"Authorization": f"Bearer {r.json()['api_key']}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def grants(url: str, headers: dict[str, str]) -> list[int]:
    data = httpx.get(f"{url}/v1/account/transactions", headers=headers).json()["data"]
    return [t["amount"] for t in data if t["kind"] == "grant"]


# --- invites --------------------------------------------------------------------------


def test_healthz_says_whether_sign_up_needs_an_invite(net: Network):
    assert httpx.get(f"{net.url}/healthz").json()["invite_only"] is True


@pytest.mark.parametrize("body", [None, {}, {"invite_code": None}])
def test_invite_only_refuses_sign_up_without_a_code(net: Network, body: object):
    err = assert_openai_error(sign_up(net.url, body), 403, "invite_required", "invite_code")
    assert err["message"] == INVITE_REQUIRED
    assert err["type"] == "invalid_request_error"


def test_a_single_use_code_grants_its_amount_once(net: Network):
    code = new_code(net, "--grant", "1234567")
    assert code.startswith("inv-")
    with sqlite3.connect(net.tmp / "coordinator" / "covey.db") as db:
        stored = [h for (h,) in db.execute("SELECT code_hash FROM invites")]
    assert hashlib.sha256(code.encode()).hexdigest() in stored and code not in stored
    r = sign_up(net.url, {"invite_code": code})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["object"] == "account" and body["balance"] == 1_234_567
    assert body["api_key"].startswith("sk-covey-")
    assert grants(net.url, bearer(body["api_key"])) == [1_234_567]
    again = sign_up(net.url, {"invite_code": code})
    assert_openai_error(again, 403, "invalid_invite", "invite_code")


def test_a_code_without_grant_gives_the_faucet_amount_to_each_of_its_uses(net: Network):
    done = invite("--uses", "3", data_dir=net.tmp / "coordinator")
    assert "3 sign-ups" in done.stderr and "faucet" in done.stderr
    code = done.stdout.strip()
    for _ in range(3):
        r = sign_up(net.url, {"invite_code": code})
        assert r.status_code == 201, r.text
        assert r.json()["balance"] == GRANT
    assert_openai_error(sign_up(net.url, {"invite_code": code}), 403, "invalid_invite")


def test_racing_sign_ups_take_each_use_once(net: Network):
    code = new_code(net, "--uses", "3", "--grant", "5")
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: sign_up(net.url, {"invite_code": code}), range(10)))
    assert sorted(r.status_code for r in answers) == [201] * 3 + [403] * 7
    for r in answers:
        if r.status_code == 403:
            assert r.json()["error"]["code"] == "invalid_invite"


def test_an_unknown_code_is_refused(net: Network):
    for code in ("inv-nope", "x" * 100, "\u00e9\u263a"):
        r = sign_up(net.url, {"invite_code": code})
        assert_openai_error(r, 403, "invalid_invite", "invite_code")


@pytest.mark.parametrize("raw,code", [
    (b'{"invite_code": ', "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b"[]", "invalid_body"),
    (b'"inv-abc"', "invalid_body"),
    (b'{"invite_code": 5}', "invalid_value"),
    (b'{"invite_code": ""}', "invalid_value"),
    (b'{"invite_code": "' + b"x" * 101 + b'"}', "invalid_value"),
    (b'{"invite_code": "inv-x", "grant": 10}', "invalid_value"),
])
def test_a_malformed_sign_up_body_is_400(net: Network, raw: bytes, code: str):
    r = httpx.post(f"{net.url}/v1/accounts", content=raw,
                   headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, code)


def test_invite_create_refuses_bad_arguments(tmp_path: Path, net: Network):
    assert invite("--uses", "0", data_dir=net.tmp / "coordinator").returncode == 2
    assert invite("--grant", "-1", data_dir=net.tmp / "coordinator").returncode == 2
    missing = invite(data_dir=tmp_path / "nothing-here")
    assert missing.returncode == 2 and "no coordinator database" in missing.stderr
    assert not (tmp_path / "nothing-here").exists()


def test_open_sign_up_on_postgresql_takes_codes_too(pg_net: tuple[Network, str]):
    net, url = pg_net
    assert httpx.get(f"{net.url}/healthz").json()["invite_only"] is False
    for body in (None, {}):
        r = sign_up(net.url, body)
        assert r.status_code == 201 and r.json()["balance"] == 10_000_000
    done = invite("--grant", "2500000", "--uses", "2", url=url)
    assert done.returncode == 0, done.stderr
    code = done.stdout.strip()
    assert "2.500000 credits" in done.stderr
    for _ in range(2):
        r = sign_up(net.url, {"invite_code": code})
        assert r.status_code == 201 and r.json()["balance"] == 2_500_000
    assert_openai_error(sign_up(net.url, {"invite_code": code}), 403, "invalid_invite")
    assert_openai_error(sign_up(net.url, {"invite_code": "inv-nope"}), 403, "invalid_invite")


# --- API keys -------------------------------------------------------------------------


def keys_of(net: Network, headers: dict[str, str]) -> list[dict]:
    r = httpx.get(f"{net.url}/v1/account/keys", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    return body["data"]


def make_key(net: Network, headers: dict[str, str], name: str) -> httpx.Response:
    return httpx.post(f"{net.url}/v1/account/keys", headers=headers, json={"name": name})


def test_keys_made_listed_and_revoked(net: Network, pool_code: str):
    account_id, first = member(net, pool_code)
    [default] = keys_of(net, first)
    assert default["name"] == "default" and default["current"] is True
    assert default["object"] == "api_key" and len(default["id"]) == 16
    assert default["prefix"] == first["Authorization"].removeprefix("Bearer ")[:12]
    assert abs(default["created"] - time.time()) < 60

    r = make_key(net, first, "laptop")
    assert r.status_code == 201, r.text
    made = r.json()
    assert set(made) == {"object", "id", "name", "prefix", "created", "api_key"}
    assert made["name"] == "laptop" and made["api_key"].startswith(made["prefix"])
    laptop = bearer(made["api_key"])
    account = httpx.get(f"{net.url}/v1/account", headers=laptop).json()
    assert account["id"] == account_id and account["balance"] == GRANT
    assert grants(net.url, laptop) == [GRANT]  # a new key is no second grant

    listed = keys_of(net, laptop)
    assert [k["name"] for k in listed] == ["laptop", "default"]  # newest first
    assert [k["current"] for k in listed] == [True, False]
    assert listed[0]["id"] == made["id"] and "api_key" not in listed[0]

    r = httpx.delete(f"{net.url}/v1/account/keys/{made['id']}", headers=first)
    assert r.status_code == 200 and r.json() == {"object": "api_key", "id": made["id"],
                                                 "deleted": True}
    # It was used (and cached) a moment ago: it stops working at once all the same.
    assert_openai_error(httpx.get(f"{net.url}/v1/account", headers=laptop), 401,
                        "invalid_api_key")
    assert [k["id"] for k in keys_of(net, first)] == [default["id"]]
    again = httpx.delete(f"{net.url}/v1/account/keys/{made['id']}", headers=first)
    assert_openai_error(again, 404, "key_not_found")


def test_the_last_key_cannot_be_revoked(net: Network, pool_code: str):
    _, headers = member(net, pool_code)
    [only] = keys_of(net, headers)
    r = httpx.delete(f"{net.url}/v1/account/keys/{only['id']}", headers=headers)
    err = assert_openai_error(r, 400, "last_key")
    assert "another" in err["message"]
    assert httpx.get(f"{net.url}/v1/account", headers=headers).status_code == 200


def test_another_accounts_key_is_not_found(net: Network, pool_code: str):
    _, alice = member(net, pool_code)
    _, bob = member(net, pool_code)
    make_key(net, bob, "spare")
    bobs = [k["id"] for k in keys_of(net, bob)]
    for key_id in (*bobs, "0" * 16, "not-an-id"):
        r = httpx.delete(f"{net.url}/v1/account/keys/{key_id}", headers=alice)
        assert_openai_error(r, 404, "key_not_found")
    assert len(keys_of(net, bob)) == 2


def test_at_most_20_active_keys(net: Network, pool_code: str):
    _, headers = member(net, pool_code)
    for i in range(19):
        assert make_key(net, headers, f"k{i}").status_code == 201
    err = assert_openai_error(make_key(net, headers, "one too many"), 400, "too_many_keys")
    assert "20" in err["message"]
    spare = keys_of(net, headers)[0]["id"]
    assert httpx.delete(f"{net.url}/v1/account/keys/{spare}", headers=headers).status_code == 200
    assert make_key(net, headers, "room again").status_code == 201


@pytest.mark.parametrize("body,code", [
    ({}, "missing_required_parameter"),
    ({"name": ""}, "invalid_value"),
    ({"name": "x" * 65}, "invalid_value"),
    ({"name": 5}, "invalid_value"),
    ({"name": "   "}, "invalid_value"),
    ({"name": "a\u0000b"}, "invalid_value"),
    ({"name": "\u200b"}, "invalid_value"),  # zero-width space: shows as blank
    ({"name": "abc\u202egpj.exe"}, "invalid_value"),  # right-to-left override: misleads
    ({"name": "a\u2028b"}, "invalid_value"),
    ({"name": "ok", "scope": "all"}, "invalid_value"),
])
def test_a_malformed_key_body_is_400(net: Network, pool_code: str, body: dict, code: str):
    _, headers = member(net, pool_code)
    assert_openai_error(httpx.post(f"{net.url}/v1/account/keys", headers=headers, json=body),
                        400, code)
    assert len(keys_of(net, headers)) == 1


@pytest.mark.parametrize("method,path", [("GET", "/v1/account/keys"),
                                         ("POST", "/v1/account/keys"),
                                         ("DELETE", "/v1/account/keys/0123456789abcdef"),
                                         ("GET", "/v1/account/usage")])
def test_account_routes_need_a_key(net: Network, method: str, path: str):
    r = httpx.request(method, f"{net.url}{path}", json={"name": "x"} if method == "POST"
                      else None, headers={"Authorization": "Bearer sk-covey-wrong"})
    assert_openai_error(r, 401, "invalid_api_key")


# --- usage over time ------------------------------------------------------------------


def test_usage_per_day_and_model(net: Network, pool_code: str):
    account_id, headers = member(net, pool_code)
    r = httpx.post(f"{net.url}/v1/completions", headers=headers, timeout=30,
                   json={"model": "synthetic", "prompt": "Count:", "max_tokens": 5})
    assert r.status_code == 200, r.text
    now = time.time_ns() // 1000
    # Earlier days cannot be waited for: their rows go straight into the ledger's table.
    with sqlite3.connect(net.tmp / "coordinator" / "covey.db", timeout=30) as db:
        for i, (days_ago, model) in enumerate([(3, "m-b"), (3, "m-a"), (3, "m-a"),
                                               (40, "m-a")]):
            db.execute("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (f"old-{account_id}-{i}", account_id, "ab" * 32, model, 10, 20,
                        300, now - days_ago * DAY_US))
    for _ in range(50):  # the settlement lands just after the answer
        body = httpx.get(f"{net.url}/v1/account/usage", headers=headers).json()
        if body["data"] and body["data"][-1]["model"] == "synthetic":
            break
        time.sleep(0.05)
    assert body["object"] == "list" and body["unit"] == "µcr" and body["days"] == 30
    day = time.strftime("%Y-%m-%d", time.gmtime((now - 3 * DAY_US) / 1e6))
    assert body["data"][:2] == [
        {"date": day, "model": "m-a", "requests": 2, "prompt_tokens": 20,
         "completion_tokens": 40, "cost": 600},
        {"date": day, "model": "m-b", "requests": 1, "prompt_tokens": 10,
         "completion_tokens": 20, "cost": 300}]
    today = body["data"][2]
    assert len(body["data"]) == 3 and today["date"] == time.strftime("%Y-%m-%d", time.gmtime())
    by_model = httpx.get(f"{net.url}/v1/account", headers=headers).json()["usage"]
    assert {k: v for k, v in today.items() if k not in ("date", "model")} == \
        by_model["synthetic"]
    year = httpx.get(f"{net.url}/v1/account/usage?days=366", headers=headers).json()["data"]
    assert len(year) == 4 and year[0]["requests"] == 1
    one = httpx.get(f"{net.url}/v1/account/usage?days=1", headers=headers).json()["data"]
    assert [d["model"] for d in one] == ["synthetic"]
    for bad in ("0", "367", "x"):
        r = httpx.get(f"{net.url}/v1/account/usage?days={bad}", headers=headers)
        # param is "query.days", as for every query parameter (see /transactions' limit)
        assert assert_openai_error(r, 400, "invalid_value")["param"].endswith("days")


# --- the migration --------------------------------------------------------------------


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_ledger_from_before_keys_had_names_upgrades(tmp_path: Path, db: str):
    if db == "postgresql":
        with postgres_database() as url:
            _upgrade_from_0003(url)
    else:
        _upgrade_from_0003(f"sqlite:///{tmp_path}/old.db")


def _upgrade_from_0003(url: str) -> None:
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store.__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    old_key = "sk-covey-made-before-0004"
    with engine.begin() as conn:  # the old table has no name, no revoked_us
        conn.exec_driver_sql(
            "INSERT INTO api_keys (key_hash, account, prefix, created_us) VALUES "
            f"('{hash_key(old_key)}', 'cafe0123cafe0123', 'sk-covey-mad', 1)")
    engine.dispose()
    ledger = Ledger(url, SigningKey.generate())  # migrates to the head
    try:
        bank = Bank(ledger, BankPolicy())
        assert bank.authenticate(old_key) == "cafe0123cafe0123"
        [(_, info)] = list_keys(ledger.engine, "cafe0123cafe0123")
        assert info.name == "default" and info.created == 1e-6
        # Usage by day groups the same on this dialect (integer division of created_us).
        base = 20_000 * DAY_US
        with ledger.engine.begin() as conn:
            conn.execute(insert(usage), [
                {"job_id": f"j{i}", "account": "cafe0123cafe0123", "miner": "m", "model": "x",
                 "prompt_tokens": 1, "completion_tokens": 2, "cost": 3, "created_us": t}
                for i, t in enumerate([base, base + DAY_US - 1, base + DAY_US, base - 1])])
            conn.execute(insert(api_keys).values(key_hash="f" * 64, account="other",
                                                 prefix="sk-covey-xxx", created_us=2))
        days = bank.usage_by_day("cafe0123cafe0123", 2, now_us=base + DAY_US + 5)
        assert [(d["date"], d["requests"], d["cost"]) for d in days] == [
            ("2024-10-04", 2, 6), ("2024-10-05", 1, 3)]
    finally:
        ledger.close()


def test_covey_signup_takes_an_invite_code(net: Network):
    def signup(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "covey", "signup", "--url", net.url,
                               *args], capture_output=True, text=True, timeout=60)

    refused = signup()
    assert refused.returncode == 1 and "invite-only" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    joined = signup("--invite", new_code(net))
    assert joined.returncode == 0, joined.stderr
    key = joined.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-covey-")
    assert httpx.get(f"{net.url}/v1/account", headers=bearer(key)).json()["balance"] == GRANT


def test_a_revoked_key_stops_its_open_sealed_channel(net: Network, pool_code: str):
    """A browser's channel (the key in a subprotocol) accepted with a key that is then
    revoked: its next request is refused (401) and the channel closes (4401)."""
    _, headers = member(net, pool_code)
    spare = httpx.post(f"{net.url}/v1/account/keys", headers=headers, json={"name": "spare"})
    leaked, leaked_id = spare.json()["api_key"], spare.json()["id"]
    request = {"type": "request", "id": "r1", "model": "synthetic", "size": 10,
               "params": {"max_tokens": 4}}

    async def run() -> tuple[dict, int | None]:
        url = net.url.replace("http://", "ws://") + "/v1/sealed"
        async with websockets.connect(url, subprotocols=["covey-sealed.v1", f"bearer.{leaked}"]
                                      ) as ws:
            assert ws.subprotocol == "covey-sealed.v1"  # only the first is named back
            gone = httpx.delete(f"{net.url}/v1/account/keys/{leaked_id}", headers=headers)
            assert gone.status_code == 200
            await ws.send(json.dumps(request))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return reply, ws.close_code

    reply, close_code = asyncio.run(run())
    assert reply["type"] == "error" and reply["status"] == 401, reply
    assert close_code == 4401


def test_a_request_nested_too_deep_closes_the_sealed_channel_cleanly(net: Network,
                                                                     pool_code: str):
    _, headers = member(net, pool_code)

    async def run() -> int | None:
        url = net.url.replace("http://", "ws://") + "/v1/sealed"
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send("[" * 5000 + "]" * 5000)
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return ws.close_code

    assert asyncio.run(run()) == 4400  # a bad message, not a dropped connection


def test_a_key_in_a_browsers_subprotocol_never_reaches_a_log():
    import logging

    from covey.logs import redact_secrets

    key = "sk-covey-cWXt7PvNevGCf2A_DBpH33xr7LlSWh2JHJq0HcB39rA"
    record = logging.LogRecord("uvicorn.error", logging.DEBUG, __file__, 1,
                               "< %s: %s", ("sec-websocket-protocol",
                                            f"covey-sealed.v1, bearer.{key}"), None)
    assert redact_secrets(record)
    assert key not in record.getMessage() and "covey-sealed.v1" in record.getMessage()
