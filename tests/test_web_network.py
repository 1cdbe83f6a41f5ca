"""The network's views in a real Chromium, used by clicking as a person would: the miners
(earnings, stake, failed checks with their evidence, how to join) and the explorer (a
request's receipt and the ledger head, both signatures checked in the page; a tampered
receipt refused). Screenshots in /tmp/web-shots/miners-*.png and explorer-*.png."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from nacl.signing import SigningKey

from conftest import MODEL, Network
from covey.coordinator.app import default_database_url
from covey.coordinator.ledger import Ledger
from covey.coordinator.ledger.bank import Bank, BankPolicy
from covey.coordinator.ledger.penalties import Evidence, penalize
from covey.protocol import sign_action
from covey.protocol.identity import load_or_create
from covey.protocol.receipts import Receipt, countersign, sign_receipt
from covey.protocol.signing import canonical_json
from webui import assert_accessible, browser, page_of, shoot


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A network of its own (the test slashes a miner and moves credits): a coordinator and
    two miners of the bundled model."""
    n = Network(tmp_path_factory.mktemp("webnet"))
    try:
        n.add_miner("--ctx", "1024", wait=False)
        n.add_miner("--ctx", "1024", wait=False)
        n.wait_miners(2)
        yield n
    finally:
        n.close()


