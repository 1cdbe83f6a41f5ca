"""``POST /v1/audio/speech``: OpenAI's text-to-speech endpoint, billed per input character.

The answer is the audio file itself, streamed as the miner synthesizes it sentence by
sentence (``response_format``: mp3, opus, wav, flac, pcm). The request holds the cost of its
characters, known up front; a voice none of the model's miners has is refused with the list
of those they have.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from covey.coordinator.api.accounts import Account
from covey.coordinator.api.media import chain, hold_and_run, offers_of, streamed
from covey.coordinator.api.requests import new_id
from covey.coordinator.api.serving import Serving
from covey.coordinator.errors import ApiError
from covey.coordinator.metrics import RequestRecord
from covey.coordinator.run_media import MediaResult
from covey.protocol import Speak, SpeechChunk
from covey.protocol.openai_media import SPEECH_MEDIA_TYPES, SpeechRequest

router = APIRouter()


@router.post("/v1/audio/speech", response_model=None)
async def speech(body: SpeechRequest, request: Request, account: Account) -> Response:
    """OpenAI's speech endpoint; see the module docstring. A client that hangs up stops
    the synthesis and pays nothing."""
    serving: Serving = request.app.state.serving
    offers = offers_of(serving, body.model, "speech")
    voices = sorted({v for o in offers for v in o.voices})
    if body.voice not in voices:
        raise ApiError(400, f"Unknown voice '{body.voice}' for '{body.model}'; its miners "
                       f"have: {', '.join(voices) or 'none'}.", code="invalid_value",
                       param="voice")
    task = Speak(job_id=new_id("speech"), model=body.model, input=body.input,
                 voice=body.voice, response_format=body.response_format, speed=body.speed,
                 seed=body.seed)
    record = RequestRecord(task.job_id, task.model, account, True)
    request.state.logged = True
    serving.admit(record)
    first, rest = await streamed(serving, record, lambda deliver: hold_and_run(
        serving, task, account, offers, len(task.input), deliver))

    async def audio() -> AsyncIterator[bytes]:
        import base64

        try:
            async for item in chain(first, rest):
                if isinstance(item, SpeechChunk):
                    yield base64.b64decode(item.data)
                elif isinstance(item, ApiError):
                    # Headers are gone: break the connection, so the client sees a cut
                    # file rather than a short one (the request is refunded).
                    raise ConnectionAbortedError(f"{task.job_id}: {item.message}")
                else:
                    assert isinstance(item, MediaResult)
        finally:
            await rest.aclose()  # the client left: cancel the miner's work, refund

    return StreamingResponse(audio(), media_type=SPEECH_MEDIA_TYPES[task.response_format],
                             headers={"X-Request-Id": task.job_id})
