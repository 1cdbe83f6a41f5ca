"""Verifying media miners: transcription, speech and images, in trials and sampled
re-checks.

- **Transcription.** Greedy decoding is deterministic, so a validator with the same
  weights re-transcribes the same audio from the same offset and the two transcripts are
  compared by word error rate (WER ≤ :data:`TRANSCRIPT_WER`); the billed seconds must
  agree. A trial transcribes a bundled clip of known words (WER ≤ :data:`TRIAL_WER`).
- **Speech.** The miner's audio is transcribed by a transcription miner (a round trip) and
  compared with the input text (WER ≤ :data:`SPEECH_WER`), and its duration must suit the
  text's length (:data:`SECONDS_PER_CHAR`). Silence, noise or another text fail both.
- **Images.** With the request's seed a validator with the same weights regenerates the
  images; each pair's perceptual hash (64-bit pHash) may differ in at most
  :data:`IMAGE_PHASH_BITS` bits.

The bounds come from honest runs measured here (``bench/audio.py`` and ``bench/images.py``
print them); README's verification table says what each check catches and what it cannot.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources

from covey.coordinator.api.requests import new_id
from covey.coordinator.errors import ApiError
from covey.coordinator.job_faults import MinerFault
from covey.coordinator.ledger.penalties import Evidence
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import ImageAnswer, Outcome, SpeechAnswer, TranscriptAnswer
from covey.coordinator.router import Dispatcher
from covey.coordinator.run_media import Delivered, MediaTask, try_on
from covey.coordinator.verify.embeddings import MAX_PENDING_CHECKS
from covey.coordinator.verify.judge import CheckPolicy, Verdict
from covey.coordinator.verify.validators import NoVerdict, SampledChecks, validator
from covey.protocol import ModelOffer, Paint, Painted, Speak, Transcribe, Transcribed

log = logging.getLogger("covey.coordinator.verify")

TRANSCRIPT_WER = 0.1
"""Largest word error rate between a miner's and a validator's transcripts of the same
audio. Honest greedy runs of one model agree exactly here (WER 0 across thread counts);
0.1 leaves room for other CPUs and GPUs, while a wrong or made-up transcript is far off."""
TRIAL_WER = 0.35
"""Largest WER of a trial transcript against the clip's known words (whisper tiny.en
reads the bundled clip with WER 0.0 here; smaller models and other builds err more)."""
SPEECH_WER = 0.5
"""Largest WER between a speech answer's round-trip transcript and its input text. The
bundled voice read back by whisper tiny.en scores ≤ 0.25 on the test texts here; silence,
noise or another text score near 1."""
SECONDS_PER_CHAR = (0.03, 0.2)
"""Plausible seconds of speech per input character at speed 1 (the bundled voice reads
~0.065 s per character); a duration outside, scaled by the speed, fails."""
SPEECH_CHECK_SCALE = 0.2
"""Speech answers are re-checked at this share of the policy's rate (all of them when the
rate is 1): a speech re-check transcribes the answer, and whisper tiny.en reads audio ~5×
slower than hibari makes it (``bench/audio.py``), so at the full rate re-checks would cost
~25 % of the serving compute instead of the 5 % a check rate of 5 % costs other kinds."""
IMAGE_PHASH_BITS = 10
"""Most bits of 64 in which the pHash of a miner's image and the validator's regenerated
one may differ."""

TRIAL_TEXT = ("The quick brown fox jumps over the lazy dog. Anyone with a spare computer can "
              "serve models to the network.")
"""The words spoken in the bundled trial clip ``transcription_trial.ogg``."""


class MediaUnavailable(NoVerdict):
    """No miner could do the validator's part (none online, busy, or it failed)."""


