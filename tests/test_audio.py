"""Speech and transcription through the network: the real ``openai`` client against a real
coordinator and a miner process serving whisper tiny.en (faster-whisper) and the bundled
hibari voice; billing, receipts, bad input, streaming, a client that leaves."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError, OpenAI

from conftest import Network, ledger_verify
from covey.coordinator.verify.media import normalize, wer
from covey.miner.models import BUNDLED_SPEECH_MODEL as VOICE_MODEL
from covey.miner.models import BUNDLED_TRANSCRIPTION_MODEL as WHISPER
from test_billing import account, sign_up

pytest.importorskip("faster_whisper")
pytest.importorskip("hibari")
sf = pytest.importorskip("soundfile")

TEXT = ("The quick brown fox jumps over the lazy dog. Anyone with a spare computer can "
        "serve models to the network.")
ROUND_TRIP_WER = 0.2
"""Largest WER of hibari → whisper tiny.en through the network on TEXT (measured 0.0)."""
ESPEAK_WER = 0.35
"""Largest WER of whisper tiny.en on espeak-ng's robotic voice reading TEXT at 140 words a
minute (measured 0.15 here: "brown fox" heard as "round-foc"; 0.4 at espeak's default 175)."""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A coordinator and one miner process serving the transcription and the voice."""
    net = Network(tmp_path_factory.mktemp("audio"))
    try:
        net.add_miner("--model", WHISPER, "--model", VOICE_MODEL, wait=False)
        net.wait_miners(1, WHISPER)
        net.wait_miners(1, VOICE_MODEL)
        yield net
    finally:
        net.close()


def _client(net: Network, api_key: str | None = None) -> OpenAI:
    return OpenAI(base_url=f"{net.url}/v1", api_key=api_key or net.api_key, max_retries=0)


def _speak(net: Network, text: str = TEXT, fmt: str = "wav", **extra: object) -> bytes:
    with _client(net).audio.speech.with_streaming_response.create(
            model=VOICE_MODEL, voice="heart", input=text, response_format=fmt,
            extra_body=extra or None) as response:
        return b"".join(response.iter_bytes())


def test_models_are_listed_by_kind(net):
    models = {m["id"]: m for m in httpx.get(f"{net.url}/v1/models").json()["data"]}
    assert models[WHISPER]["kind"] == "transcription"
    assert models[VOICE_MODEL]["kind"] == "speech"
    assert "heart" in models[VOICE_MODEL]["voices"]


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus", "flac"])
def test_speech_streams_a_file_that_decodes(net, tmp_path: Path, fmt: str):
    audio = _speak(net, fmt=fmt, seed=3)
    data, rate = sf.read(io.BytesIO(audio))
    seconds = len(data) / rate
    # ~0.065 s per character for the bundled voice at speed 1
    assert 0.03 * len(TEXT) < seconds < 0.2 * len(TEXT), seconds
    assert abs(data).max() > 0.05  # not silence


def test_pcm_is_raw_16_bit_at_24_khz(net):
    pcm = _speak(net, fmt="pcm", seed=3)
    wav, rate = sf.read(io.BytesIO(_speak(net, fmt="wav", seed=3)), dtype="int16")
    assert rate == 24_000 and len(pcm) == 2 * len(wav)


def test_the_same_seed_reads_a_text_the_same_way(net):
    assert _speak(net, fmt="wav", seed=11) == _speak(net, fmt="wav", seed=11)


def test_round_trip_speech_then_transcription_recovers_the_text(net, tmp_path: Path):
    path = tmp_path / "speech.mp3"
    path.write_bytes(_speak(net, fmt="mp3", seed=1))
    with path.open("rb") as f:
        text = _client(net).audio.transcriptions.create(model=WHISPER, file=f)
    assert wer(TEXT, text.text) <= ROUND_TRIP_WER, text.text


def test_a_wav_spoken_by_espeak_is_transcribed(net, tmp_path: Path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "espeak.wav"
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(path), TEXT], check=True)
    with path.open("rb") as f:
        text = _client(net).audio.transcriptions.create(model=WHISPER, file=f,
                                                        response_format="text")
    assert wer(TEXT, text) <= ESPEAK_WER, text