def chat(net: Network, key: str, text: str = "Say hello.") -> str:
    """A short paid chat request with ``key``; its id once its receipt is stored."""
    headers = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{net.url}/v1/chat/completions", headers=headers, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": text}],
        "max_tokens": 8, "temperature": 0})
    r.raise_for_status()
    job = r.json()["id"]
    deadline = time.monotonic() + 10
    while httpx.get(f"{net.url}/v1/receipts/{job}", headers=headers,
                    timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "no receipt"
        time.sleep(0.1)
    return job


def miner_keys(net: Network) -> dict[str, SigningKey]:
    keys = [load_or_create(net.tmp / f"miner-{i}" / "miner.key") for i in range(2)]
    return {k.verify_key.encode().hex(): k for k in keys}


def stake(net: Network, key: SigningKey, amount: int) -> None:
    miner_id = key.verify_key.encode().hex()
    body: dict[str, object] = {"action": "stake", "amount": amount, "op": "web-test",
                               "ts": int(time.time())}
    body["signature"] = sign_action(key, {**body, "miner": miner_id})
    httpx.post(f"{net.url}/v1/miners/{miner_id}/stake", json=body, timeout=10
               ).raise_for_status()


def failed_check(net: Network, job: str, account: str, miner_id: str, validator: str) -> None:
    """Record a failed sampled check of ``job`` as the verifier does (same ledger call, from
    this process, on the coordinator's database): evidence kept, stake slashed."""
    data = net.tmp / "coordinator"
    ledger = Ledger(default_database_url(data), load_or_create(data / "coordinator.key"))
    try:
        verdict = {"passed": False,
                   "reasons": ["3 of 8 greedy tokens are not the model's first choice"],
                   "figures": {"tokens": 8, "wrong_positions": [1, 4, 6], "z": -3.25}}
        penalize(Bank(ledger, BankPolicy()), Evidence(
            "chk-webtest", "sampled", job, miner_id, "ab" * 32, verdict, account, validator),
            slash_bps=1000, validator_bps=5000)
    finally:
        ledger.close()


VALID = ("document.querySelector('#receipt-verdict') && document.querySelector("
         "'#receipt-verdict').textContent.startsWith('Receipt valid')")


def credits(ucr: int) -> str:
    return f"{ucr / 1e6:.6f}"


def test_canonical_json_and_signatures_match_python(net: Network):
    """The page's canonical JSON is Python's, byte for byte, on tricky input; a receipt
    signed in Python verifies in the page and fails once changed."""
    values = [
        {"b": 1, "a": [1, 2.0, -0.0, 1e16, 1e15, 0.0001, 1e-05, 0.1, 5e-324, 1.5e300],
         "big": 123456789012345678901234567890, "neg": -9007199254740993},
        {"é": "ünïcødé ☃ 😀 \u2028\u2029 \x7f", "\U0001f600": 1, "\uff01": 2, "Z": 3,
         "": 4, "__proto__": {"x": None}, "t": True, "f": False},
        {"q": 'quotes " and \\ / slash', "ctl": "".join(chr(i) for i in range(32))},
        {"nested": {"b": {"d": [], "c": {}}, "a": [[], [{}], "x"]}},
    ]
    texts = [json.dumps(v, ensure_ascii=ascii_, indent=indent)
             for v in values for ascii_, indent in [(True, None), (False, 2)]]
    with browser() as b, page_of(b, net.url, signup=False) as page:
        got = page.evaluate("(ts) => ts.map((t) => canonicalJson(parseExactJson(t)))", texts)
        assert got == [canonical_json(json.loads(t)).decode() for t in texts]
        # SHA-256 in the page (libsodium's) against hashlib, across the padding's edges.
        blobs = bytes(range(256)) * 4
        lengths = [0, 1, 55, 56, 63, 64, 65, 119, 120, 1000]
        got = page.evaluate("""async ([hex, ns]) => (await loadSodium(), ns).map((n) => Array.from(
            sha256(Uint8Array.from(hex.slice(0, 2 * n).match(/../g) || [], (x) => parseInt(x, 16))),
            (b) => b.toString(16).padStart(2, "0")).join(""))""", [blobs.hex(), lengths])
        assert got == [hashlib.sha256(blobs[:n]).hexdigest() for n in lengths]
        for bad in ['{"a":1,}', "[1 2]", "01", "NaN", '"\x01"', ""]:
            assert page.evaluate("(t) => { try { parseExactJson(t); return true } "
                                 "catch (e) { return false } }", bad) is False, bad

        miner, coordinator = SigningKey.generate(), SigningKey.generate()
        receipt = Receipt(job_id='chatcmpl-ü "q" \\ \n\t😀\u2028', miner=miner.verify_key
                          .encode().hex(), model_sha256="a" * 64, request_sha256="b" * 64,
                          output_sha256="c" * 64, prompt_tokens=12, completion_tokens=2**40)
        sig = sign_receipt(miner, receipt)
        answer = {"object": "receipt", "receipt": receipt.model_dump(), "miner_signature": sig,
                  "coordinator": coordinator.verify_key.encode().hex(),
                  "coordinator_signature": countersign(coordinator, receipt, sig)}
        check = """async ([text, pinned]) => (await checkReceipt(parseExactJson(text), pinned))
                   .map((c) => c.ok)"""
        pinned = answer["coordinator"]
        assert page.evaluate(check, [json.dumps(answer), pinned]) == [True, True, True]
        assert page.evaluate(check, [json.dumps(answer, ensure_ascii=False, indent=4),
                                     pinned]) == [True, True, True]
        tampered = json.loads(json.dumps(answer))
        tampered["receipt"]["completion_tokens"] += 1
        assert page.evaluate(check, [json.dumps(tampered), pinned]) == [False, False, True]
        other = SigningKey.generate().verify_key.encode().hex()
        assert page.evaluate(check, [json.dumps(answer), other]) == [True, True, False]


def test_miners_and_explorer_by_clicking(net: Network):
    with browser() as b, page_of(b, net.url) as page:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"],
                                       origin=net.url)
        key = page.evaluate("localStorage.getItem('covey.api_key')")
        headers = {"Authorization": f"Bearer {key}"}
        account = httpx.get(f"{net.url}/v1/account", headers=headers, timeout=5).json()["id"]
        job = chat(net, key)
        served = httpx.get(f"{net.url}/v1/receipts/{job}", headers=headers,
                           timeout=5).json()["receipt"]["miner"]
        keys = miner_keys(net)
        other = next(m for m in keys if m != served)
        # Fund the serving miner, stake 1 credit, then fail a check on its job: the page
        # must show the ledger's figures and the evidence.
        httpx.post(f"{net.url}/v1/account/transfers", headers=headers, timeout=10, json={
            "to": f"miner:{served}", "amount": 2_000_000, "idempotency_key": "fund"}
        ).raise_for_status()
        stake(net, keys[served], 1_000_000)
        failed_check(net, job, account, served, other)
        earned = httpx.get(f"{net.url}/v1/miners/{served}/earnings", timeout=5).json()
        assert earned["staked"] == 900_000  # 10% slashed

        # ---- miners ----
        page.click("nav a[data-nav=miners]")
        page.wait_for_selector("#miners-title")
        rows = page.locator("#miners-table tbody.miner")
        rows.nth(1).wait_for()
        assert rows.count() == 2
        assert "2 miners" in page.inner_text("#miners-summary")
        mine = page.locator(f'tbody.miner[data-miner="{served}"]')
        row = mine.locator("tr.miner-row")
        assert served[:12] in row.inner_text()
        assert f"{credits(earned['balance'])} credits" in row.locator("[data-label=Earnings]"
                                                                       ).inner_text()
        assert "1 paid job" in row.locator("[data-label=Earnings]").inner_text()
        assert "0.900000 credits" in row.locator("[data-label=Stake]").inner_text()
        rep = float(row.locator("[data-label=Reputation]").inner_text())
        listed = {m["id"]: m for m in httpx.get(f"{net.url}/v1/miners").json()["data"]}
        assert rep == round(listed[served]["reputation"], 2)
        assert "CPU" in row.locator("[data-label=Hardware]").inner_text()
        assert MODEL in row.locator("[data-label=Models]").inner_text()

        # The failed check, with its evidence; the other miner has none.
        mine.locator("summary").click()
        check = mine.locator(".check-items > li")
        check.wait_for()
        text = check.inner_text()
        assert "Sampled re-check" in text and job in text
        assert "3 of 8 greedy tokens are not the model's first choice" in text
        assert "slashed 0.100000" in text and other[:12] in text
        assert "wrong_positions" in text
        theirs = page.locator(f'tbody.miner[data-miner="{other}"]')
        theirs.locator("summary").click()
        theirs.locator(".no-checks").wait_for()
        assert "No failed checks." in theirs.inner_text()

        # A refresh (every 5 s) updates the figures but leaves focus and open checks alone.
        mine.locator("summary").focus()
        served_before = listed[served]["completed"] + listed[other]["completed"]
        chat(net, key, "Name a colour.")
        page.wait_for_function(
            """(n) => [...document.querySelectorAll('[data-label=Jobs] .line:first-child')]
                      .reduce((s, e) => s + parseInt(e.textContent), 0) > n""",
            arg=served_before, timeout=15_000)
        assert page.evaluate("document.activeElement.closest('tbody').dataset.miner") == served
        assert mine.locator("details").get_attribute("open") is not None

        # Become a miner: this page's origin, copied as shown.
        command = page.inner_text("#miner-command")
        assert command == f"covey miner --coordinator {net.url}"
        assert net.url in page.inner_text("#stake-command")
        page.click("#join .cmd:has(#miner-command) button.copy")
        page.wait_for_function("document.querySelector('#join').innerText.includes('copied')")
        assert page.evaluate("navigator.clipboard.readText()") == command
        shoot(page, "miners")
        assert_accessible(page, "miners")

        # From the evidence to its receipt, checked in the explorer.
        page.evaluate("window.scrollTo(0, 0)")
        mine.get_by_role("button", name="Check the job's signed receipt").click()
        page.wait_for_selector("#explorer-title")
        page.wait_for_function(VALID)

        # ---- explorer: look a request up by its id ----
        page.fill("#receipt-id", job)
        page.click("#receipt-lookup")
        page.wait_for_function(
            f"document.querySelector('#result-title').textContent.includes({json.dumps(job)})")
        page.wait_for_function(VALID)
        assert page.evaluate("location.hash") == f"#/explorer/{job}"
        checks = page.inner_text("#receipt-checks")
        assert "Miner signature valid ✓" in checks
        assert "Coordinator signature valid ✓" in checks
        assert "Countersigned by this coordinator ✓" in checks
        assert page.inner_text("#receipt-verdict").startswith("Receipt valid")
        assert served in page.inner_text("#receipt-fields")
        page.wait_for_function(
            "document.querySelector('#head-verdict').textContent.includes('valid')")
        assert page.inner_text("#head-verdict").startswith("Head signature valid ✓")
        head = httpx.get(f"{net.url}/v1/ledger/head", timeout=5).json()
        assert head["coordinator"] in page.inner_text("#head-fields")
        shoot(page, "explorer")
        assert_accessible(page, "explorer")

        # Tampered: one more completion token in the JSON, and both signatures break.
        pasted = page.input_value("#receipt-json")
        n = json.loads(pasted)["receipt"]["completion_tokens"]
        page.fill("#receipt-json", pasted.replace(f'"completion_tokens": {n}',
                                                  f'"completion_tokens": {n + 1}'))
        page.click("#receipt-verify")
        page.wait_for_function(
            "document.querySelector('#result-title').textContent === 'Pasted receipt'")
        page.wait_for_function(
            "document.querySelector('#receipt-verdict').textContent.includes('invalid')")
        checks = page.inner_text("#receipt-checks")
        assert "Miner signature invalid ✗" in checks
        assert "Coordinator signature invalid ✗" in checks
        # Only the countersignature changed: the miner's still holds.
        answer = json.loads(pasted)
        answer["coordinator_signature"] = "00" * 64
        page.fill("#receipt-json", json.dumps(answer))
        page.click("#receipt-verify")
        page.wait_for_function("document.querySelector('#receipt-checks').textContent"
                               ".includes('Miner signature valid')")
        assert "Coordinator signature invalid ✗" in page.inner_text("#receipt-checks")
        assert page.inner_text("#receipt-verdict") == "Receipt invalid."
        page.fill("#receipt-json", "{not json")
        page.click("#receipt-verify")
        page.wait_for_function(
            "document.querySelector('#receipt-verdict').textContent.includes('Not JSON')")

        # Opening #/explorer/<id> directly (a bookmark, a shared link) looks it up.
        page.goto(f"{net.url}/#/explorer/{job}")
        page.reload()
        page.wait_for_function(VALID)
        assert page.input_value("#receipt-id") == job
