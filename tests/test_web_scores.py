"""The page's scoring playground, in a real headless Chromium against a real network serving
the bundled breast-cancer models: the catalog prices them per row; the malignant example
scores as the API scores it; a cleared field gets the API's message by that field; a proved
score says it was verified, and its downloaded answer verifies offline. Screenshots go to
/tmp/web-shots/ (``scoring-desktop.png``, a proved score, is docs/scoring.png)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import test_scores
from conftest import Network
from test_scores import LR, MLP
from webui import assert_accessible, browser, page_of, shoot

# The bundled models trained into a temporary home (the MLP's proof setup made once per
# session) and the data set's rows: test_scores' fixtures, shared rather than made twice.
scoring_home = test_scores.scoring_home
data = test_scores.data
MALIGNANT, BENIGN = 0, 19  # rows of the data set the page's example buttons fill in


@pytest.fixture(scope="module")
def net(scoring_home: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Network]:
    """A coordinator that checks the MLP's proofs and a miner of both bundled models."""
    with test_scores.scoring_network(tmp_path_factory.mktemp("web-scores"), scoring_home
                                     ) as net:
        yield net


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


@pytest.fixture
def page(chromium, net):
    with page_of(chromium, net.url) as page:
        yield page


def _api_score(net: Network, model: str, row: list[float]) -> float:
    r = httpx.post(f"{net.url}/v1/scores", headers=net.headers, timeout=60,
                   json={"model": model, "inputs": [row]})
    r.raise_for_status()
    return r.json()["data"][0]["score"]


def _open(page, model: str) -> None:
    button = page.locator(f'#models button[data-model="{model}"]')
    button.wait_for()
    button.click()
    page.wait_for_selector("#score-pane:not([hidden])")
    assert page.inner_text("#score-model") == model


def _field_values(page) -> list[float]:
    return [float(v) for v in page.eval_on_selector_all(
        "#score-grid input", "is => is.map(i => i.value)")]


def test_the_catalog_prices_scoring_models_per_row(page, net):
    cards = {}
    for model in (LR, MLP):
        button = page.locator(f'#models button[data-model="{model}"]')
        button.wait_for()
        assert button.locator(".kind").inner_text() == "scoring"
        assert button.locator(".speed").count() == 0  # no tokens per second here
        cards[model] = button.inner_text()
    assert "0.01 credits / 1K rows" in cards[LR]
    assert "proving" not in cards[LR]  # the LR has no proof setup
    assert "0.01 credits / 1K rows · 0.002 credits / second of proving" in cards[MLP]
    page.click('#kind-filter button[data-kind="scoring"]')
    shown = page.eval_on_selector_all("#models button[data-model]",
                                      "bs => bs.map(b => b.dataset.model)")
    assert sorted(shown) == sorted([LR, MLP])


def test_the_malignant_example_scores_as_the_api_does(page, net, data):
    _open(page, LR)
    card = page.inner_text("#score-card")
    assert "malignant" in card and re.search(r"% correct on \d+ held-out rows", card)
    assert len(page.query_selector_all("#score-grid input")) == 30
    assert page.inner_text('label[for="score-f0"]') == "mean radius"
    assert not page.is_visible("#score-proof")  # the LR has no proof setup
    assert page.is_visible("#score-encrypted")  # … but scores ciphertext, elsewhere
    assert f"covey score {LR} --encrypted" in page.inner_text("#score-encrypted")

    page.click("#score-malignant")
    assert _field_values(page) == data[MALIGNANT]
    page.click("#score")
    page.wait_for_selector("#score-percent")
    expected = _api_score(net, LR, data[MALIGNANT])
    assert page.inner_text("#score-percent") == f"{expected * 100:.1f} %"
    assert expected > 0.5
    assert "malignant" in page.inner_text("#score-result")
    assert re.search(r"1 row · 0\.0000\d+ credits", page.inner_text("#score-usage"))
    assert_accessible(page, "scoring, a plain score")
    shoot(page, "scoring-plain")

    # A pasted row (a spreadsheet's copy: tabs) fills the form; the benign case scores low.
    page.fill("#score-csv", "\t".join(map(str, data[BENIGN])))
    page.click("#score-csv-fill")
    assert _field_values(page) == data[BENIGN]
    page.click("#score")  # clears the last result at once
    page.wait_for_selector("#score-percent")
    benign = _api_score(net, LR, data[BENIGN])
    assert page.inner_text("#score-percent") == f"{benign * 100:.1f} %" and benign < 0.5

    page.fill("#score-csv", "1,2,three")
    page.click("#score-csv-fill")
    assert page.inner_text("#score-csv-error") == '"three" is not a number.'
    page.fill("#score-csv", "1,2,3")
    page.click("#score-csv-fill")
    assert "takes 30 numbers; this row has 3" in page.inner_text("#score-csv-error")
    assert _field_values(page) == data[BENIGN]  # a bad row changes nothing