@pytest.fixture(scope="module")
def clip(net, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    path.write_bytes(_speak(net, fmt="wav", seed=1))
    return path


def test_transcription_formats(net, clip: Path):
    client = _client(net)
    with clip.open("rb") as f:
        verbose = client.audio.transcriptions.create(
            model=WHISPER, file=f, response_format="verbose_json",
            timestamp_granularities=["word", "segment"])
    assert verbose.language == "en" and 5 < verbose.duration < 10
    assert verbose.segments and verbose.segments[0].start == 0.0
    assert [s.id for s in verbose.segments] == list(range(len(verbose.segments)))
    words = verbose.words or []
    assert [normalize(w.word) for w in words][:4] == ["the", "quick", "brown", "fox"]
    assert all(a.start <= b.start for a, b in zip(words, words[1:], strict=False))
    with clip.open("rb") as f:
        srt = client.audio.transcriptions.create(model=WHISPER, file=f, response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0") and "quick brown fox" in srt
    with clip.open("rb") as f:
        vtt = client.audio.transcriptions.create(model=WHISPER, file=f, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")


def test_a_streamed_transcription_sends_segments_as_events(net, clip: Path):
    with clip.open("rb") as f:
        events = list(_client(net).audio.transcriptions.create(model=WHISPER, file=f,
                                                               stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.delta") >= 2
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert normalize(deltas) == normalize(events[-1].text)
    assert wer(TEXT, events[-1].text) <= ROUND_TRIP_WER


def test_transcription_is_billed_per_second_and_receipted(net, clip: Path):
    headers = sign_up(net)
    key = headers["Authorization"].removeprefix("Bearer ")
    before = account(net, headers)["balance"]
    with clip.open("rb") as f:
        r = httpx.post(f"{net.url}/v1/audio/transcriptions", headers=headers, timeout=60,
                       files={"file": ("clip.wav", f, "audio/wav")},
                       data={"model": WHISPER})
    assert r.status_code == 200, r.text
    seconds = r.json()["usage"]["seconds"]
    duration = sf.info(str(clip)).duration
    assert seconds == -(-duration // 1)
    after = account(net, headers)
    # the floor for transcription: 4 µcr per second of audio
    assert before - after["balance"] == seconds * 4
    assert after["held"] == 0
    spent = before - account(net, headers)["balance"]
    speech = _client(net, key).audio.speech.create(model=VOICE_MODEL, voice="heart",
                                                    input="Hello there.")
    assert speech.content
    # the floor for speech: 10 µcr per input character
    assert before - account(net, headers)["balance"] - spent == len("Hello there.") * 10


BAD = [
    ({"file": ("empty.wav", b"", "audio/wav")}, {"model": WHISPER}, 400, "file"),
    ({"file": ("notes.wav", b"these are my notes, not audio\n" * 20, "audio/wav")},
     {"model": WHISPER}, 400, "file"),
    ({"file": ("clip.wav", b"RIFF", "audio/wav")}, {}, 400, "model"),
    ({}, {"model": WHISPER}, 400, "file"),
    ({"file": ("x.wav", b"RIFF", "audio/wav")}, {"model": "nope"}, 404, "model"),
    ({"file": ("x.wav", b"RIFF", "audio/wav")}, {"model": VOICE_MODEL}, 400, "model"),
    ({"file": ("x.wav", b"RIFF", "audio/wav")}, {"model": WHISPER, "response_format": "xml"},
     400, "response_format"),
    ({"file": ("x.wav", b"RIFF", "audio/wav")}, {"model": WHISPER, "temperature": "hot"},
     400, "temperature"),
]


@pytest.mark.parametrize(("files", "data", "status", "param"), BAD)
def test_bad_uploads_get_openai_errors_and_cost_nothing(net, files, data, status, param):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    r = httpx.post(f"{net.url}/v1/audio/transcriptions", headers=headers, timeout=30,
                   files=files or None, data=data)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    assert account(net, headers)["balance"] == before


def test_an_upload_over_the_cap_is_413_before_it_is_read(net):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    big = b"\0" * (30 * 2**20)
    r = httpx.post(f"{net.url}/v1/audio/transcriptions", headers=headers, timeout=60,
                   files={"file": ("big.wav", big, "audio/wav")}, data={"model": WHISPER})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] in ("request_too_large", "file_too_large")
    assert account(net, headers)["balance"] == before
    # the coordinator still serves
    assert httpx.get(f"{net.url}/healthz", timeout=5).status_code == 200


def test_an_unknown_voice_lists_the_voices(net):
    with pytest.raises(BadRequestError) as caught:
        _client(net).audio.speech.create(model=VOICE_MODEL, voice="alloy", input="Hi.")
    error = caught.value.body
    assert error["param"] == "voice" and "heart" in error["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": "x" * 4097}, "input"),
    ({"speed": 9.0}, "speed"),
    ({"response_format": "aiff"}, "response_format"),
    ({"model": WHISPER}, "model"),
])
def test_bad_speech_requests_cost_nothing(net, body, param):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    r = httpx.post(f"{net.url}/v1/audio/speech", headers=headers, timeout=30,
                   json={"model": VOICE_MODEL, "voice": "heart", "input": "Hi.", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert account(net, headers)["balance"] == before


def test_a_client_that_leaves_a_speech_stream_pays_nothing(net):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    long_text = " ".join([TEXT] * 30)
    with httpx.stream("POST", f"{net.url}/v1/audio/speech", headers=headers, timeout=60,
                      json={"model": VOICE_MODEL, "voice": "heart", "input": long_text,
                            "response_format": "pcm"}) as r:
        assert r.status_code == 200
        next(r.iter_bytes())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (account(net, headers)["held"]
                                           or not net.wait_idle(0.1)):
        time.sleep(0.2)
    after = account(net, headers)
    assert after["held"] == 0 and after["balance"] == before


def test_the_ledger_verifies(net):
    verified = ledger_verify(net.tmp / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_receipts_cover_the_uploaded_audio_and_the_returned_bytes(net, clip: Path):
    import hashlib

    from covey.protocol import Transcribe
    from covey.protocol.audio import transcript_digest
    from covey.protocol.receipts import request_digest, verify_receipt

    headers = sign_up(net)
    data = clip.read_bytes()
    r = httpx.post(f"{net.url}/v1/audio/transcriptions", headers=headers, timeout=60,
                   files={"file": ("clip.wav", data, "audio/wav")},
                   data={"model": WHISPER, "response_format": "verbose_json"})
    assert r.status_code == 200, r.text
    job = r.headers["x-request-id"]
    found = httpx.get(f"{net.url}/v1/receipts/{job}", headers=headers, timeout=10).json()
    receipt = found["receipt"]
    asked = Transcribe(job_id=job, model=WHISPER, audio_bytes=len(data),
                       audio_sha256=hashlib.sha256(data).hexdigest())
    assert receipt["request_sha256"] == request_digest(asked)
    assert receipt["output_sha256"] == transcript_digest(s["text"] for s in r.json()["segments"])
    assert receipt["prompt_tokens"] == r.json()["usage"]["seconds"]

    with httpx.stream("POST", f"{net.url}/v1/audio/speech", headers=headers, timeout=60,
                      json={"model": VOICE_MODEL, "voice": "heart", "input": "Good morning.",
                            "response_format": "mp3"}) as s:
        audio = b"".join(s.iter_bytes())
        job = s.headers["x-request-id"]
    found = httpx.get(f"{net.url}/v1/receipts/{job}", headers=headers, timeout=10).json()
    assert found["receipt"]["output_sha256"] == hashlib.sha256(audio).hexdigest()
    assert found["receipt"]["prompt_tokens"] == len("Good morning.")
    from covey.protocol.frames import Receipt

    assert verify_receipt(Receipt(**found["receipt"]), found["miner_signature"])


def test_a_header_that_understates_the_length_gets_what_it_declared(net, clip: Path):
    """A FLAC whose STREAMINFO says 1 s but which holds the whole clip: the escrow is sized
    from the header, the miner decodes no further than that, bills within it, and is not
    blamed for the client's file."""
    import av
    import numpy as np

    samples, rate = sf.read(str(clip), dtype="int16")
    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.asarray(samples)[None, :], format="s16",
                                           layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    flac = bytearray(out.getvalue())
    assert flac[:4] == b"fLaC"
    flac[21] &= 0xF0  # STREAMINFO's total samples (36 bits from byte 21): one second
    flac[22:26] = rate.to_bytes(4, "big")
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    r = httpx.post(f"{net.url}/v1/audio/transcriptions", headers=headers, timeout=60,
                   files={"file": ("short.flac", bytes(flac), "audio/flac")},
                   data={"model": WHISPER})
    assert r.status_code == 200, r.text
    seconds = r.json()["usage"]["seconds"]
    assert 1 <= seconds <= 2  # the declared second, plus the bound's second of slack
    assert before - account(net, headers)["balance"] == seconds * 4
    miner = httpx.get(f"{net.url}/v1/miners").json()["data"][0]["id"]
    assert httpx.get(f"{net.url}/v1/miners/{miner}/checks").json()["data"] == []


@pytest.mark.parametrize("text", ["你好世界", "   ", "😀😀😀"])
def test_speech_with_nothing_to_read_is_400_and_free(net, text: str):
    headers = sign_up(net)
    before = account(net, headers)["balance"]
    r = httpx.post(f"{net.url}/v1/audio/speech", headers=headers, timeout=30,
                   json={"model": VOICE_MODEL, "voice": "heart", "input": text})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "input"
    after = account(net, headers)
    assert after["balance"] == before and after["held"] == 0


def test_a_form_field_given_twice_is_400(net, clip: Path):
    r = httpx.post(f"{net.url}/v1/audio/transcriptions", headers=net.headers, timeout=30,
                   files=[("file", ("a.wav", clip.read_bytes(), "audio/wav")),
                          ("model", (None, WHISPER)), ("model", (None, VOICE_MODEL))])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "model"
