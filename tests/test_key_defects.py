"""Two defects a break test found (issue "More than one coordinator", part A): transfer
idempotency keys matched with LIKE (wildcards, and ASCII case on SQLite), and API keys sent
in a URL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from conftest import Network, ledger_verify, postgres_database
from test_errors import assert_openai_error


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Network]:
    """A coordinator with its access log on, on SQLite (whose LIKE ignores ASCII case) and on
    PostgreSQL."""
    tmp = tmp_path_factory.mktemp(f"keys-{request.param}")
    if request.param == "sqlite":
        n = Network(tmp, "--access-log", "--log-level", "debug")
        try:
            yield n
        finally:
            n.close()
        return
    with postgres_database() as url:
        n = Network(tmp, "--access-log", "--log-level", "debug", "--database-url", url)
        n.database_url = url  # type: ignore[attr-defined]
        try:
            yield n
        finally:
            n.close()


def _account(net: Network) -> tuple[str, dict[str, str]]:
    body = httpx.post(f"{net.url}/v1/accounts", timeout=10).json()
    return body["id"], {"Authorization": f"Bearer {body['api_key']}"}


def _send(net: Network, headers: dict[str, str], to: str, amount: int, key: str
          ) -> httpx.Response:
    return httpx.post(f"{net.url}/v1/account/transfers", headers=headers, timeout=10,
                      json={"to": to, "amount": amount, "idempotency_key": key})


@pytest.mark.parametrize("first,second", [("Case-1", "case-1"), ("ab", "a_"), ("abc", "a%")])
def test_an_exact_retry_is_never_a_conflict(net: Network, first: str, second: str):
    _, headers = _account(net)
    to, _ = _account(net)
    assert _send(net, headers, to, 1, first).json()["applied"] is True
    assert _send(net, headers, to, 2, second).json()["applied"] is True
    retry = _send(net, headers, to, 2, second)  # the same transfer again: a no-op, not 409
    assert retry.status_code == 200, retry.text
    assert retry.json()["applied"] is False
    # A key reused for another transfer is still a conflict.
    assert_openai_error(_send(net, headers, to, 3, second), 409, "idempotency_conflict")
    balance = httpx.get(f"{net.url}/v1/account", headers=headers).json()["balance"]
    assert balance == 10_000_000 - 3  # each distinct key moved its money once


@pytest.mark.parametrize("key", ["x\u0000y", "line\nbreak", "tab\there"])
def test_a_key_with_control_characters_is_refused(net: Network, key: str):
    """PostgreSQL's text holds no NUL and keys are shown back in histories: a clear 400,
    no money moved; a printable key of any script still works."""
    _, headers = _account(net)
    to, _ = _account(net)
    assert_openai_error(_send(net, headers, to, 1, key), 400, param="idempotency_key")
    assert httpx.get(f"{net.url}/v1/account", headers=headers).json()["balance"] == 10_000_000
    assert _send(net, headers, to, 1, "clé-ключ-鍵 1").json()["applied"] is True


def test_the_ledger_still_verifies(net: Network):
    url = getattr(net, "database_url", None)
    done = ledger_verify(net.tmp / "coordinator", url)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("query", ["api_key={key}", "key={key}", "access_token={key}",
                                   "anything={key}", "token=whatever",
                                   "limit=2;api_key=whatever"])
def test_a_key_in_the_url_is_refused_and_never_logged(net: Network, query: str):
    _, headers = _account(net)
    key = headers["Authorization"].removeprefix("Bearer ")
    r = httpx.get(f"{net.url}/v1/account?{query.format(key=key)}", headers=headers)
    assert_openai_error(r, 401, "api_key_in_url")
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    r = httpx.get(f"{net.url}/v1/models?{query.format(key=key)}")  # a public route too
    assert_openai_error(r, 401, "api_key_in_url")

    async def socket() -> int | None:
        url = net.url.replace("http://", "ws://") + f"/v1/sealed?{query.format(key=key)}"
        with contextlib.suppress(websockets.InvalidStatus, websockets.ConnectionClosed):
            async with websockets.connect(url, additional_headers=headers) as ws:
                await asyncio.wait_for(ws.recv(), 5)
        return 4401

    assert asyncio.run(socket()) == 4401
    # Neither the access log nor the debug log kept the key.
    assert key not in Path(net.coordinator.log).read_text()


def test_other_query_parameters_still_work(net: Network):
    _, headers = _account(net)
    r = httpx.get(f"{net.url}/v1/account/transactions?limit=2", headers=headers)
    assert r.status_code == 200 and len(r.json()["data"]) == 1  # the grant
