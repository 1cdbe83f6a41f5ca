"""``POST /v1/audio/transcriptions``: OpenAI's transcription endpoint, billed per second.

The request's id (for its receipt, ``GET /v1/receipts/{id}``) is in the ``X-Request-Id``
header, as OpenAI's transcription bodies carry none.

The multipart upload is capped (``CoordinatorConfig.max_audio_bytes``, 25 MiB by default) by
the body limit before it is read, probed for its duration (:mod:`covey.coordinator.
audio_probe`), which sizes the escrow, and sent to a miner in bounded ``audio_chunk``
frames. ``stream=true`` sends each segment as a ``transcript.text.delta`` event as it is
decoded and ends with ``transcript.text.done``; a transcription whose miner dies resumes on
another miner after the last segment delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncIterator
from typing import Any, get_args

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import UploadFile

from covey.coordinator.api.accounts import Account
from covey.coordinator.api.media import answer, chain, hold_and_run, offers_of, streamed
from covey.coordinator.api.requests import new_id
from covey.coordinator.api.serving import Serving
from covey.coordinator.audio_probe import NotAudio, audio_seconds
from covey.coordinator.errors import ApiError
from covey.coordinator.metrics import RequestRecord
from covey.coordinator.run_media import MediaResult
from covey.protocol import Segment, Transcribe, Transcribed
from covey.protocol.openai_media import TranscriptFormat, render_transcript, usage
from covey.protocol.openai_stream import SSE_DONE, sse

router = APIRouter()

TRANSCRIPTIONS = "/v1/audio/transcriptions"
_FIELDS = {"file", "model", "language", "prompt", "temperature", "response_format",
           "timestamp_granularities[]", "timestamp_granularities", "stream",
           "chunking_strategy", "include[]"}


def _bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


async def _form(request: Request, cap: int) -> tuple[dict[str, str | list[str]], bytes, str]:
    """(fields, audio bytes, file name) of the multipart form.

    Raises:
        ApiError: 400 for a body that is not a multipart form, a missing or empty
            ``file`` or ``model``; 413 for a file over ``cap`` bytes.
    """
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise _bad("Send the audio as multipart/form-data with a 'file' field.", "file")
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as exc:  # noqa: BLE001 - the parser raises several kinds for a bad body
        raise _bad(f"The multipart body could not be read: {exc}", "file") from None
    fields: dict[str, str | list[str]] = {}
    upload: UploadFile | None = None
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "file":
                    raise _bad(f"Unexpected file field '{key}'; the audio goes in 'file'.",
                               key)
                upload = value
            elif key.endswith("[]"):
                listed = fields.setdefault(key.removesuffix("[]"), [])
                assert isinstance(listed, list)
                listed.append(value)
            elif key in fields:
                raise _bad(f"'{key}' is given twice; send it once.", key)
            else:
                fields[key] = value
        if upload is None:
            raise _bad("Missing the audio: send it in the 'file' field.", "file",
                       "missing_required_parameter")
        data = await upload.read(cap + 1)
        if not data:
            raise _bad("The audio file is empty.", "file")
        if len(data) > cap:
            raise ApiError(413, f"The audio file is larger than {cap} bytes.",
                           code="file_too_large", param="file")
        return fields, data, upload.filename or ""
    finally:
        await form.close()


def _str(fields: dict[str, str | list[str]], name: str) -> str | None:
    value = fields.get(name)
    if isinstance(value, list):
        raise _bad(f"'{name}' takes one value.", name)
    return value


def _task(fields: dict[str, str | list[str]], data: bytes, filename: str
          ) -> tuple[Transcribe, TranscriptFormat, bool]:
    """The task, response format and ``stream`` flag of a transcription form.

    Raises:
        ApiError: 400 naming the field at fault.
    """
    model = _str(fields, "model")
    if not model:
        raise _bad("Missing 'model'; GET /v1/models lists the transcription models.",
                   "model", "missing_required_parameter")
    fmt = _str(fields, "response_format") or "json"
    if fmt not in get_args(TranscriptFormat):
        raise _bad(f"'response_format' must be one of {', '.join(get_args(TranscriptFormat))}.",
                   "response_format")
    try:
        temperature = float(_str(fields, "temperature") or 0)
    except ValueError:
        raise _bad("'temperature' must be a number from 0 to 1.", "temperature") from None
    if not 0 <= temperature <= 1:
        raise _bad("'temperature' must be a number from 0 to 1.", "temperature")
    stream = (_str(fields, "stream") or "false").lower()
    if stream not in ("true", "false"):
        raise _bad("'stream' must be true or false.", "stream")
    granularities = fields.get("timestamp_granularities", [])
    granularities = [granularities] if isinstance(granularities, str) else granularities
    if any(g not in ("segment", "word") for g in granularities):
        raise _bad("'timestamp_granularities[]' takes 'segment' and 'word'.",
                   "timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise _bad("'timestamp_granularities[]' needs response_format 'verbose_json'.",
                   "timestamp_granularities")
    language = _str(fields, "language") or None
    if language is not None and not (language.isascii() and language.isalpha()
                                     and 2 <= len(language) <= 3):
        raise _bad("'language' is an ISO-639-1 code such as 'en'.", "language")
    prompt = _str(fields, "prompt") or None
    if prompt is not None and len(prompt) > 4096:
        raise _bad("'prompt' is longer than 4096 characters.", "prompt")
    task = Transcribe(job_id=new_id("tr"), model=model, audio_bytes=len(data),
                      audio_sha256=hashlib.sha256(data).hexdigest(),
                      filename=filename[:255] or None, language=language and language.lower(),
                      prompt=prompt, temperature=temperature, words="word" in granularities)
    return task, fmt, stream == "true"  # type: ignore[return-value]


@router.post(TRANSCRIPTIONS, response_model=None)
async def transcriptions(request: Request, account: Account) -> Response:
    """OpenAI's audio transcriptions; see the module docstring."""
    serving: Serving = request.app.state.serving
    cap = request.app.state.config.max_audio_bytes
    fields, data, filename = await _form(request, cap)
    task, fmt, stream = _task(fields, data, filename)
    offers = offers_of(serving, task.model, "transcription")
    try:
        seconds = await asyncio.to_thread(audio_seconds, data)
    except NotAudio as exc:
        raise _bad(f"The file is not audio: {exc}.", "file") from None
    # Rounding and decoders differ by a frame or two: one second of slack in the bound.
    bound = math.ceil(seconds) + 1
    task = task.model_copy(update={"max_seconds": bound})
    record = RequestRecord(task.job_id, task.model, account, stream)
    request.state.logged = True
    serving.admit(record)
    if stream:
        return await _stream(serving, record, task, account, offers, bound, data)

    async def work() -> tuple[MediaResult, Response]:
        result = await hold_and_run(serving, task, account, offers, bound, audio=data)
        last = result.last
        assert isinstance(last, Transcribed)
        body, media_type = render_transcript(fmt, result.delivered.segments, last.language,
                                             last.duration, result.outcome.prompt_tokens,
                                             task.words)
        headers = {"X-Request-Id": task.job_id}
        response: Response = JSONResponse(body, headers=headers) if isinstance(body, dict) \
            else PlainTextResponse(body, media_type=media_type, headers=headers)
        return result, response

    return await answer(serving, request, record, work)


async def _stream(serving: Serving, record: RequestRecord, task: Transcribe, account: str,
                  offers: Any, bound: int, data: bytes) -> Response:
    first, rest = await streamed(serving, record, lambda deliver: hold_and_run(
        serving, task, account, offers, bound, deliver, data))

    async def events() -> AsyncIterator[bytes]:
        texts: list[str] = []
        try:
            async for item in chain(first, rest):
                if isinstance(item, Segment):
                    texts.append(item.text)
                    yield sse(json.dumps({"type": "transcript.text.delta",
                                          "delta": item.text}))
                elif isinstance(item, MediaResult):
                    yield sse(json.dumps({"type": "transcript.text.done",
                                          "text": "".join(texts).strip(),
                                          "usage": usage(item.outcome.prompt_tokens)}))
                elif isinstance(item, ApiError):
                    yield sse(item.body().model_dump_json())
            yield SSE_DONE
        finally:
            await rest.aclose()  # the client left: cancel the miner's work, refund

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": task.job_id})