def test_a_cleared_field_shows_the_apis_message_by_it(page, net):
    _open(page, LR)
    page.click("#score-benign")
    page.fill("#score-f3", "")
    page.click("#score")
    error = page.locator("#score-f3-error")
    error.wait_for()
    message = error.inner_text()
    assert message.startswith("mean area: ") and "inputs[0][3]" in message, message
    assert page.get_attribute("#score-f3", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "score-f3"
    assert page.inner_text("#score-result") == ""
    assert page.is_enabled("#score") and page.inner_text("#score") == "Score"
    assert_accessible(page, "scoring, an error")
    shoot(page, "scoring-error")
    # Fixed, it scores, and the message goes.
    page.fill("#score-f3", "566.3")
    page.click("#score")
    page.wait_for_selector("#score-percent")
    assert not page.is_visible("#score-f3-error")
    assert page.get_attribute("#score-f3", "aria-invalid") == "false"


def test_a_proved_score_is_verified_and_its_answer_verifies_offline(page, net, scoring_home,
                                                                    tmp_path):
    from covey.scoring.proofs import verify_answer

    _open(page, MLP)
    assert "Proofs" in page.inner_text("#score-card")
    assert not page.is_visible("#score-encrypted")
    # A proof takes values in the card's ranges only: the refusal lands by the field.
    page.click("#score-malignant")
    page.fill("#score-f0", "1000000")
    page.check("#score-proof")
    page.click("#score")
    error = page.locator("#score-f0-error")
    error.wait_for()
    assert "outside" in error.inner_text() and "a proof" in error.inner_text()

    page.click("#score-malignant")
    assert not page.is_visible("#score-f0-error")
    page.click("#score")
    assert page.inner_text("#score") == "Proving…" and page.is_disabled("#score")
    page.wait_for_selector("#score-proved", timeout=120_000)
    vk = httpx.get(f"{net.url}/v1/models/{MLP}").json()["proof_vk_sha256"]
    proved = page.inner_text("#score-proved")
    assert proved == f"Proof verified by the coordinator (verifying key sha256 {vk})."
    assert re.search(r"1 row · \d+\.\d s of proving · \d\.\d{6} credits",
                     page.inner_text("#score-usage"))
    assert page.is_enabled("#score") and page.inner_text("#score-status") == ""
    with page.expect_download() as download:
        page.click("#score-download")
    assert download.value.suggested_filename == "answer.json"
    saved = tmp_path / "answer.json"
    download.value.save_as(saved)
    answer = json.loads(saved.read_text())
    assert answer["proof"] == {"vk_sha256": vk, "verified": True}
    scores = verify_answer(answer, scoring_home / MLP / "proof" / "vk.key")
    shown = page.inner_text("#score-percent")
    assert shown == f"{answer['data'][0]['score'] * 100:.1f} %"
    assert scores[0] == pytest.approx(answer["data"][0]["score"], abs=1e-9)
    assert_accessible(page, "scoring, a proved score")
    shoot(page, "scoring")
