"""FastAPI wiring of the coordinator: state, routes, error handlers, the web page."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from covey import __version__
from covey.coordinator.api import (
    accounts,
    chat,
    checks,
    embeddings,
    images,
    keys,
    models,
    receipts,
    scores,
    sealed,
    speech,
    transcriptions,
    watermark,
)
from covey.coordinator.api import ledger as ledger_api  # `ledger` names the Ledger below
from covey.coordinator.api.fast import FastInference
from covey.coordinator.api.scores import SCORE_KEYS, load_verifiers
from covey.coordinator.api.serving import Serving
from covey.coordinator.api.transcriptions import TRANSCRIPTIONS
from covey.coordinator.billing import Billing
from covey.coordinator.duties import run_duties
from covey.coordinator.errors import install_error_handlers
from covey.coordinator.failover import FailoverPolicy
from covey.coordinator.he_keys import KeyStore
from covey.coordinator.ledger import Ledger
from covey.coordinator.ledger.bank import Bank, BankPolicy
from covey.coordinator.ledger.pricing import Price
from covey.coordinator.ledger.replicas import LEASE_TTL_S, Lease, refund_orphaned, replica_id
from covey.coordinator.limits import BodyLimit, QueryKeyGuard
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import MinerRegistry, serve_miner
from covey.coordinator.quotas import KeyLimitPolicy, KeyLimits
from covey.coordinator.rebalance import Rebalancer
from covey.coordinator.remote import ReplicaBus, shown
from covey.coordinator.router import Dispatcher, QueuePolicy
from covey.coordinator.shared import SharedUsage
from covey.coordinator.traffic import TrafficRecorder
from covey.coordinator.verify.canaries import CANARY_ACCOUNT, Canaries
from covey.coordinator.verify.canaries import fund as fund_canary
from covey.coordinator.verify.checker import Verifier
from covey.coordinator.verify.embeddings import load_references, split_reference_files
from covey.coordinator.verify.judge import CheckPolicy
from covey.coordinator.verify.trials import TrialBook
from covey.protocol import Generate
from covey.protocol.frames import ChatMessage
from covey.protocol.identity import load_or_create
from covey.protocol.watermark import derive_key

log = logging.getLogger("covey.coordinator")


_NO_OTEL: dict[str, object] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False,
                   "operation_spans": False}}
    if "telemetry" in inspect.signature(FastAPI).parameters else {})
"""FastAPI's own OpenTelemetry hooks off, in the versions that have them: they look up
the global providers on every request, and the coordinator's metrics are Prometheus'
(``/metrics``)."""


def default_database_url(data_dir: Path) -> str:
    """SQLite in ``data_dir`` (WAL mode), the single-machine default."""
    return f"sqlite:///{(data_dir / 'covey.db').resolve()}"

PAGE_HEADERS = {
    # Model output is rendered as HTML (sanitized): the policy is the second wall. Nothing
    # loads from another origin (an answer's <img src=http://…> would carry the chat away),
    # no inline script runs, WebAssembly (libsodium) may compile, and no other site frames
    # the page.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
        "img-src 'self' data: blob:; media-src 'self' data: blob:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""Headers of the web page (``GET /``)."""

