"""The first page, in a real headless Chromium: pick the model, chat, see the answer stream."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import MODEL, Network

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("COVEY_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    return sync_playwright


def test_page_lists_models_and_streams_a_chat(network: Network):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The page's CSP forbids the eval that wait_for_function uses.
            page = browser.new_page(bypass_csp=True)
            page.goto(network.url + "/")
            button = page.locator(f'#models button[data-model="{MODEL}"]')
            button.wait_for()
            assert "2 miners" in button.inner_text()
            page.click("#signup")
            page.wait_for_function(
                "document.querySelector('#account-info').textContent.includes('credits')"
            )
            assert "10.000000 credits" in page.inner_text("#account-info")
            button.click()
            page.fill("#prompt", "What is the capital of France?")
            page.click("#send")
            answer = page.locator(".msg.assistant[data-done=true]")
            answer.wait_for(timeout=60_000)
            assert answer.inner_text().strip()
            assert "error" not in (answer.get_attribute("class") or "")
            assert "completion tokens" in page.inner_text("#usage")
            # The charge shows at once: the balance dropped below the grant.
            page.wait_for_function(
                "!document.querySelector('#account-info').textContent.includes('10.000000')"
            )
        finally:
            browser.close()
