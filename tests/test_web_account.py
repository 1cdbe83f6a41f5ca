"""The Account view (#/account), in a real headless Chromium against real coordinators on
loopback: sign up through the page and see the key once; make, list and revoke keys (the
last one refused with the API's message, the page's own key revoked with a warning); usage
per day as a chart and the transaction history page by page after real requests; and an
invite-only coordinator that refuses a sign-up without a code and accepts one made by
``covey invite create``. Screenshots go to /tmp/web-shots/ (account-*.png)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from conftest import MODEL, Network
from webui import assert_accessible, browser, page_of, shoot

KEY = "() => localStorage.getItem('covey.api_key')"


def open_account(page) -> None:
    page.evaluate("location.hash = '#/account'")
    page.wait_for_selector("#account-pane:not([hidden]) #account-title")


def key_rows(page) -> list[str]:
    """The listed keys' names, ``*`` after the one this browser uses."""
    return page.locator("#account-keys tbody tr[data-key]").evaluate_all(
        "rows => rows.map(r => r.dataset.name + (r.dataset.current === 'true' ? '*' : ''))")


def revoke(page, name: str) -> None:
    """Press Revoke on the key named ``name`` and confirm."""
    page.get_by_role("button", name=f"Revoke {name}", exact=True).click()
    page.locator("tr.acct-confirm button[data-confirm]").click()


def tx_seqs(page) -> list[int]:
    return [int(s) for s in page.locator("#account-tx tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.seq)")]


def refresh(page) -> None:
    before = page.get_attribute("#account-body", "data-ready")
    page.click("#account-refresh")
    page.wait_for_function(
        f"document.querySelector('#account-body').dataset.ready !== {before!r}")


def test_sign_up_keys_usage_and_transactions(network: Network):
    with browser() as b, page_of(b, network.url, signup=False) as page:
        open_account(page)
        page.wait_for_selector("#account-signup")
        assert page.inner_text("label[for=invite-code]") == "Invite code (optional)"
        shoot(page, "account-signed-out")
        assert_accessible(page, "account signed out")

        # Sign up: the key is shown once, with a warning, and kept in this browser.
        page.click("#account-signup")
        page.wait_for_selector("#account-new-key")
        key = page.input_value("#account-new-key")
        assert key.startswith("sk-covey-") and key == page.evaluate(KEY)
        assert "Shown once" in page.inner_text(".acct-reveal")
        page.click("#account-copy")
        page.wait_for_function(
            "document.querySelector('.acct-reveal [role=status]').textContent !== ''")
        assert page.inner_text("#account-balance") == "10.000000 credits"
        assert page.inner_text("#account-held") == "0.000000 credits"
        headers = {"Authorization": f"Bearer {key}"}
        me = httpx.get(f"{network.url}/v1/account", headers=headers, timeout=10).json()
        assert page.inner_text("#account-id") == me["id"]
        page.wait_for_selector("#account-keys tbody tr[data-key]")
        assert key_rows(page) == ["default*"]
        page.click("text=I saved it")
        assert page.locator("#account-new-key").count() == 0

        # A named key: shown once, listed, and it works.
        page.fill("#account-key-name", "laptop")
        page.click("#account-key-form button[type=submit]")
        page.wait_for_selector("#account-new-key-title:has-text('laptop')")
        laptop = page.input_value("#account-new-key")
        assert laptop.startswith("sk-covey-") and laptop != key
        assert sorted(key_rows(page)) == ["default*", "laptop"]
        assert page.evaluate(KEY) == key  # the page keeps its own key
        lap = {"Authorization": f"Bearer {laptop}"}
        assert httpx.get(f"{network.url}/v1/account", headers=lap).json()["id"] == me["id"]

        # Revoke it (after a confirm step): gone from the list, refused by the API.
        page.get_by_role("button", name="Revoke laptop", exact=True).click()
        confirm = page.locator("tr.acct-confirm")
        assert "Revoke “laptop”" in confirm.inner_text()
        assert "this browser uses" not in confirm.inner_text()
        confirm.get_by_role("button", name="Cancel").click()
        assert confirm.count() == 0 and len(key_rows(page)) == 2
        revoke(page, "laptop")
        page.wait_for_function("document.querySelectorAll('#account-keys tbody tr').length === 1")
        assert httpx.get(f"{network.url}/v1/account", headers=lap).status_code == 401

        # The last key: the page warns it is this browser's key, and the API refuses.
        page.get_by_role("button", name="Revoke default", exact=True).click()
        assert "this browser uses" in page.inner_text("tr.acct-confirm")
        shoot(page, "account-revoke")
        page.click("tr.acct-confirm button[data-confirm]")
        error = page.locator("#account-keys-error")
        error.wait_for()
        message = httpx.get(f"{network.url}/v1/account/keys", headers=headers).json()
        assert "last active API key" in error.inner_text()
        assert len(message["data"]) == 1 and page.evaluate(KEY) == key

        # A chat request and enough transfers for two pages of transactions.
        r = httpx.post(f"{network.url}/v1/chat/completions", headers=headers, timeout=120,
                       json={"model": MODEL, "max_tokens": 8,
                             "messages": [{"role": "user", "content": "Say hi."}]})
        assert r.status_code == 200, r.text
        other = httpx.get(f"{network.url}/v1/account", headers=network.headers).json()["id"]
        for i in range(25):
            t = httpx.post(f"{network.url}/v1/account/transfers", headers=headers, timeout=10,
                           json={"to": other, "amount": 1, "idempotency_key": f"t{i}"})
            assert t.status_code == 200, t.text
        refresh(page)

        # Usage: one stacked bar per day, a legend, a table for screen readers.
        page.wait_for_selector(f"#account-chart rect[data-model='{MODEL}']")
        chart = page.locator("#account-chart")
        assert chart.get_attribute("role") == "img"
        assert chart.get_attribute("aria-label").startswith("Cost per UTC day")
        assert MODEL in page.inner_text(".acct-legend")
        tip = page.locator(f"#account-chart rect[data-model='{MODEL}'] title").first
        assert MODEL in tip.text_content() and "1 request" in tip.text_content()
        usage = page.locator("#account-usage-table tbody tr")
        assert usage.count() == 1 and MODEL in usage.text_content()
        page.click("button[data-metric=tokens]")
        assert chart.get_attribute("aria-label").startswith("Tokens per UTC day")
        assert page.get_attribute("button[data-metric=tokens]", "aria-pressed") == "true"
        assert "tokens" in tip.text_content()

        # Transactions, newest first, 20 a page: older, then newer again.
        every = httpx.get(f"{network.url}/v1/account/transactions?limit=500",
                          headers=headers).json()["data"]
        assert len(every) > 20
        first = tx_seqs(page)
        assert first == [t["seq"] for t in every[:20]]
        assert page.is_disabled("#account-tx-newer")
        kinds = page.locator("#account-tx tbody td:nth-child(2)").all_inner_texts()
        assert "transfer" in kinds
        page.click("#account-tx-older")
        page.wait_for_selector("#account-tx-page:has-text('Page 2')")
        second = tx_seqs(page)
        assert second == [t["seq"] for t in every[20:40]]
        assert page.is_disabled("#account-tx-older") == (len(every) <= 40)
        page.click("#account-tx-newer")
        page.wait_for_selector("#account-tx-page:has-text('Page 1')")
        assert tx_seqs(page) == first

        page.click("button[data-metric=cost]")
        page.click("#account-usage-table >> xpath=ancestor::details/summary")
        shoot(page, "account")
        assert_accessible(page, "account")

        # Revoking the page's own key (another exists): a warning, then the page forgets it.
        page.fill("#account-key-name", "spare")
        page.click("#account-key-form button[type=submit]")
        page.wait_for_selector("#account-new-key-title:has-text('spare')")
        spare = page.input_value("#account-new-key")
        revoke(page, "default")
        notice = page.locator(".acct-notice")
        notice.wait_for()
        assert "removed from this page" in notice.inner_text()
        assert page.evaluate(KEY) is None
        page.wait_for_selector("#account-signup")
        assert page.inner_text("#account-info") == "no API key"
        assert httpx.get(f"{network.url}/v1/account", headers=headers).status_code == 401

        # Use the spare key through the view's own field: signed in again.
        page.fill("#account-key", spare)
        page.click("#account-use-title ~ form button[type=submit]")
        page.wait_for_selector("#account-balance")
        assert key_rows(page) == ["spare*"]


