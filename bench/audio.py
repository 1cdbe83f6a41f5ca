"""Transcription and speech through the network vs the same libraries in-process.

Side by side in one run, the same audio and texts, the same models (whisper tiny.en with
faster-whisper, the bundled hibari voice) and the same thread count (``--threads``, 1 by
default: on 2 cores the other one runs the coordinator and the client):
  (a) faster-whisper's ``WhisperModel.transcribe`` / hibari in this process,
  (b) Covey: ``POST /v1/audio/transcriptions`` / ``POST /v1/audio/speech`` through the
      ``openai`` client → coordinator → miner, all on 127.0.0.1, billed as every request is.
Rounds alternate (a, b, a, b …) so machine noise hits both alike. Real-time factor = seconds
of audio per second of wall time (median over rounds); ``*_ratio`` = network ÷ in-process
(target ≥ 0.9).

Re-check cost at a 5 % check rate: a transcription re-check re-runs the transcription (one
more transcription per checked request); a speech re-check transcribes the answer's audio,
sampled at ``SPEECH_CHECK_SCALE`` of the rate. ``recheck_share`` = rate × (validator seconds
÷ serving seconds), measured from the runs above. Also prints the round trip's word error
rate and the honest re-transcription WER.

Prints one JSON line. Usage: python bench/audio.py [--rounds 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

import network
from covey.coordinator.verify.media import SPEECH_CHECK_SCALE, wer
from covey.miner.models import BUNDLED_SPEECH_MODEL, BUNDLED_TRANSCRIPTION_MODEL, bundled_path

TEXT = ("The quick brown fox jumps over the lazy dog. Anyone with a spare computer can serve "
        "models to the network. Please send the report to the office by Friday morning. "
        "Open models answer questions, read text aloud and transcribe meetings.")
SPEECH_TEXT = " ".join([TEXT] * 4)
"""About 1,000 characters (a long paragraph): the fixed cost of a request (HTTP, escrow hold,
settlement, ~20 ms) is measured apart, on one sentence (``speech_added_ms``)."""
SHORT = "The quick brown fox jumps over the lazy dog."
CHECK_RATE = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import soundfile as sf
    from faster_whisper import WhisperModel
    from hibari import Hibari
    from openai import OpenAI

    whisper = WhisperModel(str(bundled_path(BUNDLED_TRANSCRIPTION_MODEL)), device="cpu",
                           compute_type="int8", cpu_threads=args.threads)
    voice = Hibari(threads=args.threads)
    samples = voice(TEXT, seed=1)
    wav = io.BytesIO()
    sf.write(wav, samples, 24_000, format="WAV", subtype="PCM_16")
    audio = wav.getvalue()
    seconds = len(samples) / 24_000

    def local_transcribe() -> str:
        segments, _ = whisper.transcribe(io.BytesIO(audio), beam_size=1, best_of=1,
                                         temperature=[0.0], language="en", vad_filter=False)
        return "".join(s.text for s in segments)

    def local_speak(text: str = SPEECH_TEXT) -> float:
        return float(len(np.concatenate(list(voice.stream(text, seed=2)))) / 24_000)

    with tempfile.TemporaryDirectory() as tmp:
        served = [BUNDLED_TRANSCRIPTION_MODEL, BUNDLED_SPEECH_MODEL]
        url, procs = network.start(Path(tmp), served, served, args.threads)
        try:
            key = httpx.post(f"{url}/v1/accounts", timeout=10).json()["api_key"]
            client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

            def net_transcribe() -> str:
                return client.audio.transcriptions.create(
                    model=BUNDLED_TRANSCRIPTION_MODEL, file=("a.wav", audio)).text

            def net_speak(text: str = SPEECH_TEXT) -> float:
                with client.audio.speech.with_streaming_response.create(
                        model=BUNDLED_SPEECH_MODEL, voice="heart", input=text,
                        response_format="pcm") as r:
                    return len(b"".join(r.iter_bytes())) / 2 / 24_000

            rtf: dict[str, list[float]] = {k: [] for k in ("tl", "tn", "sl", "sn")}
            added: list[float] = []
            texts: dict[str, str] = {}
            local_transcribe(), net_transcribe(), local_speak(), net_speak()  # warm up
            for _ in range(args.rounds):
                for name, fn in (("tl", local_transcribe), ("tn", net_transcribe)):
                    t0 = time.perf_counter()
                    texts[name] = fn()
                    rtf[name].append(seconds / (time.perf_counter() - t0))
                for name, speak in (("sl", local_speak), ("sn", net_speak)):
                    t0 = time.perf_counter()
                    spoken = speak()
                    rtf[name].append(spoken / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                local_speak(SHORT)
                t1 = time.perf_counter()
                net_speak(SHORT)
                added.append((time.perf_counter() - t1) - (t1 - t0))
        finally:
            network.stop(procs)

    med = {k: statistics.median(v) for k, v in rtf.items()}
    # A transcription re-check runs the same transcription again; a speech re-check
    # transcribes the answer's audio (of speech's length) instead of synthesizing it.
    transcribe_check = CHECK_RATE
    speech_check = CHECK_RATE * SPEECH_CHECK_SCALE * (med["sn"] / med["tn"])
    print(json.dumps({
        "bench": "audio", "rounds": args.rounds, "threads": args.threads,
        "audio_seconds": round(seconds, 2),
        "transcribe_rtf_local": round(med["tl"], 2), "transcribe_rtf_network": round(med["tn"], 2),
        "transcribe_ratio": round(med["tn"] / med["tl"], 3),
        "speech_rtf_local": round(med["sl"], 2), "speech_rtf_network": round(med["sn"], 2),
        "speech_ratio": round(med["sn"] / med["sl"], 3),
        "speech_characters": len(SPEECH_TEXT),
        "speech_added_ms": round(1000 * statistics.median(added), 1),
        "honest_retranscription_wer": round(wer(texts["tl"], texts["tn"]), 4),
        "round_trip_wer": round(wer(TEXT, texts["tn"]), 4),
        "recheck_share_transcription": round(transcribe_check, 4),
        "recheck_share_speech": round(speech_check, 4),
    }))


if __name__ == "__main__":
    main()
