"""``POST /v1/images/generations``: OpenAI's image endpoint, billed per image and size.

Usage is in 256-pixel tiles (:func:`covey.protocol.image.tiles`), known up front, so the
escrow holds the exact cost. ``size`` must be one of the sizes the model's miners announce
(``GET /v1/models``); ``seed`` (Covey's own, random when left out, returned in the answer)
fixes every image, so an answer can be regenerated and checked.
"""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from covey.coordinator.api.accounts import Account
from covey.coordinator.api.media import answer, hold_and_run, offers_of
from covey.coordinator.api.requests import new_id
from covey.coordinator.api.serving import Serving
from covey.coordinator.errors import ApiError
from covey.coordinator.metrics import RequestRecord
from covey.coordinator.run_media import MediaResult
from covey.protocol import Paint, Painted
from covey.protocol.openai_media import ImageRequest

router = APIRouter()

DEFAULT_STEPS = 20
"""Denoising steps of a request that gives none. The coordinator fills them in, so the task
says everything a validator needs to regenerate its images (a miner's own default could
differ from the validator's)."""


def _size(body: ImageRequest, sizes: list[str]) -> tuple[int, int]:
    """(width, height) of ``body.size`` (the model's first size when left out).

    Raises:
        ApiError: 400 naming ``size`` when the model's miners do not make that size.
    """
    size = body.size if body.size not in (None, "auto") else (sizes[0] if sizes else None)
    if size is None or size not in sizes:
        raise ApiError(400, f"'{body.model}' makes images of {', '.join(sizes) or 'no size'}"
                       f"; got size {body.size!r}.", code="invalid_value", param="size")
    width, height = (int(x) for x in size.split("x"))
    return width, height


@router.post("/v1/images/generations", response_model=None)
async def generations(body: ImageRequest, request: Request, account: Account) -> Response:
    """OpenAI's image generations; see the module docstring. A client that hangs up
    cancels the work and pays nothing."""
    serving: Serving = request.app.state.serving
    if body.response_format == "url":
        raise ApiError(400, "response_format 'url' is not offered: miners keep no files to "
                       "link to. Leave it out, or send 'b64_json'.", code="invalid_value",
                       param="response_format")
    offers = offers_of(serving, body.model, "image")
    sizes = [s for s in offers[0].sizes if all(s in o.sizes for o in offers)]
    width, height = _size(body, sizes)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32 - body.n)
    if seed + body.n > 2**32:
        raise ApiError(400, f"'seed' + n must stay below 2^32; got seed {seed}.",
                       code="invalid_value", param="seed")
    task = Paint(job_id=new_id("img"), model=body.model, prompt=body.prompt, n=body.n,
                 width=width, height=height, seed=seed, steps=body.steps or DEFAULT_STEPS)
    record = RequestRecord(task.job_id, task.model, account, False)
    request.state.logged = True
    serving.admit(record)

    async def work() -> tuple[MediaResult, Response]:
        result = await hold_and_run(serving, task, account, offers, task.tiles)
        last = result.last
        assert isinstance(last, Painted)
        return result, JSONResponse({
            "created": int(time.time()), "id": task.job_id, "seed": seed,
            "size": f"{width}x{height}",
            "data": [{"b64_json": image, "revised_prompt": None} for image in last.images],
            "usage": {"tiles": result.outcome.prompt_tokens}})

    return await answer(serving, request, record, work)