def test_invite_only_sign_up(tmp_path: Path):
    net = Network(tmp_path, "--invite-only")
    try:
        assert httpx.get(f"{net.url}/healthz").json()["invite_only"] is True
        with browser() as b, page_of(b, net.url, signup=False) as page:
            # The header's sign-up button leads to the Account view, which asks for a code.
            page.click("#signup")
            page.wait_for_selector("#account-pane:not([hidden]) #account-signup")
            assert page.inner_text("label[for=invite-code]") == "Invite code"
            assert "invite-only" in page.inner_text("#account-signup-form >> xpath=..")

            # A key the coordinator does not know, pasted in the header: the view says so.
            page.fill("#key", "sk-covey-not-a-key")
            page.click("#use-key")
            refusal = page.locator("#account-body [role=alert]:has-text('was refused')")
            refusal.wait_for()
            refusal.get_by_role("button", name="Forget this key").click()
            page.wait_for_selector("#account-signup")
            assert page.evaluate(KEY) is None and refusal.count() == 0

            # No code: refused with the API's message.
            page.click("#account-signup")
            error = page.locator("#account-signup-error")
            error.wait_for()
            refused = httpx.post(f"{net.url}/v1/accounts").json()["error"]
            assert refused["code"] == "invite_required"
            assert error.inner_text() == refused["message"]
            assert page.evaluate(KEY) is None
            shoot(page, "account-invite")
            assert_accessible(page, "account invite-only")

            # A wrong code: the API's message again.
            page.fill("#invite-code", "not-a-real-code")
            page.click("#account-signup")
            page.wait_for_function(
                f"document.querySelector('#account-signup-error').textContent !== "
                f"{refused['message']!r}")
            wrong = httpx.post(f"{net.url}/v1/accounts",
                               json={"invite_code": "not-a-real-code"}).json()["error"]
            assert wrong["code"] == "invalid_invite"
            assert error.inner_text() == wrong["message"]

            # A code made by the operator's CLI: accepted, with its grant.
            made = subprocess.run(
                [sys.executable, "-m", "covey", "invite", "create", "--grant", "2500000",
                 "--data-dir", str(tmp_path / "coordinator")],
                capture_output=True, text=True, timeout=60, check=True)
            code = made.stdout.strip()
            assert code
            page.fill("#invite-code", code)
            page.click("#account-signup")
            page.wait_for_selector("#account-new-key")
            key = page.input_value("#account-new-key")
            assert key == page.evaluate(KEY)
            page.wait_for_selector("#account-balance")
            assert page.inner_text("#account-balance") == "2.500000 credits"
            page.wait_for_selector("#account-usage-empty")
            assert "No transactions" not in page.inner_text("#account-tx-slot")  # the grant
            shoot(page, "account-new")
            assert_accessible(page, "account after sign-up")
    finally:
        net.close()
