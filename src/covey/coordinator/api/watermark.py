"""``POST /v1/watermark/detect``: is this text watermarked with the network's key?

The coordinator has no tokenizer (it never loads a model), so a live miner of the model
tokenizes the text (``tokenize`` → ``tokens``); the score itself is
:func:`covey.protocol.watermark.detect` over those ids with the network's key.
"""

from __future__ import annotations

import random

from fastapi import APIRouter, Request

from covey.coordinator.api.accounts import Account
from covey.coordinator.api.requests import new_id
from covey.coordinator.errors import ApiError
from covey.coordinator.job_faults import MinerFault
from covey.coordinator.link import MinerLink, TaskRefused
from covey.coordinator.miners import MinerRegistry, MinerSession
from covey.protocol import Tokenize, Tokens
from covey.protocol.openai import WatermarkDetection, WatermarkDetectRequest
from covey.protocol.watermark import GAMMA, Z_THRESHOLD, detect

router = APIRouter()

TOKENIZE_TIMEOUT = 10.0
"""Seconds a miner may take to tokenize (a megabyte of text takes well under one)."""
TOKENIZE_TRIES = 3
"""Miners asked in turn when one fails or leaves (a slow one ends the request: 504)."""


def _no_miner(message: str) -> ApiError:
    return ApiError(503, message, code="no_miner_available", type="service_unavailable",
                    headers={"Retry-After": "5"})


class _Failed(Exception):
    """This miner could not tokenize (an error frame, or it left); another may."""


async def _ask(session: MinerSession, frame: Tokenize) -> list[int]:
    """Send ``frame`` to ``session`` and wait for its ``tokens``.

    Raises:
        TimeoutError: no answer within :data:`TOKENIZE_TIMEOUT`.
        _Failed: the miner refused, broke the protocol or left.
    """
    try:
        async with MinerLink(session).call(frame, TOKENIZE_TIMEOUT) as call:
            item = await call.next()
    except TaskRefused as exc:
        raise _Failed(str(exc)) from None
    except MinerFault as fault:
        if fault.reason == "stalled":
            raise TimeoutError from None
        raise _Failed("the miner left" if fault.reason == "disconnected" else
                      "the miner broke the protocol") from None
    assert isinstance(item, Tokens)
    return list(item.token_ids)


async def tokenize(registry: MinerRegistry, model: str, text: str) -> list[int]:
    """Token ids of ``text`` by a live miner of ``model``, trying up to
    :data:`TOKENIZE_TRIES` miners (in random order) while they fail.

    Raises:
        ApiError: 404 unknown model, 400 a private model (no tokenizer), 503 no live
            miner (or none could tokenize), 504 a miner did not answer within
            :data:`TOKENIZE_TIMEOUT`.
    """
    sessions = [s for s in registry.serving(model) if s.welcomed.is_set()]
    if not sessions:
        if not registry.is_known(model):
            raise ApiError(404, f"The model '{model}' does not exist. GET /v1/models lists "
                           "the models of this network.", code="model_not_found",
                           param="model")
        raise _no_miner(f"No miner is serving '{model}' right now to tokenize the text; "
                        "try again later.")
    if any((o := s.offer(model)) is not None and o.kind != "chat" for s in sessions):
        raise ApiError(400, f"'{model}' is not a chat model: only text models' answers carry "
                       "watermarks.", code="invalid_value", param="model")
    if all((o := s.offer(model)) is not None and o.private for s in sessions):
        raise ApiError(400, f"'{model}' is a private model: its miners have no tokenizer. "
                       "Watermarks of private models are not detectable here.",
                       code="invalid_value", param="model")
    random.shuffle(sessions)
    why = ""
    for session in sessions[:TOKENIZE_TRIES]:
        try:
            return await _ask(session, Tokenize(job_id=new_id("wmk"), model=model, text=text))
        except TimeoutError:
            raise ApiError(504, f"The miner asked to tokenize the text did not answer within "
                           f"{TOKENIZE_TIMEOUT:.0f} s; try again.", code="miner_timeout"
                           ) from None
        except _Failed as exc:
            why = str(exc)
    raise _no_miner(f"No miner of '{model}' could tokenize the text ({why}).")


@router.post("/v1/watermark/detect")
async def watermark_detect(body: WatermarkDetectRequest, request: Request, account: Account
                           ) -> WatermarkDetection:
    """Score ``body.text`` for the network's watermark (see
    :class:`~covey.protocol.openai.WatermarkDetection`); ``watermarked`` is the paper's
    verdict, z > 4.

    Raises:
        ApiError: 400 empty text or fewer than 2 tokens (nothing to score), and the errors
            of :func:`tokenize`.
    """
    if not body.text:
        raise ApiError(400, "'text' is empty; send the text to score.", param="text",
                       code="invalid_value")
    ids = await tokenize(request.app.state.registry, body.model, body.text)
    if len(ids) < 2:
        raise ApiError(400, f"'text' is {len(ids)} token(s) long; at least 2 are needed to "
                       "score a watermark (a confident verdict needs a few dozen).",
                       param="text", code="text_too_short")
    found = detect(request.app.state.watermark_key, ids, GAMMA)
    return WatermarkDetection(model=body.model, tokens_scored=found.tokens_scored,
                              green_tokens=found.green_tokens, z_score=found.z_score,
                              p_value=found.p_value, watermarked=found.watermarked,
                              threshold=Z_THRESHOLD, gamma=found.gamma)
