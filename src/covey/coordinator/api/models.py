"""``GET /v1/models``, ``GET /v1/miners`` and ``GET /healthz``."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from fastapi import APIRouter, Request

from covey.coordinator.errors import ApiError
from covey.coordinator.miners import MinerRegistry
from covey.coordinator.scores import MinerScore
from covey.coordinator.shards import shard_sessions, shard_status
from covey.protocol import ModelOffer
from covey.protocol.openai import ModelCard, ModelList, ModelPrice, ModelShards, ShardHolder

router = APIRouter()


UNITS = {"transcription": "seconds", "speech": "characters", "image": "tiles",
         "scoring": "rows"}
"""The usage unit of each kind's price that is not tokens (DESIGN.md, "Tasks")."""


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """Every known model, with how many live miners serve it now, its context length, its
    kind (chat, embedding, transcription, speech, image, scoring) and, by kind, its
    vectors' dimensions, its voices, its image sizes or its scoring card; for the catalog
    also its ``status``, miners awaiting a trial, ``price`` and measured speed (TTFT in
    seconds, decode tokens/s); a sharded model's ``shards``: which miner holds which
    blocks, and the blocks missing (its status is then ``incomplete``)."""
    return ModelList(data=_cards(request))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    """One model's entry of ``GET /v1/models`` (a scoring model's card lists its features
    in order).

    Raises:
        ApiError: 404 ``model_not_found`` for a model no miner offers.
    """
    for card in _cards(request):
        if card.id == model_id:
            return card
    raise ApiError(404, f"The model '{model_id}' does not exist; GET /v1/models lists the "
                   "models offered.", code="model_not_found", param="model")


def _cards(request: Request) -> list[ModelCard]:
    registry: MinerRegistry = request.app.state.registry
    billing = request.app.state.serving.billing
    speeds = request.app.state.metrics.speeds
    created = request.app.state.started_at
    on_trial = Counter(m for s in registry.sessions.values() if not s.closed for m in s.held)
    known = registry.models()
    for name in on_trial.keys() - known.keys():  # offered, but only by miners on trial
        held = registry.announced(name)
        known[name] = (0, held.context_length if held else 0)
    sharded = {name: status for name in {o.name for s in registry.sessions.values()
                                         if not s.closed for o in s.hello.models
                                         if o.shard is not None}
               if (status := shard_status(registry, name)) is not None}
    for name, status in sharded.items():
        if known.get(name, (0, 0))[0] == 0:
            offer = registry.announced(name)
            known[name] = (len(status.shards), offer.context_length if offer else 0)
    cards = []
    for name, (miners, ctx) in sorted(known.items()):
        offer = registry.announced(name)
        kind = offer.kind if offer else "chat"
        offers = [o for s in registry.serving(name) if (o := s.offer(name)) is not None]
        shards = sharded.get(name) if not offers else None
        if shards is not None:
            offers = [o for _, o in shard_sessions(registry, name)]
        price = billing.price(name, offers or ([offer] if offer else []))
        speed = speeds.get(name)
        cards.append(ModelCard(
            id=name, created=created, miners=miners, kind=kind,
            # a scoring model's offer holds its feature count there: the card lists them
            context_length=ctx if kind != "scoring" else None,
            dimensions=offer.dimensions if offer else None,
            voices=list(offer.voices) if offer and offer.voices else None,
            sizes=list(offer.sizes) if offer and offer.sizes else None,
            status=("incomplete" if shards is not None and not shards.complete
                    else "up" if miners else "trial" if on_trial[name] else "offline"),
            shards=None if shards is None else ModelShards(
                total=shards.total, missing=list(shards.missing),
                held=[ShardHolder(miner=m, start=a, end=b) for m, a, b in shards.shards]),
            miners_on_trial=on_trial[name],
            price=ModelPrice(prompt=price.prompt, completion=price.completion,
                             unit=UNITS.get(kind, "tokens")),
            ttft_s=None if speed is None or speed.ttft_s is None else round(speed.ttft_s, 4),
            decode_tps=None if speed is None or speed.decode_tps is None
            else round(speed.decode_tps, 2), **_scoring(request, name, offer, offers)))
    return cards


def _scoring(request: Request, name: str, offer: ModelOffer | None,
             offers: list[ModelOffer]) -> dict[str, Any]:
    """A scoring model's card fields (empty for other kinds)."""
    if offer is None or offer.kind != "scoring":
        return {}
    verifier = request.app.state.serving.proof_verifiers.get(name)
    vk = verifier.vk_sha256 if verifier is not None else None
    return {"card": offer.card, "proof_vk_sha256": vk,
            "proof": vk is not None and any(o.proof_vk == vk for o in offers),
            "encrypted": any(o.card is not None and o.card.encrypted_error is not None
                             for o in offers)}


@router.get("/v1/miners")
async def list_miners(request: Request) -> dict[str, object]:
    """Live miners: id (public key), models, slots, running and completed jobs, hardware,
    and what routing has measured: reputation, decode tokens/s, TTFT in seconds. ``held``:
    models awaiting a trial (no jobs yet); ``refused``: models whose trial failed.
    ``earnings``: from the ledger, as ``GET /v1/miners/{id}/earnings`` (paid ``jobs``,
    ``completion_tokens``, µcr ``balance`` and ``staked``), read for all miners at once;
    ``min_stake``: µcr a miner must stake to get paid jobs here (0: none)."""
    registry: MinerRegistry = request.app.state.registry
    dispatcher = request.app.state.dispatcher
    scores = dispatcher.scores
    sessions = list(registry.sessions.values())
    bank = request.app.state.serving.billing.bank
    earned = await asyncio.to_thread(bank.miners_earnings, [s.miner_id for s in sessions])
    return {"object": "list", "min_stake": dispatcher.min_stake, "data": [
        {
            "id": s.miner_id,
            "models": [m.model_dump() for m in s.hello.models],
            "slots": s.slots,
            "active": s.active,
            "completed": s.completed,
            "hardware": s.hello.hardware.model_dump(),
            "version": s.hello.version,
            "held": sorted(s.held),
            "refused": sorted(s.refused),
            **_measured(scores.get(s.miner_id)),
            "earnings": earned[s.miner_id],
        }
        for s in sessions
    ]}


def _measured(score: MinerScore) -> dict[str, object]:
    return {"reputation": round(score.reputation, 4),
            "decode_tps": None if score.decode_tps is None else round(score.decode_tps, 2),
            "ttft_s": None if score.ttft is None else round(score.ttft, 4),
            "jobs_failed": score.failed}


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, object]:
    """Liveness: ``{"status": "ok", "miners": N, "coordinator": public key (hex),
    "invite_only": bool}``; the key signs the ledger head and countersigns receipts;
    ``invite_only``: sign-up needs an invite code."""
    return {"status": "ok", "miners": len(request.app.state.registry.sessions),
            "coordinator": request.app.state.coordinator_key,
            "invite_only": request.app.state.config.invite_only}
