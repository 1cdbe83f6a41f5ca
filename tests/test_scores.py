"""Scoring through the network: a real coordinator and miner processes serving the bundled
breast-cancer models (trained at first use from scikit-learn's offline data), plain, proved
(ezkl) and encrypted (TenSEAL CKKS); bad input refused and unbilled; a miner that moves its
scores, and one that forges proofs, caught and slashed; an audit of the recorded traffic
that finds none of an encrypted row's values."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Network, ledger_verify, metric
from covey.miner.backends.adversary import ENV, HONEST_FIRST_ENV
from test_billing import account, sign_up
from test_verify import SLASH, checks_of, stake

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")
pytest.importorskip("ezkl")
pytest.importorskip("tenseal")

LR, MLP = "breast-cancer-lr", "breast-cancer-mlp"
ROW_PRICE, WORK_PRICE = 10, 2  # µcr per row and per ms of work: billing.KIND_PRICES


@pytest.fixture(scope="session")
def scoring_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bundled models, trained once into a temporary home, the MLP with a proof setup;
    miner processes find them through ``COVEY_SCORING_HOME``."""
    import os

    from covey.scoring.bundled import materialize
    from covey.scoring.proofs import prove_setup

    home = tmp_path_factory.mktemp("scoring")
    old = os.environ.get("COVEY_SCORING_HOME")
    os.environ["COVEY_SCORING_HOME"] = str(home)
    materialize(LR, home)
    mlp = materialize(MLP, home)
    prove_setup(mlp / "model.onnx", mlp / "proof")
    yield home
    if old is None:
        del os.environ["COVEY_SCORING_HOME"]
    else:
        os.environ["COVEY_SCORING_HOME"] = old


@pytest.fixture(scope="session")
def data() -> list[list[float]]:
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer().data.tolist()


def _predict(home: Path, name: str, rows: list[list[float]]) -> list[float]:
    from covey.scoring.model import ScoringModel

    return ScoringModel.load(home / name).predict(rows)


