"""The page's media playgrounds, in a real headless Chromium against a real network: speak a
sentence and play it, transcribe an uploaded file (and a fake microphone's recording), see
the API's error for a file that is not audio, and make images with a tiny Stable Diffusion
pipeline. Screenshots of each playground at desktop and phone widths go to /tmp/web-shots/."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Network
from covey.miner.models import BUNDLED_SPEECH_MODEL as VOICE_MODEL
from covey.miner.models import BUNDLED_TRANSCRIPTION_MODEL as WHISPER
from webui import browser, page_of, shoot

pytest.importorskip("faster_whisper")
pytest.importorskip("hibari")

TEXT = "The quick brown fox jumps over the lazy dog."
FAKE_MICROPHONE = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


def _tiny_pipeline(folder: Path) -> Path | None:
    """A tiny Stable Diffusion pipeline folder, or None where diffusers or its builder is
    missing (the image test then skips)."""
    try:
        from covey.miner.backends.diffusers import build_tiny_pipeline
    except ImportError:
        return None
    try:
        return build_tiny_pipeline(folder)
    except ImportError:
        return None


def _image_model(net: Network, timeout: float = 120) -> str:
    """The id of the network's image model, once a miner serves it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = httpx.get(f"{net.url}/v1/models", timeout=5).json()["data"]
        ready = [m["id"] for m in data if m["kind"] == "image" and m["miners"]]
        if ready:
            return ready[0]
        for m in net.miners:
            if m.popen.poll() is not None:
                raise RuntimeError("miner exited:\n" + m.output())
        time.sleep(0.2)
    raise RuntimeError("no image model came up:\n" + net.miners[-1].output()[-3000:])


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A coordinator, a miner of whisper tiny.en and the bundled voice, and (where diffusers
    is installed) a miner of a tiny Stable Diffusion pipeline."""
    tmp = tmp_path_factory.mktemp("web-media")
    net = Network(tmp)
    try:
        net.add_miner("--model", WHISPER, "--model", VOICE_MODEL, wait=False)
        folder = _tiny_pipeline(tmp / "tiny-sd")
        net.image_model = None  # type: ignore[attr-defined]
        if folder is not None:
            net.add_miner("--model", str(folder), wait=False)
        net.wait_miners(1, WHISPER)
        net.wait_miners(1, VOICE_MODEL)
        if folder is not None:
            net.image_model = _image_model(net)  # type: ignore[attr-defined]
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def chromium():
    with browser(*FAKE_MICROPHONE) as b:
        yield b


@pytest.fixture
def page(chromium, net):
    with page_of(chromium, net.url, permissions=["microphone"]) as page:
        yield page


def _open(page, model: str, kind: str) -> None:
    button = page.locator(f'#models button[data-model="{model}"]')
    button.wait_for()
    assert kind in button.locator(".kind").inner_text()
    button.click()
    assert "active" in (button.get_attribute("class") or "")


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z']+", text.lower()))


def _wav(net: Network, text: str = TEXT) -> bytes:
    r = httpx.post(f"{net.url}/v1/audio/speech", headers=net.headers, timeout=120,
                   json={"model": VOICE_MODEL, "input": text, "voice": "heart",
                         "response_format": "wav", "seed": 1})
    r.raise_for_status()
    assert r.content.startswith(b"RIFF")
    return r.content


def test_speech_playground_plays_what_it_reads(page, net):
    _open(page, VOICE_MODEL, "speech")
    assert page.is_visible("#speech-pane") and not page.is_visible("#chat-pane")
    voices = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
    assert "heart" in voices
    page.select_option("#voice", "heart")
    page.fill("#speech-input", TEXT)
    page.fill("#speed", "1.25")
    page.dispatch_event("#speed", "input")
    assert page.inner_text("#speed-value") == "1.25×"
    page.click("#speak")
    page.wait_for_function("document.querySelector('#speech-audio').duration > 1",
                           timeout=60_000)
    src = page.get_attribute("#speech-audio", "src") or ""
    assert src.startswith("blob:")
    assert page.get_attribute("#speech-download", "href") == src
    assert page.get_attribute("#speech-download", "download") == "speech.mp3"
    assert page.inner_text("#speech-usage") == f"{len(TEXT)} characters billed"
    assert not page.is_visible("#speech-error")
    shoot(page, "speech")


def test_speech_playground_shows_the_api_error_as_text(page, net):
    _open(page, VOICE_MODEL, "speech")
    # A voice the miners lack: add it to the picker, as a stale page could have it.
    page.eval_on_selector("#voice", "s => s.add(new Option('<b>nobody</b>', '<b>nobody</b>'))")
    page.select_option("#voice", "<b>nobody</b>")
    page.click("#speak")
    page.wait_for_selector("#speech-error:not([hidden])")
    message = page.inner_text("#speech-error")
    assert "Unknown voice '<b>nobody</b>'" in message and "heart" in message
    assert page.eval_on_selector("#speech-error", "e => e.children.length") == 0


def test_transcription_playground_streams_an_upload(page, net, tmp_path: Path):
    wav = tmp_path / "fox.wav"
    wav.write_bytes(_wav(net))
    _open(page, WHISPER, "transcription")
    assert page.is_visible("#transcribe-pane") and not page.is_visible("#speech-pane")
    page.set_input_files("#audio-file", str(wav))
    page.wait_for_function("document.querySelector('#audio-preview').duration > 1")
    page.click("#transcribe")
    page.wait_for_selector("#transcript[data-done=true]", timeout=60_000)
    assert "error" not in (page.get_attribute("#transcript", "class") or "")
    assert "quick brown fox" in _words(page.inner_text("#transcript"))
    assert re.fullmatch(r"\d+ seconds? billed", page.inner_text("#transcribe-usage"))
    shoot(page, "transcription")


def test_transcription_playground_shows_the_api_error(page, net, tmp_path: Path):
    fake = tmp_path / "notes.wav"
    fake.write_text("These are my notes, not a recording.\n")
    expected = httpx.post(f"{net.url}/v1/audio/transcriptions", headers=net.headers,
                          data={"model": WHISPER}, timeout=30,
                          files={"file": ("notes.wav", fake.read_bytes(), "audio/wav")}
                          ).json()["error"]["message"]
    _open(page, WHISPER, "transcription")
    page.set_input_files("#audio-file", str(fake))
    page.click("#transcribe")
    page.wait_for_selector("#transcript[data-done=true]", timeout=30_000)
    assert "error" in (page.get_attribute("#transcript", "class") or "")
    assert page.inner_text("#transcript") == expected
    assert "not audio" in expected
    assert page.inner_text("#transcribe-usage") == ""
    shoot(page, "transcription-error")


def test_transcription_playground_records_the_microphone(page, net):
    """Chromium's fake microphone beeps: the recording is converted to WAV, sent, and
    billed by its length, whatever whisper makes of the beeps."""
    _open(page, WHISPER, "transcription")
    page.click("#record")
    page.wait_for_function("document.querySelector('#record').ariaPressed === 'true'")
    assert page.inner_text("#record") == "Stop recording"
    page.wait_for_timeout(2500)
    page.click("#record")
    page.wait_for_selector("#transcript[data-done=true]", timeout=60_000)
    assert "error" not in (page.get_attribute("#transcript", "class") or ""), \
        page.inner_text("#transcript")
    assert re.fullmatch(r"recorded \d+\.\d s", page.inner_text("#record-status"))
    assert re.fullmatch(r"\d+ seconds? billed", page.inner_text("#transcribe-usage"))
    assert page.inner_text("#record") == "Record from microphone"


def test_image_playground_paints_at_the_chosen_size(page, net):
    model = net.image_model
    if model is None:
        pytest.skip("no image model: diffusers or build_tiny_pipeline is missing")
    sizes = httpx.get(f"{net.url}/v1/models").json()["data"]
    sizes = next(m["sizes"] for m in sizes if m["id"] == model)
    _open(page, model, "image")
    assert page.is_visible("#image-pane") and not page.is_visible("#transcribe-pane")
    assert page.eval_on_selector_all("#image-size option", "os => os.map(o => o.value)") \
        == sizes
    size = sizes[-1]
    width, height = (int(x) for x in size.split("x"))
    page.fill("#image-prompt", "a lighthouse at dusk")
    page.select_option("#image-size", size)
    page.fill("#image-n", "2")
    page.fill("#image-seed", "42")
    page.click("#paint")
    page.wait_for_function(
        "[...document.querySelectorAll('#images img')].length === 2 && "
        "[...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth)",
        timeout=120_000)
    natural = page.eval_on_selector_all(
        "#images img", "is => is.map(i => [i.naturalWidth, i.naturalHeight])")
    assert natural == [[width, height]] * 2
    assert page.inner_text("#image-seed-used") == "seed 42"
    assert re.fullmatch(r"\d+ tiles? billed", page.inner_text("#image-usage"))
    captions = page.eval_on_selector_all("#images figcaption", "fs => fs.map(f => f.innerText)")
    assert "seed 42" in captions[0] and "seed 43" in captions[1]
    assert not page.is_visible("#image-error")
    shoot(page, "image")

    # A size the model does not make: the API's message, as text.
    page.eval_on_selector("#image-size", "s => s.add(new Option('7x7', '7x7'))")
    page.select_option("#image-size", "7x7")
    page.click("#paint")
    page.wait_for_selector("#image-error:not([hidden])")
    assert "got size '7x7'" in page.inner_text("#image-error")