def normalize(text: str) -> str:
    """Lower case, letters, digits and apostrophes only, single spaces: what WER compares
    (punctuation and capitals are a model's style, not its words)."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of ``hypothesis`` against ``reference`` after :func:`normalize`
    (jiwer; 0 for two empty texts, 1 for a hypothesis against an empty reference)."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    import jiwer

    return float(jiwer.wer(ref, hyp))


def phash_distance(a: str, b: str) -> int:
    """Bits in which the 64-bit pHashes of two base64 PNG images differ.

    Raises:
        ImportError: imagehash (``covey[image]``) is not installed.
        ValueError: an image does not decode.
    """
    import imagehash
    from PIL import Image

    def phash(data: str) -> object:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            return imagehash.phash(image.convert("RGB"))

    return int(phash(a) - phash(b))  # type: ignore[operator]


def trial_clip() -> bytes:
    """The bundled trial clip (Ogg Opus, 24 kHz, speaking :data:`TRIAL_TEXT`)."""
    return resources.files(__package__).joinpath("transcription_trial.ogg").read_bytes()


def as_container(audio: bytes, fmt: str, sample_rate: int) -> bytes:
    """``audio`` in a form FFmpeg reads: raw ``pcm`` gets a WAV header; others as is."""
    if fmt != "pcm":
        return audio
    return (b"RIFF" + struct.pack("<I", 36 + len(audio)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", len(audio)) + audio)


def judge_transcript(expected: str, got: str, expected_seconds: int | None,
                     got_seconds: int, bound: float) -> Verdict:
    """Fail a transcript farther than ``bound`` (WER) from the trusted one, or billing
    other seconds than the trusted count (None: not compared)."""
    rate = wer(expected, got)
    verdict = Verdict(figures={"wer": round(rate, 4), "bound": bound, "seconds": got_seconds,
                               "expected_seconds": expected_seconds,
                               "transcript": got[:500], "trusted": expected[:500]})
    if rate > bound:
        verdict.reasons.append(f"the transcript has word error rate {rate:.2f} against "
                               f"the trusted one (at most {bound} is due)")
    if expected_seconds is not None and abs(got_seconds - expected_seconds) > 1:
        verdict.reasons.append(f"billed {got_seconds} s of audio; the trusted count is "
                               f"{expected_seconds} s")
    return verdict


def judge_speech(task: Speak, duration: float, transcript: str) -> Verdict:
    """Fail speech whose round-trip transcript is farther than :data:`SPEECH_WER` from its
    input, or whose duration does not suit the input's length."""
    rate = wer(task.input, transcript)
    per_char = duration * task.speed / max(1, len(task.input))
    verdict = Verdict(figures={"wer": round(rate, 4), "bound": SPEECH_WER,
                               "seconds_per_char": round(per_char, 4),
                               "transcript": transcript[:500]})
    if rate > SPEECH_WER:
        verdict.reasons.append(f"the audio, transcribed, has word error rate {rate:.2f} "
                               f"against its text (at most {SPEECH_WER} is due)")
    low, high = SECONDS_PER_CHAR
    if not low <= per_char <= high:
        verdict.reasons.append(f"{duration:.2f} s of audio for {len(task.input)} characters "
                               f"at speed {task.speed} ({per_char:.3f} s per character; "
                               f"{low}–{high} is plausible)")
    return verdict


def judge_images(expected: Sequence[str], got: Sequence[str]) -> Verdict:
    """Fail images whose pHash differs from the regenerated ones' in more than
    :data:`IMAGE_PHASH_BITS` bits (or another count of images)."""
    verdict = Verdict()
    if len(expected) != len(got):
        verdict.reasons.append(f"{len(got)} images where {len(expected)} were due")
        return verdict
    try:
        distances = [phash_distance(e, g) for e, g in zip(expected, got, strict=True)]
    except ValueError as exc:
        verdict.reasons.append(f"an image does not decode: {exc}")
        return verdict
    verdict.figures = {"phash_bits": distances, "bound": IMAGE_PHASH_BITS}
    worst = max(range(len(distances)), key=distances.__getitem__)
    if distances[worst] > IMAGE_PHASH_BITS:
        verdict.reasons.append(f"image {worst} differs from its regeneration in "
                               f"{distances[worst]} of 64 pHash bits (at most "
                               f"{IMAGE_PHASH_BITS} is due)")
    return verdict