DEFAULT_CATALOG = {"smollm2-135m-instruct": 8192}
"""Models a fresh coordinator knows by name before any miner offers them (name → context
length in tokens), so a request for one gets 503 "no miner" rather than 404."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """Coordinator settings.

    ``heartbeat_interval`` and ``miner_timeout`` in seconds (a miner silent for
    ``miner_timeout`` is evicted, within a second of it); ``failover``: how many miners a
    job may try and how long one may stall; ``queue``: waiting policy when all slots are
    busy; ``key_limits``: requests per API key at once and per minute;
    ``database_url``: SQLAlchemy URL of the ledger (default: SQLite in ``data_dir``);
    ``bank``: grant, fee and stake rules; ``prices``: µcr per 1M tokens by model.
    """

    data_dir: Path = Path(".covey")
    database_url: str | None = None
    bank: BankPolicy = BankPolicy()
    prices: dict[str, Price] = field(default_factory=dict)
    heartbeat_interval: float = 2.0
    miner_timeout: float = 6.0
    failover: FailoverPolicy = FailoverPolicy()
    queue: QueuePolicy = QueuePolicy()
    key_limits: KeyLimitPolicy = KeyLimitPolicy()
    catalog: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CATALOG))
    checks: CheckPolicy = CheckPolicy()
    trials: tuple[Path, ...] = ()
    """Reference files for trial tasks besides the bundled model's."""
    watermark_key: bytes | None = None
    """The network's watermark key (32 bytes); None derives it from the coordinator's
    identity key (:func:`covey.protocol.watermark.derive_key`)."""
    watermark_models: frozenset[str] = frozenset()
    """Models every answer of which is watermarked, asked for or not."""
    record_traffic: Path | None = None
    """Write every message received and sent to this file (:mod:`covey.coordinator.traffic`)."""
    max_audio_bytes: int = 25 * 2**20
    """Largest audio upload for a transcription (25 MiB, as OpenAI's)."""
    nats_url: str | None = None
    """NATS server of the replicas of this network (None: a lone coordinator); see
    :mod:`covey.coordinator.remote`."""
    lease_ttl: float = LEASE_TTL_S
    """Seconds this replica's lease on the shared ledger lasts unless renewed
    (:mod:`covey.coordinator.ledger.replicas`)."""
    canary_prompts: tuple[tuple[ChatMessage, ...], ...] = ()
    """The operator's private canary prompts (:func:`covey.coordinator.verify.canaries.
    load_pool`); empty: the built-in grammar."""
    invite_only: bool = False
    """Sign-up needs an invite code (``covey invite create``); off: anyone may sign up."""
    proof_setups: dict[str, Path] = field(default_factory=dict)
    """Scoring model name → its proof setup folder (``covey model prove-setup``): the
    verifying key this coordinator checks every proof of that model with before paying."""
    max_keys_bytes: int = 16 * 2**20
    """Largest evaluation-key set a client may register for encrypted scoring (16 MiB; the
    bundled scheme's keys are ~3.7 MB)."""


class CoordinatorApp(FastAPI):
    """FastAPI with plain ASGI layers in front of its own stack (``front``, outermost
    first: each a class and its keyword arguments). The completion endpoints' common case
    is served there (:mod:`covey.coordinator.api.fast`), so it skips Starlette's and
    FastAPI's layers as well as the routing."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.front: list[tuple[type, dict[str, object]]] = []

    def build_middleware_stack(self) -> Any:
        """Starlette's stack (error handling, user middleware, routes) behind ``front``."""
        app = super().build_middleware_stack()
        for layer, options in reversed(self.front):
            app = layer(app, **options)
        return app


class ReplicaKeyMismatch(Exception):
    """A replica's identity key is not the one its shared ledger is signed with."""


