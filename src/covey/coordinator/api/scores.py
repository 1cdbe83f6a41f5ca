"""``POST /v1/scores`` (Covey's own): a tabular model's decision on rows of numbers, plain,
proved (``proof``) or encrypted; ``POST /v1/scores/keys`` registers the evaluation keys an
encrypted row is made with.

Billing: ``rows`` at the model's row price, plus ``work_ms``, the milliseconds of proving
or encrypted work, at its work price. The escrow holds the rows and the most work a request
may take (:data:`PROOF_MS_BOUND` per proved row, :data:`ENCRYPTED_MS_BOUND` for an encrypted
one); everything is checked before a miner sees it, so a bad request costs nothing.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from covey.coordinator.api.accounts import Account
from covey.coordinator.api.media import answer, offers_of, quote
from covey.coordinator.api.requests import new_id
from covey.coordinator.api.serving import Serving
from covey.coordinator.errors import ApiError
from covey.coordinator.he_keys import KeyStore
from covey.coordinator.metrics import RequestRecord
from covey.coordinator.run_score import ScoreResult, run_score
from covey.protocol import ModelOffer, Score
from covey.protocol.openai_media import ScoreRequest

router = APIRouter()

SCORE_KEYS = "/v1/scores/keys"
"""The route that registers evaluation keys (its body limit is the key store's)."""

PROOF_MS_BOUND = 60_000
"""Most milliseconds of proving one row may bill (the bundled MLP proves in seconds)."""
ENCRYPTED_MS_BOUND = 10_000
"""Most milliseconds of work an encrypted row may bill (the bundled model takes tens)."""


def load_verifiers(setups: dict[str, Path]) -> dict[str, Any]:
    """Model name → :class:`~covey.scoring.proofs.ProofVerifier` for each proof setup folder
    (its ``vk.key``, ``settings.json``, ``kzg.srs`` and ``setup.json``; never the proving
    key).

    Raises:
        ValueError: a folder without a verifying key (the message names it).
    """
    if not setups:
        return {}
    from covey.scoring.proofs import ProofVerifier

    verifiers = {}
    for model, folder in setups.items():
        if not (folder / "vk.key").is_file():
            raise ValueError(f"{folder} holds no vk.key: make it with `covey model "
                             "prove-setup`")
        verifiers[model] = ProofVerifier(folder)
    return verifiers


def _check_inputs(body: ScoreRequest, offers: list[ModelOffer]) -> None:
    """Raises ApiError 400 for rows that do not fit the model's card (see
    :func:`covey.scoring.model.check_rows`) or a kind of scoring it cannot do."""
    from covey.scoring.model import InputError, check_rows

    card = offers[0].card
    if card is None:
        raise ApiError(400, f"'{body.model}' has no scoring card.", code="invalid_value",
                       param="model")
    if (body.inputs is None) == (body.encrypted is None):
        raise ApiError(400, "Send exactly one of 'inputs' (rows of numbers) and "
                       "'encrypted'.", code="invalid_value", param="inputs")
    if body.encrypted is not None:
        if body.proof:
            raise ApiError(400, "Proofs are made for plain inputs only; leave out 'proof' "
                           "or send 'inputs'.", code="invalid_value", param="proof")
        if card.encrypted_error is None or not any(o.card and o.card.encrypted_error
                                                   is not None for o in offers):
            raise ApiError(400, f"'{body.model}' cannot score encrypted rows (only linear "
                           "models can).", code="encrypted_unsupported", param="encrypted")
        return
    assert body.inputs is not None
    try:
        check_rows(card, body.inputs, proof=body.proof)
    except InputError as exc:
        raise ApiError(400, str(exc), code="invalid_value", param=exc.param) from None


def _verifier(serving: Serving, body: ScoreRequest, offers: list[ModelOffer]) -> Any:
    """The model's proof verifier when ``body.proof``.

    Raises:
        ApiError: 400 ``proof_unavailable`` when this coordinator holds no verifying key
            for the model or no live miner holds its proving key.
    """
    if not body.proof:
        return None
    verifier = serving.proof_verifiers.get(body.model)
    if verifier is None:
        raise ApiError(400, f"'{body.model}' has no proof setup on this network (a model "
                       "owner makes one with `covey model prove-setup`); leave out 'proof'.",
                       code="proof_unavailable", param="proof")
    if not any(o.proof_vk == verifier.vk_sha256 for o in offers):
        raise ApiError(400, f"No live miner of '{body.model}' holds the proving key for its "
                       "verifying key; leave out 'proof' or try later.",
                       code="proof_unavailable", param="proof")
    return verifier


@router.post("/v1/scores", response_model=None)
async def scores(body: ScoreRequest, request: Request, account: Account) -> Response:
    """Score rows (see the module docstring). A client that hangs up cancels the work and
    pays nothing."""
    serving: Serving = request.app.state.serving
    offers = offers_of(serving, body.model, "scoring")
    _check_inputs(body, offers)
    verifier = _verifier(serving, body, offers)
    keys: KeyStore = serving.score_keys
    encrypted = body.encrypted
    if encrypted is not None:
        keys.size(account, encrypted.keys_sha256)  # 400 when not registered
    task = Score(job_id=new_id("score"), model=body.model,
                 inputs=tuple(tuple(row) for row in body.inputs) if body.inputs else None,
                 proof=body.proof, encrypted=encrypted.ciphertext if encrypted else None,
                 keys_sha256=encrypted.keys_sha256 if encrypted else None)
    work_bound = (PROOF_MS_BOUND * task.rows if task.proof
                  else ENCRYPTED_MS_BOUND if encrypted else 0)
    max_cost, _ = quote(serving, task.model, offers, task.rows, work_bound)
    record = RequestRecord(task.job_id, task.model, account, False)
    request.state.logged = True
    serving.admit(record)

    async def work() -> tuple[ScoreResult, Response]:
        result = await serving.billed(task.job_id, account, max_cost, lambda: run_score(
            serving.dispatcher, task, account, serving.policy, work_bound,
            lambda sha256: keys.get(account, sha256), verifier, serving.on_false_proof))
        return result, JSONResponse(_body(task, result, verifier))

    return await answer(serving, request, record, work)


def _body(task: Score, result: ScoreResult, verifier: Any) -> dict[str, object]:
    reply, outcome = result.reply, result.outcome
    data: list[dict[str, object]] = []
    if reply.encrypted is not None:
        data.append({"index": 0, "encrypted": reply.encrypted})
    else:
        assert reply.outputs is not None and task.inputs is not None
        for i, score in enumerate(reply.outputs):
            item: dict[str, object] = {"index": i, "score": score}
            if task.proof:
                item["input"] = list(task.inputs[i])
                item["proof"] = reply.proofs[i]
            data.append(item)
    out: dict[str, object] = {
        "id": task.job_id, "object": "score", "created": int(time.time()),
        "model": task.model, "data": data,
        "usage": {"rows": outcome.prompt_tokens, "work_ms": outcome.completion_tokens}}
    if task.proof:
        out["proof"] = {"vk_sha256": verifier.vk_sha256, "verified": True}
    if outcome.miner_id is not None:
        out["miner"] = outcome.miner_id
    return out


@router.post(SCORE_KEYS, openapi_extra={"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def register_keys(request: Request, account: Account) -> dict[str, object]:
    """Register evaluation keys for this account (the body: the serialized public TenSEAL
    context, ``application/octet-stream``); answers their ``keys_sha256``. Registering the
    same keys again is harmless; an account keeps its last few sets
    (:data:`~covey.coordinator.he_keys.KEY_SETS_PER_ACCOUNT`)."""
    serving: Serving = request.app.state.serving
    data = await request.body()
    sha256 = await asyncio.to_thread(serving.score_keys.put, account, data)
    return {"object": "score.keys", "keys_sha256": sha256, "bytes": len(data)}


@router.get("/v1/scores/keys/{keys_sha256}")
async def keys_registered(keys_sha256: str, request: Request, account: Account
                          ) -> dict[str, object]:
    """Whether the evaluation keys ``keys_sha256`` are registered (404 when not), so a
    client uploads its keys only once."""
    serving: Serving = request.app.state.serving
    try:
        size = serving.score_keys.size(account, keys_sha256)
    except ApiError as exc:
        raise ApiError(404, exc.message, code="keys_not_found",
                       param="keys_sha256") from None
    return {"object": "score.keys", "keys_sha256": keys_sha256, "bytes": size}
