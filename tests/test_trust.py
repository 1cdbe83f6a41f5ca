"""Trust hardening on a real network of the bundled model: the sleeper (real weights for its
trial, other weights afterwards) is caught by covert canary jobs, and a validator that frames
honest miners gets none of them slashed and loses reputation itself. The cheats are the
test-only adversaries (covey.miner.backends.adversary: ``sleeper``, ``frame``)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, Network, ledger_verify, metric
from covey.miner.backends.adversary import ENV, make_impostor
from covey.miner.models import bundled_path
from test_billing import sign_up
from test_verify import SLASH, STAKE, ask, checks_of, stake


@pytest.fixture(scope="module")
def impostor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_impostor(bundled_path(MODEL),
                         tmp_path_factory.mktemp("impostor") / "impostor.gguf")


def miner_ids(net: Network) -> list[str]:
    return [m["id"] for m in httpx.get(f"{net.url}/v1/miners", timeout=5).json()["data"]]


def test_the_sleeper_passes_its_trial_and_is_caught_by_a_canary(tmp_path: Path,
                                                                 impostor: Path):
    # No sampled re-checks at all: only canaries can catch it. One canary per user job
    # here so the test needs few jobs; bench/verify.py gives the jobs needed at 2.4%.
    net = Network(tmp_path, "--canary-rate", "1")
    try:
        headers = sign_up(net)
        net.add_miner("--ctx", "1024")
        [honest] = miner_ids(net)
        net.add_miner("--ctx", "1024", env={ENV: f"sleeper:{impostor}"})
        cheat = stake(net, 1, headers)
        assert checks_of(net, cheat) == []  # its trial passed: the trial prompts are public
        found: list[dict] = []
        deadline = time.monotonic() + 240
        i = 0
        while not found and time.monotonic() < deadline:
            ask(net, headers, i, 0.8)  # sampled user jobs, never re-checked here
            i += 1
            found = checks_of(net, cheat)
        assert found, f"the sleeper was not caught after {i} user jobs"
        check = found[-1]  # the first (newest first: a second canary may have failed too)
        assert check["kind"] == "canary" and check["verdict"]["passed"] is False
        assert "greedy tokens are not the model's choice" in check["verdict"]["reasons"][0]
        assert check["slashed"] == SLASH and check["validator"] == honest
        assert check["verdict"]["figures"]["alone"]  # no third miner to confirm it
        assert checks_of(net, honest) == []
        assert metric(net, 'covey_checks_total{kind="canary",result="failed"}') >= 1
        assert metric(net, 'covey_checks_total{kind="sampled"') == 0
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_framing_validator_gets_no_honest_miner_slashed_and_loses_reputation(
        tmp_path: Path):
    net = Network(tmp_path, "--check-rate", "1")  # every answer re-checked
    try:
        headers = sign_up(net)
        for _ in range(3):
            net.add_miner("--ctx", "1024")
        honest = [stake(net, i, headers) for i in range(3)]
        net.add_miner("--ctx", "1024", env={ENV: "frame"})
        framer = next(m for m in miner_ids(net) if m not in honest)
        deadline = time.monotonic() + 300
        with ThreadPoolExecutor(2) as pool:
            i = 0
            while time.monotonic() < deadline and (
                    metric(net, "covey_validator_dissents_total") < 2
                    or metric(net, 'covey_checks_total{kind="sampled",result="passed"}') < 6):
                list(pool.map(lambda j: ask(net, headers, j, j % 2 * 0.8), [i, i + 1]))
                i += 2
        unconfirmed = metric(net, 'covey_checks_total{kind="sampled",result="unconfirmed"}')
        print(f"{i} jobs; {unconfirmed:.0f} failed verdicts unconfirmed")
        assert unconfirmed >= 2
        assert metric(net, "covey_validator_dissents_total") >= 2
        for m in honest:  # framed, never punished
            assert checks_of(net, m) == []
            earnings = httpx.get(f"{net.url}/v1/miners/{m}/earnings", timeout=5).json()
            assert earnings["staked"] == STAKE
        miners = {m["id"]: m for m in httpx.get(f"{net.url}/v1/miners").json()["data"]}
        assert miners[framer]["reputation"] < min(miners[m]["reputation"] for m in honest)
        assert metric(net, "covey_slashed_ucr_total") == 0
        # Validators are paid for every check, whatever they reported.
        assert metric(net, "covey_validator_fees_ucr_total") > 0
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr
