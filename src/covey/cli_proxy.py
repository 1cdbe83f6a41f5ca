"""``covey proxy``: serve the OpenAI API on loopback, every request end-to-end encrypted."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)


def _private_models(specs: list[str]) -> dict[str, object]:
    """``NAME=KEYFILE:PLAIN.gguf`` specs → codecs; exits with a message on a bad one."""
    if not specs:
        return {}
    from covey.client.private import PrivateModel
    from covey.miner.models import ModelNotFound, resolve_model
    from covey.protocol.permutation import KeyFileError

    out: dict[str, object] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        key_file, _, plain = rest.partition(":")
        if not name or not key_file or not plain:
            err.print(f"[red]error:[/red] --private {spec!r}: expected NAME=KEYFILE:PLAIN.gguf")
            raise typer.Exit(2)
        try:
            # PLAIN may be a bundled model's name, as for `covey model private`.
            out[name] = PrivateModel.from_key_file(Path(key_file), resolve_model(plain).path)
        except (OSError, ValueError, KeyFileError, ModelNotFound) as exc:
            err.print(f"[red]error:[/red] --private {spec!r}: {exc}")
            raise typer.Exit(2) from None
    return out


def proxy(
    coordinator: Annotated[str, typer.Option(help="Coordinator base URL.")
                           ] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="COVEY_API_KEY",
                                                help="API key (default: .covey/api_key).")
                       ] = None,
    host: Annotated[str, typer.Option(help="Address to serve on; keep it loopback: the "
                                      "proxy spends its key for anyone who reaches it.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8787,
    private: Annotated[list[str], typer.Option(
        help="A private model: NAME=KEYFILE:PLAIN.gguf (the key it was made with and the "
             "original GGUF, whose tokenizer runs here). Repeatable.")] = [],  # noqa: B006
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve OpenAI's API on HOST:PORT; each request is sealed to the miner the coordinator
    routes it to, so the coordinator never sees prompts or answers. Point any OpenAI client
    at http://HOST:PORT/v1."""
    import uvicorn

    from covey.cli_money import resolve_key
    from covey.client.proxy import create_proxy_app

    key = resolve_key(api_key)
    if key is None:
        err.print("[red]error:[/red] no API key: pass --api-key, set COVEY_API_KEY, or run "
                  "`covey up` (which writes a development key)")
        raise typer.Exit(2)
    codecs = _private_models(private)
    app = create_proxy_app(coordinator, key, codecs)  # type: ignore[arg-type]
    err.print(f"covey proxy: http://{host}:{port}/v1 → {coordinator} (end-to-end encrypted)"
              + (f"; private models: {', '.join(sorted(codecs))}" if codecs else ""))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def sealed_chat(url: str, api_key: str | None, model: str, messages: list[dict[str, str]],
                max_tokens: int, temperature: float | None) -> None:
    """``covey chat --sealed``: stream one end-to-end encrypted answer to stdout."""
    import asyncio
    import sys

    from covey.client.sealed import SealedChannel
    from covey.protocol.errors import ApiError
    from covey.protocol.frames import ChatMessage, Generate, SamplingParams

    if api_key is None:
        err.print("[red]error:[/red] no API key: pass --api-key or set COVEY_API_KEY")
        raise typer.Exit(2)
    job = Generate(job_id="", model=model,
              messages=tuple(ChatMessage(role=m["role"], content=m["content"])
                             for m in messages),
              params=SamplingParams(max_tokens=max_tokens,
                                    temperature=1.0 if temperature is None else temperature))

    async def run() -> None:
        channel = SealedChannel(url, api_key)
        try:
            async for piece in channel.stream(job):
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:
            await channel.close()

    try:
        asyncio.run(run())
    except ApiError as exc:
        err.print(f"\n[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
    sys.stdout.write("\n")
