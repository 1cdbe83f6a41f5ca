"""What the web app's browser tests share: Debian's Chromium driven by Playwright, a page
signed up to a network, screenshots at phone and desktop widths (which must not scroll
sideways), and axe-core's accessibility check (no serious or critical violations).

Screenshots go to /tmp/web-shots/ (look at them: the layout must be right at both widths).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from test_web import CHROMIUM, CHROMIUM_ARGS, _browser_or_skip

SHOTS = Path("/tmp/web-shots")
WIDTHS = {"desktop": 1440, "phone": 390}
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
SERIOUS = ("serious", "critical")


@contextmanager
def browser(*args: str) -> Iterator[object]:
    """A headless Chromium with ``args`` added to the usual ones (skips, or fails under
    COVEY_REQUIRE_BROWSER, without one)."""
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *args])
        try:
            yield b
        finally:
            b.close()


@contextmanager
def page_of(b, url: str, signup: bool = True, width: int = WIDTHS["desktop"],
            permissions: list[str] | None = None, csp: bool = False) -> Iterator[object]:
    """A fresh page (its own storage) at ``url``, signed up through the header's button when
    ``signup``, with browser ``permissions`` granted (e.g. ``microphone``); fails at the end
    if the page threw a JavaScript error.

    The page's Content-Security-Policy forbids eval, which Playwright's string predicates
    (``wait_for_function``) use: it is bypassed unless ``csp``, where a test must wait with
    selectors and locators only."""
    context = b.new_context(viewport={"width": width, "height": 900},
                            permissions=permissions or [], bypass_csp=not csp)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-catalog=ready]")
    if signup:
        page.click("#signup")
        page.locator("#account-info", has_text="credits").wait_for()
    try:
        yield page
        assert not errors, errors
    finally:
        context.close()


def shoot(page, name: str) -> None:
    """Full-page screenshots at phone and desktop widths; the page must not scroll sideways
    at either."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    before = page.viewport_size
    for label, width in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(150)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} scrolls sideways by {overflow}px at {width}px"
        page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size(before)


def axe_violations(page) -> list[dict]:
    """axe-core's serious and critical violations on the page as it is now (WCAG 2 A/AA
    rules and best practices), each ``{id, impact, help, nodes: [selector, …]}``."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        # Evaluated through the DevTools protocol: the page's Content-Security-Policy
        # refuses inline <script> tags, as it should.
        page.evaluate(AXE.read_text())
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.map(n => n.target.join(' '))}));
    }""")
    return [v for v in result if v["impact"] in SERIOUS]


def assert_accessible(page, name: str) -> None:
    """No serious or critical axe-core violation on the page (``name`` labels the failure)."""
    bad = axe_violations(page)
    assert not bad, f"{name}: " + "; ".join(
        f"{v['id']} ({v['impact']}): {v['help']} at {v['nodes'][:3]}" for v in bad)