@contextlib.contextmanager
def scoring_network(tmp: Path, home: Path, *coordinator_args: str) -> Iterator[Network]:
    """A coordinator that checks the MLP's proofs (setup in ``home``) and one miner of both
    bundled models."""
    net = Network(tmp, "--proof-setup", f"{MLP}={home / MLP / 'proof'}", *coordinator_args)
    try:
        net.add_miner("--model", LR, "--model", MLP, wait=False)
        net.wait_miners(1, LR, timeout=120)
        net.wait_miners(1, MLP, timeout=120)
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def net(scoring_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    tmp = tmp_path_factory.mktemp("scores")
    with scoring_network(tmp, scoring_home, "--record-traffic", str(tmp / "traffic.log")) as net:
        yield net


def _score(net: Network, headers: dict[str, str], body: dict, timeout: float = 120
           ) -> httpx.Response:
    return httpx.post(f"{net.url}/v1/scores", headers=headers, json=body, timeout=timeout)


def test_models_list_their_cards(net):
    lr = httpx.get(f"{net.url}/v1/models/{LR}").json()
    assert lr["kind"] == "scoring" and lr["miners"] == 1
    card = lr["card"]
    assert len(card["features"]) == 30 and card["features"][0] == "mean radius"
    assert card["accuracy"] >= 0.9 and card["test_rows"] > 100
    assert "malignant" in card["output"]
    assert lr["encrypted"] is True and lr["proof"] is False
    assert lr["price"]["unit"] == "rows"
    mlp = httpx.get(f"{net.url}/v1/models/{MLP}").json()
    assert mlp["proof"] is True and len(mlp["proof_vk_sha256"]) == 64
    assert mlp["encrypted"] is False
    missing = httpx.get(f"{net.url}/v1/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_plain_scores_equal_onnxruntime_and_are_billed_per_row(net, scoring_home, data):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    rows = data[:5]
    for model in (LR, MLP):
        r = _score(net, headers, {"model": model, "inputs": rows})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "score" and body["usage"] == {"rows": 5, "work_ms": 0}
        got = [item["score"] for item in body["data"]]
        assert got == pytest.approx(_predict(scoring_home, model, rows), abs=1e-6)
    after = account(net, headers)
    assert before - after["balance"] == 2 * 5 * ROW_PRICE and after["held"] == 0


def test_a_proved_score_verifies_offline_and_bills_the_proving(net, scoring_home, data,
                                                               tmp_path):
    from covey.scoring.proofs import ProofError, verify_answer

    headers = sign_up(net)
    before = account(net, headers)["balance"]
    row = data[3]
    r = _score(net, headers, {"model": MLP, "inputs": [row], "proof": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["proof"]["verified"] is True
    work = body["usage"]["work_ms"]
    assert work > 0
    setup = scoring_home / MLP / "proof"
    proved = verify_answer(body, setup / "vk.key")
    assert proved[0] == pytest.approx(body["data"][0]["score"], abs=1e-9)
    # ezkl's fixed point: the proved score is the plain one to within its quantization
    assert proved[0] == pytest.approx(_predict(scoring_home, MLP, [row])[0], abs=0.05)
    assert before - account(net, headers)["balance"] == ROW_PRICE + WORK_PRICE * work

    saved = tmp_path / "answer.json"
    saved.write_text(json.dumps(body))
    ok = subprocess.run([sys.executable, "-m", "covey", "proofs", "verify", str(saved),
                         "--vk", str(setup / "vk.key")], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    other = dict(body, data=[dict(body["data"][0], input=data[4])])  # another row's proof?
    with pytest.raises(ProofError):
        verify_answer(other, setup / "vk.key")
    saved.write_text(json.dumps(other))
    bad = subprocess.run([sys.executable, "-m", "covey", "proofs", "verify", str(saved),
                          "--vk", str(setup / "vk.key")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr


def test_an_encrypted_score_decrypts_to_the_plain_one(net, scoring_home, data, tmp_path):
    from covey.client.scores import score_encrypted
    from covey.scoring.he import ERROR_BOUND, ClientKeys

    headers = sign_up(net)
    api_key = headers["Authorization"].removeprefix("Bearer ")
    before = account(net, headers)["balance"]
    keys = ClientKeys.generate()
    plain = _predict(scoring_home, LR, data[:3])
    for i in range(3):
        value, answer = score_encrypted(net.url, LR, data[i], keys, api_key=api_key)
        assert abs(value - plain[i]) <= ERROR_BOUND
        assert "score" not in answer["data"][0]
    # registered once: the coordinator knows the keys by their digest
    known = httpx.get(f"{net.url}/v1/scores/keys/{keys.keys_sha256}", headers=headers)
    assert known.status_code == 200 and known.json()["bytes"] == len(keys.public)
    spent = before - account(net, headers)["balance"]
    assert spent >= 3 * ROW_PRICE and account(net, headers)["held"] == 0


def test_the_traffic_holds_no_value_of_an_encrypted_row(net, scoring_home, data):
    from covey.cli_audit import find_traces
    from covey.client.scores import score_encrypted
    from covey.scoring.he import ClientKeys

    # Values no other test sends, inside the features' ranges.
    row = [round(x * 1.0137, 5) + 0.000013 for x in data[7]]
    words = [repr(x) for x in row[:10]]
    api_key = net.api_key
    keys = ClientKeys.generate()
    score_encrypted(net.url, LR, row, keys, api_key=api_key)
    traffic = net.tmp / "traffic.log"
    coordinator = net.tmp / "coordinator"
    assert find_traces(words, coordinator, logs=[traffic]) == {}
    # positive control: the same row sent plain is found
    r = _score(net, net.headers, {"model": LR, "inputs": [row]})
    assert r.status_code == 200, r.text
    found = find_traces(words, coordinator, logs=[traffic])
    assert {word for word, _ in found} == set(words)


def _ciphertext_of_other_params(row: list[float]) -> str:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 4096, -1, [40, 20, 40])
    ctx.global_scale = 2**20
    return base64.b64encode(ts.ckks_vector(ctx, row).serialize()).decode()


@pytest.mark.parametrize(("case", "param"), [
    ("too_few_features", "inputs"),
    ("nan", "inputs"),
    ("string", "inputs"),
    ("no_rows", "inputs"),
    ("both", "inputs"),
    ("proof_without_setup", "proof"),
    ("proof_out_of_range", "inputs"),
    ("unknown_keys", "keys_sha256"),
    ("other_params", "encrypted"),
    ("encrypted_on_mlp", "encrypted"),
])
def test_bad_scoring_requests_cost_nothing(net, data, case, param):
    from covey.client.scores import register_keys
    from covey.scoring.he import ClientKeys

    headers = sign_up(net)
    before = account(net, headers)["balance"]
    row = data[0]
    body: dict[str, object] = {"model": LR, "inputs": [row]}
    if case == "too_few_features":
        body["inputs"] = [row[:29]]
    elif case == "nan":
        content = json.dumps({"model": LR, "inputs": [[float("nan"), *row[1:]]]})
        r = httpx.post(f"{net.url}/v1/scores", content=content, timeout=30,
                       headers={**headers, "Content-Type": "application/json"})
    elif case == "string":
        body["inputs"] = [["17.99", *row[1:]]]
    elif case == "no_rows":
        body["inputs"] = []
    elif case == "both":
        body["encrypted"] = {"ciphertext": "AAAA", "keys_sha256": "0" * 64}
    elif case == "proof_without_setup":
        body["proof"] = True
    elif case == "proof_out_of_range":
        body = {"model": MLP, "inputs": [[1e6, *row[1:]]], "proof": True}
    elif case == "unknown_keys":
        body = {"model": LR, "encrypted": {"ciphertext": "AAAA", "keys_sha256": "a" * 64}}
    elif case in ("other_params", "encrypted_on_mlp"):
        keys = ClientKeys.generate()
        with httpx.Client(base_url=net.url, timeout=60) as http:
            sha = register_keys(http, keys, headers["Authorization"].removeprefix("Bearer "))
        ciphertext = (_ciphertext_of_other_params(row) if case == "other_params"
                      else base64.b64encode(keys.encrypt(row)).decode())
        body = {"model": LR if case == "other_params" else MLP,
                "encrypted": {"ciphertext": ciphertext, "keys_sha256": sha}}
    if case != "nan":
        r = _score(net, headers, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param or error["param"].startswith(param + "["), error
    assert error["message"]
    assert account(net, headers)["balance"] == before
    assert account(net, headers)["held"] == 0
    assert httpx.get(f"{net.url}/healthz").status_code == 200


def test_junk_evaluation_keys_are_refused(net):
    r = httpx.post(f"{net.url}/v1/scores/keys", headers={
        **net.headers, "Content-Type": "application/octet-stream"}, content=b"not keys" * 10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "keys"


def _caught(net: Network, cheat: str, headers: dict[str, str], body: dict, tries: int = 8
            ) -> list[dict]:
    found: list[dict] = []
    for _ in range(tries):
        r = _score(net, headers, body)
        assert r.status_code in (200, 502), r.text
        deadline = time.monotonic() + 10
        while not found and time.monotonic() < deadline:
            found = checks_of(net, cheat)
            time.sleep(0.2)
        if found:
            break
    return found


@pytest.mark.parametrize("behaviour", ["wrong-score", "false-proof"])
def test_a_cheating_scoring_miner_is_caught_and_slashed(scoring_home, data, tmp_path,
                                                        behaviour):
    setup = scoring_home / MLP / "proof"
    net = Network(tmp_path, "--check-rate", "1", "--proof-setup", f"{MLP}={setup}")
    try:
        headers = sign_up(net)
        net.add_miner("--model", MLP, wait=False)
        net.wait_miners(1, MLP, timeout=120)
        honest = httpx.get(f"{net.url}/v1/miners").json()["data"][0]["id"]
        net.add_miner("--model", MLP, wait=False, env={ENV: behaviour, HONEST_FIRST_ENV: "1"})
        net.wait_miners(2, MLP, timeout=120)
        cheat = stake(net, 1, headers)
        proof = behaviour == "false-proof"
        found = _caught(net, cheat, headers, {"model": MLP, "inputs": [data[1]],
                                              "proof": proof})
        assert found, f"{behaviour} was not caught"
        check = found[0]
        assert check["verdict"]["passed"] is False and check["slashed"] == SLASH
        if proof:
            assert check["kind"] == "proof" and "false proof" in check["verdict"]["reasons"][0]
        else:
            assert check["kind"] == "sampled" and check["validator"] == honest
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_an_encrypted_answer_is_rechecked_byte_for_byte(scoring_home, data, tmp_path):
    """At check rate 1 every encrypted answer is re-run by the other miner, which gets the
    same ciphertext (and the keys, on its first check) and must return the same bytes."""
    from covey.client.scores import score_encrypted
    from covey.scoring.he import ClientKeys

    net = Network(tmp_path, "--check-rate", "1")
    try:
        net.add_miner("--model", LR, wait=False)
        net.wait_miners(1, LR, timeout=120)
        net.add_miner("--model", LR, wait=False)
        net.wait_miners(2, LR, timeout=120)
        keys = ClientKeys.generate()
        for i in range(3):
            score_encrypted(net.url, LR, data[i], keys, api_key=net.api_key)
        passed = 'covey_checks_total{kind="sampled",result="passed"}'
        deadline = time.monotonic() + 30
        while metric(net, passed) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metric(net, passed) >= 3
        assert metric(net, 'covey_checks_total{kind="sampled",result="failed"}') == 0
    finally:
        net.close()


@pytest.mark.parametrize(("model", "value"), [(LR, 1e39), (MLP, 3e38)])
def test_values_that_overflow_float32_are_the_requests_fault(net, data, model, value):
    """1e39 is past float32 (refused before routing); 3e38 fits, but the MLP's layers
    overflow to NaN: the miner refuses the row, and nobody counts it against the miner."""
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    miners = httpx.get(f"{net.url}/v1/miners").json()["data"]
    r = _score(net, headers, {"model": model, "inputs": [data[0], [value] * 30]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("inputs[1]")
    assert account(net, headers)["balance"] == before
    after = httpx.get(f"{net.url}/v1/miners").json()["data"]
    assert [m["id"] for m in after] == [m["id"] for m in miners]  # still connected
    assert _score(net, headers, {"model": model, "inputs": [data[0]]}).status_code == 200


def test_evaluation_keys_belong_to_an_account_which_keeps_a_few(net, data):
    from covey.client.scores import register_keys, score_encrypted
    from covey.coordinator.he_keys import KEY_SETS_PER_ACCOUNT
    from covey.scoring.he import ClientKeys
    from covey.scoring.model import InputError

    mine = sign_up(net)
    key = mine["Authorization"].removeprefix("Bearer ")
    sets = [ClientKeys.generate() for _ in range(KEY_SETS_PER_ACCOUNT + 1)]
    with httpx.Client(base_url=net.url, timeout=60) as http:
        for keys in sets:
            register_keys(http, keys, key)
            time.sleep(0.01)  # distinct modification times
    known = [httpx.get(f"{net.url}/v1/scores/keys/{k.keys_sha256}", headers=mine).status_code
             for k in sets]
    assert known == [404] + [200] * KEY_SETS_PER_ACCOUNT  # the oldest was dropped
    # another account cannot name my keys
    theirs = sign_up(net)
    row = base64.b64encode(sets[-1].encrypt(data[0])).decode()
    r = _score(net, theirs, {"model": LR, "encrypted": {"ciphertext": row,
                                                        "keys_sha256": sets[-1].keys_sha256}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "keys_sha256"
    # a row outside the card's ranges is refused before it is encrypted: past them the
    # logit could leave what the ciphertext holds, and no one else can see the row
    with pytest.raises(InputError, match="range an encrypted row can take"):
        score_encrypted(net.url, LR, [1e6] * 30, sets[-1], api_key=key)
