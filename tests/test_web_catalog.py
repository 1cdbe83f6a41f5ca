"""The catalog (``GET /v1/models`` and the page at ``/``): every model with its kind, status
(up, on trial, no miner), miners, context, price and measured speed; filtered by kind; opened
with the keyboard."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import MODEL, Network
from covey.miner.models import BUNDLED_EMBEDDING_MODEL as EMBEDDER
from webui import assert_accessible, browser, page_of, shoot

pytest.importorskip("sentence_transformers")


def _cards(net: Network) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{net.url}/v1/models", timeout=5).json()["data"]}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A coordinator that holds new miners for a trial, a chat miner and an embedding miner;
    ``net.seen`` is every status the chat model showed while they joined."""
    net = Network(tmp_path_factory.mktemp("catalog"))
    try:
        seen = [_cards(net)[MODEL]["status"]]  # in the catalog before any miner
        net.add_miner("--ctx", "1024", wait=False)
        net.add_miner("--model", EMBEDDER, wait=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            cards = _cards(net)
            if cards[MODEL]["status"] != seen[-1]:
                seen.append(cards[MODEL]["status"])
            if cards[MODEL]["status"] == "up" and cards.get(EMBEDDER, {}).get("status") == "up":
                break
            time.sleep(0.02)
        net.seen = seen  # type: ignore[attr-defined]
        yield net
    finally:
        net.close()


def test_models_carry_status_price_and_speed(net):
    assert net.seen[0] == "offline" and net.seen[-1] == "up", net.seen
    chat = _cards(net)[MODEL]
    assert chat["kind"] == "chat" and chat["miners"] == 1 and chat["miners_on_trial"] == 0
    assert chat["price"]["unit"] == "tokens" and chat["price"]["per"] == 1_000_000
    assert chat["price"]["prompt"] > 0 and chat["price"]["completion"] > 0
    assert chat["ttft_s"] is None and chat["decode_tps"] is None  # nothing served yet
    _chat(net)
    chat = _cards(net)[MODEL]
    assert 0 < chat["ttft_s"] < 30 and chat["decode_tps"] > 0
    embed = _cards(net)[EMBEDDER]
    assert embed["kind"] == "embedding" and embed["price"]["unit"] == "tokens"


def _chat(net: Network) -> None:
    r = httpx.post(f"{net.url}/v1/chat/completions", headers=net.headers, timeout=60,
                   json={"model": MODEL, "max_tokens": 16, "stream": True,
                         "messages": [{"role": "user", "content": "Hello"}]})
    assert r.status_code == 200


def test_the_on_trial_status_shows_before_up(net):
    # The trial takes a generation of the chat model: long enough to be seen by polling.
    assert "trial" in net.seen, net.seen


def test_catalog_page_filters_and_opens_with_the_keyboard(net):
    _chat(net)  # so the card has a measured speed
    with browser() as b, page_of(b, net.url, signup=False) as page:
        chat = page.locator(f'#models button[data-model="{MODEL}"]')
        embed = page.locator(f'#models button[data-model="{EMBEDDER}"]')
        chat.wait_for()
        text = chat.inner_text()
        assert "up" in text and "1 miner" in text and "credits / 1M tokens" in text
        assert "1,024 tokens context" in text
        page.wait_for_function(
            f"document.querySelector('#models button[data-model=\"{MODEL}\"]')"
            ".innerText.includes('TTFT')", timeout=10_000)
        shoot(page, "catalog")
        assert_accessible(page, "catalog")
        # Filter by kind.
        page.click('#kind-filter button[data-kind="embedding"]')
        assert embed.is_visible() and chat.count() == 0
        assert page.get_attribute('#kind-filter button[data-kind="embedding"]',
                                  "aria-pressed") == "true"
        page.click('#kind-filter button[data-kind="all"]')
        # Keyboard: focus the chat model's card and press Enter to open its playground.
        chat.focus()
        page.keyboard.press("Enter")
        page.wait_for_selector("#chat-pane:not([hidden])")
        assert page.is_visible("#prompt")
        assert page.get_attribute('nav a[data-nav="chat"]', "aria-current") == "page"
