"""Media requests at their edges: a smaller upload cap, a client that hangs up on a
transcription, an image whose miner dies mid-way."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import Network, ledger_verify
from covey.miner.models import BUNDLED_SPEECH_MODEL as VOICE_MODEL
from covey.miner.models import BUNDLED_TRANSCRIPTION_MODEL as WHISPER
from test_audio import TEXT
from test_audio_checks import _index_of
from test_billing import account, sign_up

pytest.importorskip("faster_whisper")
pytest.importorskip("hibari")


def _multipart(audio: bytes, model: str) -> tuple[bytes, str]:
    boundary = "covey-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode() + audio + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_the_upload_cap_is_set_by_max_audio_mb_and_a_leaving_client_pays_nothing(
        tmp_path: Path):
    net = Network(tmp_path, "--max-audio-mb", "1")
    try:
        headers = sign_up(net)
        net.add_miner("--model", WHISPER, "--model", VOICE_MODEL, wait=False)
        net.wait_miners(1, WHISPER)
        before = account(net, headers)["balance"]
        r = httpx.post(f"{net.url}/v1/audio/transcriptions", headers=headers, timeout=30,
                       files={"file": ("big.wav", b"\0" * (2 * 2**20), "audio/wav")},
                       data={"model": WHISPER})
        assert r.status_code == 413, r.text
        assert account(net, headers)["balance"] == before

        # A long transcription (minutes of speech, several seconds of work), then the
        # client hangs up before the answer: the miner stops and nothing is charged.
        r = httpx.post(f"{net.url}/v1/audio/speech", headers=headers, timeout=120,
                       json={"model": VOICE_MODEL, "voice": "heart", "response_format": "mp3",
                             "input": " ".join([TEXT] * 20)})
        assert r.status_code == 200, r.text
        spent = before - account(net, headers)["balance"]
        audio = r.content[:1_000_000]  # MP3 frames: a cut file still decodes
        body, content_type = _multipart(audio, WHISPER)
        host, port = net.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n"
                    f"Authorization: {headers['Authorization']}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
            sock.sendall(head.encode() + body)
            deadline = time.monotonic() + 20
            while not net.active_jobs() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert net.active_jobs() == 1
        assert net.wait_idle(15)
        deadline = time.monotonic() + 10
        while account(net, headers)["held"] and time.monotonic() < deadline:
            time.sleep(0.1)
        after = account(net, headers)
        assert after["held"] == 0 and before - after["balance"] == spent
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_an_image_whose_miner_dies_is_made_by_another(tmp_path: Path):
    pytest.importorskip("diffusers")
    from covey.miner.backends.diffusers import build_tiny_pipeline

    pipeline = build_tiny_pipeline(tmp_path / "tiny-sd")
    net = Network(tmp_path)
    try:
        headers = sign_up(net)
        net.add_miner("--model", str(pipeline), wait=False)
        net.wait_miners(1, "tiny-sd", timeout=120)
        net.add_miner("--model", str(pipeline), wait=False)
        net.wait_miners(2, "tiny-sd", timeout=120)
        before = account(net, headers)["balance"]
        result: dict[str, httpx.Response] = {}

        def ask() -> None:
            result["r"] = httpx.post(
                f"{net.url}/v1/images/generations", headers=headers, timeout=120,
                json={"model": "tiny-sd", "prompt": "a boat", "size": "128x128",
                      "steps": 200, "seed": 3})

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 30
        busy: list[int] = []
        while not busy and time.monotonic() < deadline:
            busy = [i for i, m in enumerate(httpx.get(f"{net.url}/v1/miners").json()["data"])
                    if m["active"]]
            time.sleep(0.05)
        assert busy
        time.sleep(0.5)
        net.miners[_index_of(net, busy[0])].popen.send_signal(signal.SIGKILL)
        asker.join(120)
        r = result["r"]
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1
        after = account(net, headers)
        assert after["held"] == 0 and before - after["balance"] == 1000  # one tile, once
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr
