"""Stake: miners below the minimum get no paid jobs; stake and unstake are signed by the
miner's key; unbonded stake returns after its period; all through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from conftest import Network, ledger_verify
from test_billing import account, sign_up
from test_errors import CHAT, assert_openai_error


def covey(*args: str, key: str | None = None) -> subprocess.CompletedProcess:
    env = {"COVEY_API_KEY": key} if key else {}
    return subprocess.run([sys.executable, "-m", "covey", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_minimum_stake_gates_paid_jobs(tmp_path):
    net = Network(tmp_path, "--min-stake", "1000000", "--unbonding", "1")
    try:
        net.add_miner("--ctx", "512")
        miner_id = httpx.get(f"{net.url}/v1/miners").json()["data"][0]["id"]
        key_file = str(tmp_path / "miner-0" / "miner.key")
        headers = sign_up(net)
        api_key = headers["Authorization"].removeprefix("Bearer ")
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=headers, json=CHAT)
        assert "minimum stake" in assert_openai_error(r, 503, "no_miner_available")["message"]

        # Staking more than the miner holds fails; fund it from a user account first.
        assert covey("wallet", "stake", "1.5", "--key", key_file, "--url", net.url
                     ).returncode == 1
        sent = covey("wallet", "transfer", f"miner:{miner_id}", "2", "--url", net.url,
                     key=api_key)
        assert sent.returncode == 0, sent.stderr
        staked = covey("wallet", "stake", "1.5", "--key", key_file, "--url", net.url)
        assert staked.returncode == 0, staked.stderr
        assert "staked 1.500000" in staked.stdout
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=headers, json=CHAT,
                       timeout=60)
        assert r.status_code == 200, r.text

        # Someone else's key cannot move this miner's stake.
        body = {"action": "unstake", "amount": 1, "op": "x", "ts": int(time.time()),
                "signature": "00" * 64}
        r = httpx.post(f"{net.url}/v1/miners/{miner_id}/stake", json=body)
        assert_openai_error(r, 401, "invalid_signature")

        assert covey("wallet", "unstake", "1.5", "--key", key_file, "--url", net.url
                     ).returncode == 0
        r = httpx.post(f"{net.url}/v1/chat/completions", headers=headers, json=CHAT)
        assert_openai_error(r, 503, "no_miner_available")
        time.sleep(1.2)  # the unbonding period passes; the next action releases it
        again = covey("wallet", "stake", "0.1", "--key", key_file, "--url", net.url)
        assert again.returncode == 0, again.stderr
        earned = httpx.get(f"{net.url}/v1/miners/{miner_id}/earnings").json()
        assert earned["staked"] == 100_000
        assert earned["balance"] >= 1_900_000  # 2 funded − 0.1 staked, plus its earnings
        assert account(net, headers)["held"] == 0
        check = ledger_verify(tmp_path / "coordinator")
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        net.close()