async def run_on(session: MinerSession, task: MediaTask, timeout: float, audio: bytes = b""
                 ) -> tuple[Transcribed | object, Delivered]:
    """Run ``task`` on ``session`` directly (a trial or a validator's run): its last frame
    and what it streamed.

    Raises:
        MediaUnavailable: the miner refused, failed, left or took over ``timeout`` s.
    """
    got = Delivered()
    try:
        async with asyncio.timeout(timeout):
            last, _ = await try_on(session, task, timeout, audio, got)
    except TimeoutError:
        raise MediaUnavailable(f"no answer within {timeout:.0f} s") from None
    except ApiError as exc:
        raise MediaUnavailable(f"the miner refused: {exc.message}") from None
    except MinerFault as fault:
        raise MediaUnavailable(f"the miner failed ({fault.reason})") from None
    return last, got


class MediaVerification(SampledChecks):
    """The :class:`~covey.coordinator.verify.checker.Verifier`'s part for media models."""

    dispatcher: Dispatcher
    policy: CheckPolicy
    metrics: Metrics
    _pending: int
    _rng: random.Random
    _spawn: Callable[[Awaitable[None]], None]
    punish: Callable[[Evidence], Awaitable[object]]

    def _media_judgeable(self, offer: ModelOffer, miner_id: str) -> bool:
        """A trial of ``offer`` can be judged: a transcription always (the bundled clip),
        speech when a transcription miner is live, images when another miner has the
        same weights."""
        if offer.kind == "transcription":
            return True
        if offer.kind == "speech":
            return self._transcriber(exclude=[miner_id]) is not None
        return any(s.miner_id != miner_id and (o := s.offer(offer.name)) is not None
                   and o.sha256 == offer.sha256
                   for s in self.dispatcher.registry.serving(offer.name))

    def _transcriber(self, exclude: Sequence[str] = ()) -> str | None:
        """A live transcription model (served by a miner not in ``exclude``), or None."""
        for session in self.dispatcher.registry.sessions.values():
            if session.closed or session.miner_id in exclude:
                continue
            for offer in session.hello.models:
                if offer.kind == "transcription" and offer.name not in session.held:
                    return offer.name
        return None

    async def _judge_media_trial(self, session: MinerSession, offer: ModelOffer,
                                 others: Sequence[str] = ()
                                 ) -> tuple[Verdict, str, str | None] | None:
        """A media trial for ``offer`` on ``session``: (verdict, task id, validator id or
        None), or None when the miner did not answer; validators in ``others`` are not
        asked."""
        timeout = self.policy.timeout
        task: MediaTask
        if offer.kind == "transcription":
            clip = trial_clip()
            task = _transcribe(offer.name, offer.sha256, clip, "trial.ogg")
            try:
                last, got = await run_on(session, task, timeout, clip)
            except MediaUnavailable:
                return None
            assert isinstance(last, Transcribed)
            text = "".join(s.text for s in got.segments)
            return judge_transcript(TRIAL_TEXT, text, None, last.seconds, TRIAL_WER), \
                task.job_id, None
        if offer.kind == "speech":
            task = Speak(job_id=new_id("speech"), model=offer.name, model_sha256=offer.sha256,
                         input=TRIAL_TEXT, voice=offer.voices[0], response_format="opus",
                         seed=1)
            try:
                last, got = await run_on(session, task, timeout)
            except MediaUnavailable:
                return None
            try:
                transcript, validator = await self._round_trip(
                    bytes(got.audio), "opus", 24_000, [session.miner_id, *others])
            except MediaUnavailable as exc:
                return Verdict(figures={"unverified": str(exc), "nobody": exc.nobody}), \
                    task.job_id, None
            return judge_speech(task, getattr(last, "duration", 0.0), transcript), \
                task.job_id, validator
        task = Paint(job_id=new_id("img"), model=offer.name, model_sha256=offer.sha256,
                     prompt="a lighthouse on a cliff at dawn", width=_side(offer, 0),
                     height=_side(offer, 1), seed=7)
        try:
            last, _ = await run_on(session, task, timeout)
        except MediaUnavailable:
            return None
        assert isinstance(last, Painted)
        try:
            trusted, validator = await self._validator_run(task, [session.miner_id, *others])
        except MediaUnavailable as exc:
            return Verdict(figures={"unverified": str(exc), "nobody": exc.nobody}), \
                task.job_id, None
        assert isinstance(trusted, Painted)
        return judge_images(trusted.images, last.images), task.job_id, validator

    async def _validator_run(self, task: MediaTask, exclude: Sequence[str]
                             ) -> tuple[object, str]:
        """(last frame, miner id) of :meth:`_validator_go`."""
        last, _, miner = await self._validator_go(task, exclude)
        return last, miner

    async def _validator_go(self, task: MediaTask, exclude: Sequence[str], audio: bytes = b""
                            ) -> tuple[object, Delivered, str]:
        """``task`` (a fresh id; pinned weights when it has them) on a validator not in
        ``exclude``, queued ahead of new requests: (its last frame, what it streamed, its
        miner id).

        Raises:
            MediaUnavailable: none is free within the timeout, or it failed.
        """
        async with validator(self.dispatcher, task.model, task.model_sha256, exclude,
                             self.policy.timeout, MediaUnavailable) as session:
            again = task.model_copy(update={"job_id": new_id("chk")})
            last, got = await run_on(session, again, self.policy.timeout, audio)
            return last, got, session.miner_id

    async def _round_trip(self, audio: bytes, fmt: str, sample_rate: int,
                          exclude: Sequence[str]) -> tuple[str, str]:
        """(transcript, transcribing miner) of a speech answer's audio.

        Raises:
            MediaUnavailable: no transcription miner is live or free, or it failed.
        """
        model = self._transcriber(exclude)
        if model is None:
            raise MediaUnavailable("no transcription model is online", nobody=True)
        clip = as_container(audio, fmt, sample_rate)
        task = _transcribe(model, None, clip, f"speech.{'wav' if fmt == 'pcm' else fmt}")
        _, got, miner = await self._validator_go(task, exclude, clip)
        return "".join(s.text for s in got.segments), miner

    def _maybe_check_media(self, outcome: Outcome,
                           answer: TranscriptAnswer | SpeechAnswer | ImageAnswer,
                           settlement: Awaitable[object]) -> None:
        """After a media request: punish false usage, else re-check a share
        ``policy.rate`` of them (speech: :data:`SPEECH_CHECK_SCALE` of it; not answers that
        moved between miners)."""
        rate = self.policy.rate
        if isinstance(answer, SpeechAnswer) and rate < 1:
            rate *= SPEECH_CHECK_SCALE
        if outcome.fault is None and (outcome.failovers or self._rng.random() >= rate):
            return
        if outcome.fault is None and self._pending >= MAX_PENDING_CHECKS:
            self.metrics.checks.labels("sampled", "skipped").inc()
            return
        self._pending += 1
        self._spawn(self._sampled_media(outcome, answer, settlement))

    async def _sampled_media(self, outcome: Outcome,
                             answer: TranscriptAnswer | SpeechAnswer | ImageAnswer,
                             settlement: Awaitable[object]) -> None:
        await self._sampled_single(outcome, answer.sent.model_sha256 or "", settlement,
                            lambda ex: self._recheck_media(outcome, answer, ex))

    async def _recheck_media(self, outcome: Outcome,
                             answer: TranscriptAnswer | SpeechAnswer | ImageAnswer,
                             exclude: Sequence[str]) -> tuple[Verdict, str | None]:
        if isinstance(answer, TranscriptAnswer):
            last, got, validator = await self._validator_go(answer.sent, exclude, answer.audio)
            assert isinstance(last, Transcribed)
            trusted = "".join(s.text for s in got.segments)
            return judge_transcript(trusted, answer.text, last.seconds,
                                    outcome.prompt_tokens, TRANSCRIPT_WER), validator
        if isinstance(answer, SpeechAnswer):
            transcript, validator = await self._round_trip(
                answer.audio, answer.sent.response_format, answer.sample_rate, exclude)
            return judge_speech(answer.sent, answer.duration, transcript), validator
        last, validator = await self._validator_run(answer.sent, exclude)
        assert isinstance(last, Painted)
        return judge_images(last.images, answer.images), validator


def _transcribe(model: str, sha256: str | None, clip: bytes, filename: str) -> Transcribe:
    import hashlib

    return Transcribe(job_id=new_id("tr"), model=model, model_sha256=sha256,
                      audio_bytes=len(clip), audio_sha256=hashlib.sha256(clip).hexdigest(),
                      filename=filename)


def _side(offer: ModelOffer, axis: int) -> int:
    size = offer.sizes[0] if offer.sizes else "64x64"
    return int(size.split("x")[axis])

