"""The ``covey`` command: up, coordinator, miner, chat.

Only this module and ``cli_up`` import typer and rich; the core packages stay free of them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from covey.logs import setup_logging
from covey.miner.backends.base import Backend, EmbeddingBackend, ShardBackendBase
from covey.miner.backends.registry import ModelSettings, build
from covey.miner.models import BUNDLED_MODEL

app = typer.Typer(help="Covey: an open network for decentralized AI inference.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True, soft_wrap=True)

DataDir = Annotated[Path, typer.Option(help="Where state, keys and logs are kept.")]


def _logging(level: str, fmt: str = "text") -> None:
    try:
        setup_logging(level, fmt)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


LogFormat = Annotated[str, typer.Option(help="json (one object per line) or text.")]


@app.command()
def coordinator(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    data_dir: DataDir = Path(".covey"),
    queue_size: Annotated[int, typer.Option(help="Requests that may wait per model when "
                                            "every miner slot is busy; more get 429.")] = 64,
    queue_timeout: Annotated[float, typer.Option(help="Seconds a request may wait.")] = 120.0,
    stall_timeout: Annotated[float, typer.Option(
        min=0.1, help="Seconds a running job may go without a frame from its miner before "
        "it moves to another.")] = 30.0,
    max_tries: Annotated[int, typer.Option(min=1, help="Miners a job may run on in all "
                                           "(failover).")] = 3,
    miner_timeout: Annotated[float, typer.Option(
        min=0.5, help="Seconds of silence after which a miner is evicted.")] = 6.0,
    max_audio_mb: Annotated[float, typer.Option(
        min=0.001, help="Largest audio upload for a transcription, MiB (OpenAI's is 25).")
    ] = 25.0,
    key_concurrency: Annotated[int, typer.Option(
        min=0, help="Requests one API key may have open at once (0: no limit).")] = 32,
    key_rpm: Annotated[int, typer.Option(
        min=0, help="Requests one API key may start per minute (0: no limit).")] = 6000,
    database_url: Annotated[str | None, typer.Option(
        help="Ledger database (default: SQLite in DATA_DIR), e.g. "
             "postgresql+psycopg://user@host/db.")] = None,
    grant: Annotated[int, typer.Option(help="µcr the faucet gives each new account.")
                     ] = 10_000_000,
    invite_only: Annotated[bool, typer.Option(
        "--invite-only", help="Sign-up needs an invite code (make them with `covey invite "
        "create`).")] = False,
    fee_bps: Annotated[int, typer.Option(min=0, max=10_000, help="Protocol fee in basis "
                                         "points of a miner's pay.")] = 500,
    min_stake: Annotated[int, typer.Option(min=0, help="µcr a miner must have staked to "
                                           "receive paid jobs.")] = 0,
    price: Annotated[list[str] | None, typer.Option(
        help="Floor price of a model: MODEL=PROMPT,COMPLETION in µcr per 1M tokens "
             "(repeatable); others get 100000,200000.")] = None,
    unbonding: Annotated[float, typer.Option(min=0, help="Seconds unstaked credits stay "
                                             "locked.")] = 7 * 24 * 3600,
    check_rate: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Share of jobs re-checked by a validator miner (default "
        "0.05; also the chat rate unless --chat-check-rate is given).")] = None,
    chat_check_rate: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Share of text generation jobs re-checked (default: "
        "--check-rate when given, else 0.005, with canaries watching too).")] = None,
    nats_url: Annotated[str | None, typer.Option(
        help="NATS server shared by the replicas of this network (with a shared "
             "--database-url): each replica routes to the miners connected to the others, "
             "e.g. nats://127.0.0.1:4222, or nats://user:password@host:4222 for a server "
             "that asks for credentials (never logged).")] = None,
    lease_ttl: Annotated[float, typer.Option(
        min=1.0, help="Seconds this coordinator's lease on a shared ledger lasts unless "
        "renewed: after a replica dies, another refunds its open escrows once it expires.")
    ] = 15.0,
    canary_rate: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Covert greedy canary jobs sent per user text job, each "
        "re-checked (0: none).")] = 0.024,
    canary_prompts: Annotated[Path | None, typer.Option(
        help="The network's private canary prompts: one per line, or JSON lines with "
             "'messages' (default: a built-in grammar, public).")] = None,
    slash_bps: Annotated[int, typer.Option(
        min=0, max=10_000, help="Basis points of a miner's stake slashed per failed check."
    )] = 1000,
    trial: Annotated[bool, typer.Option(
        help="Hold each new miner until it passes a trial task (turn off only for networks "
             "of trusted miners, or load tests).")] = True,
    trials: Annotated[list[Path] | None, typer.Option(
        help="Trial reference file (from 'covey trials record' or 'covey trials "
             "record-embeddings'; repeatable); the bundled models' are built in.")] = None,
    watermark: Annotated[list[str] | None, typer.Option(
        help="Watermark every answer of this model, asked for or not (repeatable).")] = None,
    watermark_key: Annotated[Path | None, typer.Option(
        help="File holding the network's watermark key (64 hex digits; default: derived "
             "from the coordinator's identity key).")] = None,
    record_traffic: Annotated[Path | None, typer.Option(
        help="Append every request body and WebSocket message received and sent to this "
             "file, for `covey audit` (test networks: it holds every plain prompt).")] = None,
    proof_setup: Annotated[list[str] | None, typer.Option(
        help="MODEL=DIR: check every proof of scoring model MODEL with the verifying key in "
             "DIR (made by `covey model prove-setup`; repeatable).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    log_format: LogFormat = "json",
    access_log: Annotated[bool, typer.Option(help="uvicorn's access log too (the request "
                                             "log already has a line per request).")
                          ] = False,
) -> None:
    """Run a coordinator: the OpenAI-compatible API, the miners' WebSocket and the web page."""
    import uvicorn

    from covey.coordinator.app import CoordinatorConfig, ReplicaKeyMismatch, create_app
    from covey.coordinator.failover import FailoverPolicy
    from covey.coordinator.quotas import KeyLimitPolicy
    from covey.coordinator.router import QueuePolicy
    from covey.coordinator.verify.embeddings import load_references, split_reference_files
    from covey.coordinator.verify.judge import CheckPolicy
    from covey.coordinator.verify.trials import TrialBook

    _logging(log_level, log_format)
    try:
        text_trials, embedding_trials = split_reference_files(tuple(trials or ()))
        TrialBook(text_trials)
        load_references(embedding_trials)
    except OSError as exc:
        err.print(f"[red]error:[/red] --trials: {exc}")
        raise typer.Exit(2) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        err.print(f"[red]error:[/red] --trials: not a trial reference file ({exc!r}); write "
                  "one with `covey trials record MODEL.gguf` (or `record-embeddings`)")
        raise typer.Exit(2) from None
    from covey.coordinator.ledger.bank import BankPolicy
    from covey.coordinator.ledger.pricing import Price

    prices: dict[str, Price] = {}
    for spec in price or []:
        model_name, _, pair = spec.partition("=")
        try:
            prompt_p, completion_p = (int(x) for x in pair.split(","))
            if not model_name or prompt_p < 0 or completion_p < 0:
                raise ValueError
        except ValueError:
            err.print(f"[red]error:[/red] --price {spec!r}: expected MODEL=PROMPT,COMPLETION "
                      "(µcr per 1M tokens, whole numbers)")
            raise typer.Exit(2) from None
        prices[model_name] = Price(prompt_p, completion_p)
    pool: tuple = ()
    if canary_prompts is not None:
        from covey.coordinator.verify.canaries import load_pool
        try:
            pool = tuple(load_pool(canary_prompts))
        except (OSError, ValueError) as exc:
            err.print(f"[red]error:[/red] --canary-prompts {canary_prompts}: {exc}")
            raise typer.Exit(2) from None
    if nats_url is not None:
        if database_url is None or not database_url.startswith("postgresql"):
            err.print("[red]error:[/red] --nats-url joins replicas of one network, which "
                      "share one ledger: give the same --database-url "
                      "(postgresql+psycopg://…) to every replica")
            raise typer.Exit(2)
        problem = _unreachable(nats_url, "nats", 4222)
        if problem:
            from covey.coordinator.remote import shown
            err.print(f"[red]error:[/red] --nats-url {shown(nats_url)}: {problem}")
            raise typer.Exit(2)
    wm_key = _watermark_key(watermark_key) if watermark_key else None
    setups: dict[str, Path] = {}
    for spec in proof_setup or []:
        model_name, _, folder = spec.partition("=")
        if not model_name or not (Path(folder) / "vk.key").is_file():
            err.print(f"[red]error:[/red] --proof-setup {spec!r}: expected MODEL=DIR, DIR "
                      "holding vk.key, settings.json, kzg.srs and setup.json (`covey model "
                      "prove-setup`)")
            raise typer.Exit(2)
        setups[model_name] = Path(folder)

    config = CoordinatorConfig(data_dir=data_dir, miner_timeout=miner_timeout,
                               heartbeat_interval=min(2.0, miner_timeout / 3),
                               failover=FailoverPolicy(max_tries, stall_timeout),
                               key_limits=KeyLimitPolicy(key_concurrency, key_rpm),
                               database_url=database_url, prices=prices,
                               bank=BankPolicy(grant=grant, fee_bps=fee_bps,
                                               min_stake=min_stake, unbonding_s=unbonding),
                               queue=QueuePolicy(max_waiting=queue_size, timeout=queue_timeout),
                               checks=CheckPolicy(
                                   rate=0.05 if check_rate is None else check_rate,
                                   chat_rate=(chat_check_rate if chat_check_rate is not None
                                              else check_rate if check_rate is not None
                                              else 0.005),
                                   canary_rate=canary_rate, slash_bps=slash_bps,
                                   trials=trial),
                               canary_prompts=pool, lease_ttl=lease_ttl,
                               nats_url=nats_url,
                               trials=tuple(trials or ()), watermark_key=wm_key,
                               watermark_models=frozenset(watermark or ()),
                               max_audio_bytes=int(max_audio_mb * 2**20),
                               record_traffic=record_traffic, invite_only=invite_only,
                               proof_setups=setups)
    try:
        coordinator_app = create_app(config)
    except ReplicaKeyMismatch as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    uvicorn.run(coordinator_app, host=host, port=port, log_level=log_level.lower(),
                timeout_graceful_shutdown=3, log_config=None, access_log=access_log,
                # miner frames are small JSON: compressing them costs CPU and saves little
                ws_per_message_deflate=False)


