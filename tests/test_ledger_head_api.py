"""``GET /v1/ledger/head``: the chain head, signed by the coordinator's key in ``/healthz``;
and the batched read of many miners' earnings that ``GET /v1/miners`` lists."""

from __future__ import annotations

from pathlib import Path

import httpx
from nacl.signing import SigningKey

from conftest import Network
from covey.coordinator.ledger import Ledger, Transfer
from covey.coordinator.ledger.bank import Bank, BankPolicy, UsageRecord, miner
from covey.coordinator.ledger.chain import GENESIS, verify_head


def test_head_is_signed_by_the_coordinator_and_follows_the_ledger(bare_network: Network):
    url = bare_network.url
    coordinator = httpx.get(f"{url}/healthz", timeout=5).json()["coordinator"]
    head = httpx.get(f"{url}/v1/ledger/head", timeout=5).json()
    assert head == {"object": "ledger_head", "seq": 0, "hash": GENESIS,
                    "signature": head["signature"], "coordinator": coordinator}
    assert verify_head(coordinator, head["seq"], head["hash"], head["signature"])

    # A sign-up's grant is the first entry: the head moves to it, signed again.
    headers = bare_network.headers
    grant = httpx.get(f"{url}/v1/account/transactions", headers=headers, timeout=5
                      ).json()["data"]
    head = httpx.get(f"{url}/v1/ledger/head", timeout=5).json()
    assert [t["kind"] for t in grant] == ["grant"]
    assert (head["seq"], head["hash"]) == (grant[0]["seq"], grant[0]["hash"])
    assert verify_head(coordinator, head["seq"], head["hash"], head["signature"])
    # The signature covers both numbers and only this key's.
    assert not verify_head(coordinator, head["seq"] + 1, head["hash"], head["signature"])
    assert not verify_head(coordinator, head["seq"], GENESIS, head["signature"])
    other = SigningKey.generate().verify_key.encode().hex()
    assert not verify_head(other, head["seq"], head["hash"], head["signature"])


def test_earnings_of_many_miners_match_one_by_one(tmp_path: Path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", SigningKey.generate())
    try:
        bank = Bank(ledger, BankPolicy(grant=0, fee_bps=500))
        a, b, idle = "a" * 64, "b" * 64, "c" * 64
        ledger.post("mint", [Transfer("faucet", "user:u", 10_000_000, "grant")])
        for i, (m, tokens) in enumerate([(a, 10), (a, 7), (b, 3)]):
            bank.hold(f"job{i}", "u", 100_000)
            bank.settle(f"job{i}", "u", m, 40_000 + i,
                        UsageRecord("model", prompt_tokens=5, completion_tokens=tokens))
        ledger.post("fund", [Transfer("user:u", miner(b), 2_000_000, "transfer")])
        bank.stake(b, 1_500_000, "s1")
        got = bank.miners_earnings([a, b, idle, a])
        assert set(got) == {a, b, idle}
        for m in (a, b, idle):
            assert got[m] == bank.miner_earnings(m), m
            # ... and the accounts' own balances, read one by one
            assert got[m]["balance"] == ledger.balance(miner(m)), m
            assert got[m]["staked"] == bank.staked(m), m
        assert got[a]["jobs"] == 2 and got[a]["completion_tokens"] == 17
        assert got[b]["staked"] == 1_500_000
        assert got[idle] == {"jobs": 0, "completion_tokens": 0, "balance": 0, "staked": 0}
        assert bank.miners_earnings([]) == {}
    finally:
        ledger.close()