def create_app(config: CoordinatorConfig | None = None) -> FastAPI:
    """Build the coordinator's ASGI app."""
    config = config or CoordinatorConfig()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    key = load_or_create(config.data_dir / "coordinator.key")
    ledger = Ledger(config.database_url or default_database_url(config.data_dir), key)
    signer = str(ledger.head()["public_key"])
    if signer != ledger.public_key:
        if config.nats_url:
            ledger.close()
            raise ReplicaKeyMismatch(
                f"this ledger is signed by coordinator key {signer[:16]}…, and this "
                f"replica's key is {ledger.public_key[:16]}…: replicas of one network share "
                f"one identity; copy the first replica's coordinator.key into "
                f"{config.data_dir}")
        log.warning("the ledger was signed by coordinator key %s; this coordinator signs "
                    "with %s from now on", signer[:16], ledger.public_key[:16])
    billing = Billing(Bank(ledger, config.bank), config.prices)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Jobs that were running when a previous coordinator died cannot finish: refund them
        # before serving, so no credit stays locked and none is charged twice.
        log.info("coordinator key %s (signs the ledger head and countersigns receipts)",
                 ledger.public_key)
        # Other replicas' running jobs keep their escrows: only this replica's own (left by
        # its previous run) and those of replicas whose lease expired are refunded.
        billing.bank.replica = replica_id(config.data_dir)
        lease = Lease(ledger, billing.bank.replica, config.lease_ttl)
        await asyncio.to_thread(lease.take)
        refunded = await asyncio.to_thread(refund_orphaned, billing.bank, billing.bank.replica)
        if refunded:
            log.warning("refunded %d escrows left open by a previous run or a dead replica",
                        refunded)
        duties = asyncio.create_task(run_duties(lease, billing))
        bus = shared = None
        if config.nats_url:
            bus = ReplicaBus(registry, billing.bank.replica, config.nats_url)
            await bus.start()
            shared = SharedUsage(bus, serving.limits, dispatcher)
            await shared.start()
            log.info("replica %s on the bus at %s", billing.bank.replica,
                     shown(config.nats_url))
        stakes = await asyncio.to_thread(ledger.balances_like, "stake:")
        for account, staked in stakes.items():
            registry.set_stake(account.removeprefix("stake:"), staked)
        yield
        if shared is not None:
            shared.close()
        if bus is not None:
            await bus.close()
        duties.cancel()
        verifier.close()
        await billing.drain()
        await asyncio.to_thread(lease.end)
        ledger.close()

    app = CoordinatorApp(title="Covey coordinator", version=__version__, lifespan=lifespan,
                         **_NO_OTEL)
    app.front = [(QueryKeyGuard, {})]  # outermost: a key in a URL goes no further
    if config.record_traffic is not None:
        app.front.append((TrafficRecorder, {"path": config.record_traffic}))
    app.front.append((FastInference, {"state": app.state}))
    registry = MinerRegistry(config.catalog)
    dispatcher = Dispatcher(registry, config.queue, config.bank.min_stake)
    app.state.config = config
    app.state.registry = registry
    app.state.dispatcher = dispatcher
    registry.on_change.append(Rebalancer(registry).changed)
    metrics = Metrics(queue_depth=dispatcher.waiting,
                      miners_online=lambda: len(registry.sessions),
                      jobs_running=lambda: sum(s.active for s in registry.sessions.values()))
    registry.evictions = lambda reason: metrics.evictions.labels(reason).inc()
    app.state.metrics = metrics
    text_trials, embedding_trials = split_reference_files(config.trials)
    verifier = Verifier(dispatcher, billing, config.checks, TrialBook(text_trials), metrics,
                        load_references(embedding_trials))
    app.state.verifier = verifier
    serving = Serving(dispatcher, billing, config.failover, metrics,
                      KeyLimits(config.key_limits), verifier.after_job)
    serving.score_keys = verifier.score_keys = KeyStore(config.data_dir / "score-keys",
                                                        config.max_keys_bytes)
    serving.proof_verifiers = load_verifiers(config.proof_setups)
    serving.on_false_proof = verifier.false_proof
    if config.checks.canary_rate > 0:
        async def send_canary(job: Generate) -> None:
            await serving.run_internal(job, CANARY_ACCOUNT, lambda cost: billing.ledger_call(
                fund_canary, billing.bank, job.job_id, cost))

        verifier.canaries = Canaries(
            config.checks.canary_rate, send_canary, config.canary_prompts,
            lambda: metrics.checks.labels("canary", "skipped").inc())
    app.state.serving = serving
    app.state.started_at = int(time.time())
    app.state.coordinator_key = ledger.public_key
    watermark_key = config.watermark_key or derive_key(key.encode())
    app.state.watermark_key = watermark_key
    install_error_handlers(app)
    # Room for the multipart envelope and the form's other fields around the file.
    app.add_middleware(BodyLimit, paths={TRANSCRIPTIONS: config.max_audio_bytes + 2**16,
                                         SCORE_KEYS: config.max_keys_bytes})
    app.include_router(models.router)
    app.include_router(chat.router)
    app.include_router(embeddings.router)
    app.include_router(transcriptions.router)
    app.include_router(speech.router)
    app.include_router(images.router)
    app.include_router(scores.router)
    app.include_router(accounts.router)
    app.include_router(keys.router)
    app.include_router(receipts.router)
    app.include_router(checks.router)
    app.include_router(ledger_api.router)
    app.include_router(sealed.router)
    app.include_router(watermark.router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/v1/miners/connect")
    async def miners_connect(ws: WebSocket) -> None:
        await serve_miner(ws, registry, config.heartbeat_interval, config.miner_timeout,
                          watermark_key)

    web = resources.files("covey.coordinator.web")
    index_html = web.joinpath("index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html, headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(packages=[("covey.coordinator", "web")]), name="static")
    return app