def _unreachable(url: str, scheme: str, default_port: int) -> str | None:
    """Why ``url`` (``scheme://host[:port]``) cannot be reached by TCP now, or None."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.hostname:
        return f"expected {scheme}://HOST[:PORT]"
    try:
        socket.create_connection((parts.hostname, parts.port or default_port), 3).close()
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"
    return None


@app.command()
def miner(
    coordinator: Annotated[list[str] | None, typer.Option(
        help="Coordinator base URL (default http://127.0.0.1:8000); repeat for replicas of "
             "one network, tried in turn when the connection is lost.")] = None,
    model: Annotated[list[str] | None, typer.Option(
        help="A bundled model name (smollm2-135m-instruct, all-minilm-l6-v2, "
             "whisper-tiny.en, hibari), a path to a .gguf file or a model folder "
             "(sentence-transformers, diffusers, CTranslate2 whisper), or a Hugging Face reference "
             "(hf:ORG/REPO[@REVISION]/FILE.gguf, hf:ORG/REPO[@REVISION]). Repeat to serve "
             f"several models from one process. Default: {BUNDLED_MODEL}.")] = None,
    slots: Annotated[int, typer.Option(min=1, max=1024, help="Jobs run at once, per model.")
                     ] = 1,
    name: Annotated[str | None, typer.Option(help="Name to serve a path under (one --model "
                                             "only).")] = None,
    key: Annotated[Path | None, typer.Option(help="Identity key file (default: "
                                             "DATA_DIR/miner.key, made on first run).")] = None,
    data_dir: DataDir = Path(".covey"),
    ctx: Annotated[int, typer.Option(help="Context length in tokens.")] = 4096,
    threads: Annotated[int | None, typer.Option(help="CPU threads per slot.")] = None,
    gpu_layers: Annotated[int, typer.Option(help="Layers to offload to a GPU.")] = 0,
    stream_interval: Annotated[float, typer.Option(
        help="Seconds between streamed frames after the first token (0: every token).")
    ] = 0.02,
    ask_prompt: Annotated[int, typer.Option(min=0, help="Asking price, µcr per 1M prompt "
                                            "tokens (the network floor applies if higher).")
                          ] = 0,
    ask_completion: Annotated[int, typer.Option(min=0, help="Asking price, µcr per 1M "
                                                "completion tokens.")] = 0,
    backend: Annotated[str, typer.Option(
        help="auto (llama.cpp for a GGUF file, transformers with --blocks; "
             "sentence-transformers, diffusers, faster-whisper or hibari by a model "
             "folder's files), transformers (the model as one shard), or synthetic: "
             "deterministic filler text with no model, for load tests only (served as "
             "--name, default 'synthetic').")] = "auto",
    tokens_per_second: Annotated[float, typer.Option(
        min=0, help="Synthetic backend: tokens per second per job (0: unthrottled).")] = 50.0,
    blocks: Annotated[str | None, typer.Option(
        help="Serve a shard: blocks START:END of the model (e.g. 0:15; 15: runs to the "
             "last block), on the transformers backend. The coordinator chains shards "
             "that together hold the whole model.")] = None,
    rebalance: Annotated[bool, typer.Option(
        help="With --blocks: let the coordinator move this shard to blocks of the model "
             "that no miner holds (it reloads and reconnects).")] = False,
    activations: Annotated[str, typer.Option(
        help="A shard's hidden states on the wire: float32, float16 or bfloat16 (half "
             "the bytes).")] = "float32",
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    log_format: LogFormat = "text",
) -> None:
    """Run a miner: serve models to a coordinator, connecting out (works behind NAT)."""
    from covey.miner.agent import HelloRefused, MinerAgent
    from covey.miner.backends.registry import (
        BUILDERS,
        BackendUnavailable,
        ModelSettings,
        parse_blocks,
    )
    from covey.miner.models import ModelNotFound
    from covey.protocol.identity import IdentityError, load_or_create

    _logging(log_level, log_format)
    if backend != "auto" and backend not in BUILDERS:
        err.print(f"[red]error:[/red] --backend {backend!r}: expected auto or one of "
                  f"{', '.join(BUILDERS)}")
        raise typer.Exit(2)
    urls = coordinator or ["http://127.0.0.1:8000"]
    specs = model or ([] if backend == "synthetic" else [BUNDLED_MODEL])
    if name is not None and len(specs) > 1:
        err.print("[red]error:[/red] --name names one model; serve several models under "
                  "their own names")
        raise typer.Exit(2)
    try:
        shard = parse_blocks(blocks) if blocks is not None else None
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if shard is not None and backend == "auto":
        backend = "transformers"
    base = ModelSettings(name or "synthetic", slots=slots, ctx=ctx, threads=threads,
                         gpu_layers=gpu_layers, stream_interval=stream_interval,
                         ask_prompt=ask_prompt, ask_completion=ask_completion,
                         tokens_per_second=tokens_per_second, blocks=shard,
                         activations=activations, rebalance=rebalance)
    served: list[Backend] = []
    try:
        signing_key = load_or_create(key or data_dir / "miner.key")
        if backend == "synthetic":
            served.append(build("synthetic", base))
        for spec in specs if backend != "synthetic" else []:
            served.append(_serve(spec, name, backend, base, data_dir))
        agent = MinerAgent(urls, signing_key, served)
    except (IdentityError, ModelNotFound, BackendUnavailable, ValueError) as exc:
        for b in served:
            b.close()
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    for b in served:
        err.print(f"miner {agent.miner_id[:16]}… serving {b.offer.name} ({b.offer.kind}) via "
                  f"{b.offer.backend} ({b.offer.sha256[:12]}…, {b.slots} slot(s)) to "
                  f"{' or '.join(urls)}")

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    try:
        asyncio.run(serve())
    except HelloRefused as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        for b in served:
            b.close()


def _serve(spec: str, name: str | None, backend: str, base: ModelSettings, data_dir: Path
           ) -> Backend:
    """Resolve one ``--model`` and build its backend (the test-only adversary wrapping it
    when asked).

    Raises:
        ModelNotFound, BackendUnavailable, ValueError: see
            :func:`~covey.miner.backends.registry.build`.
    """
    from dataclasses import replace

    from covey.miner.backends import adversary
    from covey.miner.backends.registry import backend_for
    from covey.miner.models import resolve_model, weights_sha256

    model_file = resolve_model(spec, name)
    kind = backend_for(model_file.path) if backend == "auto" else backend
    sha = weights_sha256(model_file.path, data_dir)
    path = model_file.path
    fake = adversary.claimed_path()
    if fake is not None:  # TEST ONLY: other weights under the same name and digest
        path = fake
    served = _maybe_adversary(build(kind, replace(base, name=model_file.name, path=path,
                                                   sha256=sha)))
    other = adversary.sleeper_path()
    if other is not None:  # TEST ONLY: the real weights for trials, others for the rest
        return adversary.Sleeper(served, build(kind, replace(base, name=model_file.name,
                                                             path=other, sha256=sha)))
    return served


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    url: Annotated[str, typer.Option(help="Coordinator base URL.")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="Model name.")] = BUNDLED_MODEL,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Cap on answer tokens.")] = 512,
    temperature: Annotated[float | None, typer.Option(help="0 for greedy.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="COVEY_API_KEY",
                                                help="API key (default: .covey/api_key).")
                       ] = None,
    sealed: Annotated[bool, typer.Option(help="Encrypt end to end: only the serving miner "
                                         "(and a validator, if it is re-checked) sees it.")
                      ] = False,
) -> None:
    """Ask a model and stream the answer to the terminal."""
    import httpx

    from covey.cli_money import resolve_key
    from covey.client import ChatError, stream_chat

    api_key = resolve_key(api_key)
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": prompt})
    if sealed:
        from covey.cli_proxy import sealed_chat

        sealed_chat(url, api_key, model, messages, max_tokens, temperature)
        return
    try:
        for piece in stream_chat(url, model, messages, api_key=api_key, max_tokens=max_tokens,
                                 temperature=temperature):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ChatError as exc:
        err.print(f"\n[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        err.print(f"\n[red]error:[/red] cannot reach {url}: {exc}. Is `covey up` running?")
        raise typer.Exit(1) from exc
    sys.stdout.write("\n")


def _watermark_key(path: Path) -> bytes:
    """The watermark key in ``path`` (hex); exits with a message when it is not one."""
    from covey.protocol.watermark import parse_key

    try:
        return parse_key(path.read_text())
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] --watermark-key {path}: {exc}")
        raise typer.Exit(2) from None


def _maybe_adversary(served: Backend) -> Backend:
    """TEST ONLY: wrap ``served`` in a cheating backend when the test harness asks for one
    (see :mod:`covey.miner.backends.adversary`)."""
    from covey.miner.backends import adversary

    mode = adversary.mode()
    if mode is None:
        return served
    logging.getLogger("covey.miner").warning(
        "TEST-ONLY ADVERSARY MODE %s=%s: this miner cheats on purpose and will be slashed",
        adversary.ENV, ":".join(mode))
    if mode[0] == "wrong-model":
        return served
    if mode[0] == "sleeper":
        return served  # built with its other weights beside it, in _serve
    if isinstance(served, EmbeddingBackend):
        return adversary.AdversaryEmbedding(served, mode[0])
    if isinstance(served, ShardBackendBase):
        from covey.miner.backends.adversary_shard import AdversaryShard

        return AdversaryShard(served, mode[0], mode[1])
    from covey.miner.backends import adversary_media

    media = adversary_media.wrap(served, mode[0])
    if media is not None:
        return media
    from covey.miner.backends.llama_cpp import LlamaCppBackend

    if not isinstance(served, LlamaCppBackend):
        raise typer.BadParameter("adversary modes need the llama.cpp backend")
    llm = served._slots[0].llm
    return adversary.AdversaryBackend(served, mode[0], mode[1], lambda t: served._piece(llm, t),
                                      llm.n_vocab())


def _register_up() -> None:
    from covey.cli_audit import audit
    from covey.cli_invite import invite_app
    from covey.cli_model import model_app
    from covey.cli_money import ledger_app, signup, wallet
    from covey.cli_proofs import proofs_app
    from covey.cli_proxy import proxy
    from covey.cli_receipts import receipts_app
    from covey.cli_score import score
    from covey.cli_trials import trials_app
    from covey.cli_up import up

    app.command()(up)
    app.command()(signup)
    app.command()(proxy)
    app.command()(audit)
    app.command()(score)
    app.add_typer(wallet, name="wallet")
    app.add_typer(ledger_app, name="ledger")
    app.add_typer(receipts_app, name="receipts")
    app.add_typer(trials_app, name="trials")
    app.add_typer(model_app, name="model")
    app.add_typer(invite_app, name="invite")
    app.add_typer(proofs_app, name="proofs")


_register_up()


def main() -> None:
    """Entry point of the ``covey`` script."""
    app()
