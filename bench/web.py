"""The web app in Debian's Chromium against a real network on 127.0.0.1: time to the catalog's
first render, time to first token of a sealed browser chat against an unsealed one (the same
page, the same prompt, alternated), and page weight.

Targets (issue "The platform on the web"): catalog ≤ 300 ms; sealing adds ≤ 5 ms at p50.
Prints one JSON object. Run: ``.venv/bin/python bench/web.py [--runs 30]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from covey.miner.models import BUNDLED_MODEL  # noqa: E402
from network import start, stop  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
PROMPT = "Say hi."


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def catalog_ms(browser, url: str, runs: int) -> list[float]:
    """Milliseconds from navigation to the catalog on screen, each in a fresh context
    (empty cache, like a first visit)."""
    out = []
    for _ in range(runs):
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-catalog=ready]")
        out.append(page.evaluate("window.coveyCatalogMs"))
        context.close()
    return out


def weight(browser, url: str) -> dict[str, int]:
    """Bytes of every asset the page loads: for the catalog, and in all once the sealed chat
    has loaded libsodium."""
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    sizes: dict[str, int] = {}

    def record(response) -> None:
        if "/static/" in response.url or response.url.rstrip("/") == url:
            try:
                sizes[response.url] = len(response.body())
            except Exception:  # noqa: BLE001 - a response without a body (redirect)
                pass

    page.on("response", record)
    page.goto(url + "/")
    page.wait_for_selector("body[data-catalog=ready]")
    page.wait_for_load_state("networkidle")
    catalog = sum(sizes.values())
    page.evaluate("loadSodium()")
    page.wait_for_load_state("networkidle")
    context.close()
    return {"catalog_bytes": catalog, "all_bytes": sum(sizes.values()),
            "files": len(sizes)}


def ttfts(browser, url: str, runs: int) -> dict[str, list[float]]:
    """Time to first token (ms, Send to first text on screen) of ``runs`` sealed and
    ``runs`` unsealed chats of one short prompt, alternated on one page after two warm-up
    requests of each (the first sealed one loads libsodium and opens the WebSocket)."""
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("body[data-catalog=ready]")
    page.click("#signup")
    page.wait_for_function(
        "document.querySelector('#account-info').textContent.includes('credits')")
    page.click(f'#models button[data-model="{BUNDLED_MODEL}"]')
    page.click("#chat-settings summary")
    page.fill("#max-tokens", "4")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    out: dict[str, list[float]] = {"sealed": [], "unsealed": []}
    for i in range(2 + runs):
        # Alternate which goes first, so neither gains from the other's warm caches.
        for mode in ("sealed", "unsealed") if i % 2 else ("unsealed", "sealed"):
            page.click("#new-chat")  # the same one-turn prompt every time
            page.set_checked("#sealed-toggle", mode == "sealed")
            done = page.locator(".msg.assistant[data-done=true]").count()
            page.fill("#prompt", PROMPT)
            page.click("#send")
            page.wait_for_function(
                f"document.querySelectorAll('.msg.assistant[data-done=true]').length > {done}",
                timeout=60_000)
            last = page.evaluate("conversation.messages[conversation.messages.length - 1]")
            if last.get("error"):
                raise RuntimeError(last["error"])
            if i >= 2:
                out[mode].append(last["ttft_ms"])
    context.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        url, procs = start(Path(tmp), [BUNDLED_MODEL], [BUNDLED_MODEL], threads=1)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                try:
                    catalog = catalog_ms(browser, url, args.runs)
                    sizes = weight(browser, url)
                    chat = ttfts(browser, url, args.runs)
                finally:
                    browser.close()
        finally:
            stop(procs)
    sealed, plain = chat["sealed"], chat["unsealed"]
    print(json.dumps({
        "bench": "web", "runs": args.runs,
        "catalog_first_render_ms": {"p50": round(pct(catalog, 0.5), 1),
                                    "p95": round(pct(catalog, 0.95), 1)},
        "ttft_ms": {"sealed_p50": pct(sealed, 0.5), "unsealed_p50": pct(plain, 0.5),
                    "sealed_p95": pct(sealed, 0.95), "unsealed_p95": pct(plain, 0.95)},
        "sealing_adds_ms_p50": round(pct(sealed, 0.5) - pct(plain, 0.5), 1),
        "sealing_adds_ms_median_of_pairs": round(statistics.median(
            s - u for s, u in zip(sealed, plain, strict=True)), 1),
        **sizes,
    }))


if __name__ == "__main__":
    main()
