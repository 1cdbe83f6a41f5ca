"""Verifying speech and transcription miners, and failover of a transcription: cheating
miners (the test-only adversaries) caught in trials and sampled re-checks and slashed; a
transcription whose miner is killed mid-stream finished by another miner."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from conftest import Network, Proc, ledger_verify
from covey.coordinator.verify.media import wer
from covey.miner.backends.adversary import ENV, HONEST_FIRST_ENV
from covey.miner.models import BUNDLED_SPEECH_MODEL as VOICE_MODEL
from covey.miner.models import BUNDLED_TRANSCRIPTION_MODEL as WHISPER
from test_audio import TEXT
from test_billing import account, sign_up
from test_verify import SLASH, checks_of, stake

pytest.importorskip("faster_whisper")
pytest.importorskip("hibari")


def _restart_as(net: Network, index: int, env: dict[str, str]) -> Proc:
    """Stop miner ``index`` and start it again (same key and models) with ``env``."""
    honest = net.miners[index]
    honest.stop()
    proc = Proc([*honest.args], net.tmp / f"adversary-{index}.log", env)
    net.miners[index] = proc
    return proc


def _speak(net: Network, headers: dict[str, str], text: str) -> bytes:
    r = httpx.post(f"{net.url}/v1/audio/speech", headers=headers, timeout=120,
                   json={"model": VOICE_MODEL, "voice": "heart", "input": text,
                         "response_format": "wav"})
    assert r.status_code == 200, r.text
    return r.content


def _transcribe(net: Network, headers: dict[str, str], audio: bytes) -> dict:
    r = httpx.post(f"{net.url}/v1/audio/transcriptions", headers=headers, timeout=120,
                   files={"file": ("a.wav", audio, "audio/wav")}, data={"model": WHISPER})
    assert r.status_code == 200, r.text
    return r.json()


def _wait_for_check(net: Network, miner_id: str, seconds: float = 15) -> list[dict]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = checks_of(net, miner_id)
        if found:
            return found
        time.sleep(0.2)
    return []


def test_a_wrong_transcript_fails_the_trial_and_is_slashed(tmp_path: Path):
    net = Network(tmp_path)
    try:
        headers = sign_up(net)
        net.add_miner("--model", WHISPER, wait=False)
        net.wait_miners(1, WHISPER)
        cheat = stake(net, 0, headers)
        proc = _restart_as(net, 0, {ENV: "wrong-transcript"})
        proc.popen.wait(120)
        assert proc.popen.returncode == 1
        assert "failed its trial" in proc.output()
        found = checks_of(net, cheat)
        assert len(found) == 1 and found[0]["kind"] == "trial"
        assert "word error rate" in found[0]["verdict"]["reasons"][0]
        assert found[0]["slashed"] == SLASH
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_wrong_transcript_is_caught_by_a_sampled_recheck(tmp_path: Path):
    net = Network(tmp_path, "--check-rate", "1")
    try:
        headers = sign_up(net)
        net.add_miner("--model", WHISPER, "--model", VOICE_MODEL, wait=False)
        net.wait_miners(1, WHISPER)
        honest = httpx.get(f"{net.url}/v1/miners").json()["data"][0]["id"]
        audio = _speak(net, headers, TEXT)
        # Honest on its one trial task, made-up words from then on.
        net.add_miner("--model", WHISPER, wait=False,
                      env={ENV: "wrong-transcript", HONEST_FIRST_ENV: "1"})
        net.wait_miners(2, WHISPER)
        cheat = stake(net, 1, headers)
        found: list[dict] = []
        for _ in range(12):
            _transcribe(net, headers, audio)
            found = _wait_for_check(net, cheat, 5)
            if found:
                break
        assert found, "a wrong transcript was not caught"
        check = found[0]
        assert check["kind"] == "sampled" and check["verdict"]["passed"] is False
        assert "word error rate" in check["verdict"]["reasons"][0]
        assert check["slashed"] == SLASH and check["validator"] == honest
        # the honest miner's own answers pass their re-checks
        assert not [c for c in checks_of(net, honest) if not c["verdict"]["passed"]]
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("behaviour", ["silence", "noise"])
def test_speech_that_says_nothing_is_caught(tmp_path: Path, behaviour: str):
    """Silence fails the trial on join (read back by the transcription miner); noise slips
    past it (honest first) and fails a sampled re-check."""
    net = Network(tmp_path, "--check-rate", "1")
    try:
        headers = sign_up(net)
        net.add_miner("--model", WHISPER, wait=False)
        net.wait_miners(1, WHISPER)
        net.add_miner("--model", VOICE_MODEL, wait=False)
        net.wait_miners(1, VOICE_MODEL)
        cheat = stake(net, 1, headers)
        honest_first = "0" if behaviour == "silence" else "1"
        proc = _restart_as(net, 1, {ENV: behaviour, HONEST_FIRST_ENV: honest_first})
        if behaviour == "silence":
            proc.popen.wait(120)
            assert proc.popen.returncode == 1 and "failed its trial" in proc.output()
            found = checks_of(net, cheat)
            assert found[0]["kind"] == "trial"
        else:
            net.wait_miners(1, VOICE_MODEL)
            before = account(net, headers)["balance"]
            _speak(net, headers, "Please send the report to the office by Friday morning.")
            found = _wait_for_check(net, cheat, 30)
            assert found and found[0]["kind"] == "sampled"
            # the user is refunded what the cheat was paid
            assert account(net, headers)["balance"] == before
        assert found[0]["verdict"]["passed"] is False
        assert "word error rate" in json.dumps(found[0]["verdict"]["reasons"])
        assert found[0]["slashed"] == SLASH
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_transcription_whose_miner_dies_resumes_on_another(tmp_path: Path):
    net = Network(tmp_path)
    try:
        headers = sign_up(net)
        net.add_miner("--model", WHISPER, "--model", VOICE_MODEL, wait=False)
        net.add_miner("--model", WHISPER, wait=False)
        net.wait_miners(2, WHISPER)
        long_text = " ".join([TEXT] * 6)
        audio = _speak(net, headers, long_text)
        before = account(net, headers)["balance"]
        events: list[dict] = []
        killed = None
        with httpx.stream("POST", f"{net.url}/v1/audio/transcriptions", headers=headers,
                          timeout=120, files={"file": ("a.wav", audio, "audio/wav")},
                          data={"model": WHISPER, "stream": "true"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                events.append(json.loads(line.removeprefix("data: ")))
                if killed is None and len(events) == 2:
                    busy = [i for i, m in enumerate(httpx.get(
                        f"{net.url}/v1/miners").json()["data"]) if m["active"]]
                    assert len(busy) == 1
                    killed = _index_of(net, busy[0])
                    net.miners[killed].popen.send_signal(signal.SIGKILL)
        assert killed is not None
        done = events[-1]
        assert done["type"] == "transcript.text.done", events[-3:]
        deltas = "".join(e["delta"] for e in events if e["type"] == "transcript.text.delta")
        assert wer(long_text, deltas) <= 0.2, deltas
        after = account(net, headers)
        assert after["held"] == 0 and before - after["balance"] == done["usage"]["seconds"] * 4
    finally:
        net.close()
    verified = ledger_verify(tmp_path / "coordinator")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _index_of(net: Network, listed: int) -> int:
    """The index in ``net.miners`` of the miner at position ``listed`` of GET /v1/miners."""
    from covey.protocol.identity import load_or_create

    miner_id = httpx.get(f"{net.url}/v1/miners").json()["data"][listed]["id"]
    for i in range(len(net.miners)):
        key = load_or_create(net.tmp / f"miner-{i}" / "miner.key")
        if key.verify_key.encode().hex() == miner_id:
            return i
    raise AssertionError("no such miner")
