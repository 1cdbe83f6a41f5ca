"""``covey trials``: record the reference answers a coordinator checks new miners against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

trials_app = typer.Typer(help="Trial tasks for miners joining a network.",
                         no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True)


@trials_app.command("record")
def record_cmd(
    model: Annotated[str, typer.Argument(help="A bundled model name or a path to a .gguf.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON file to write (merged "
                                         "with its entries for other models if it exists).")
                      ] = Path("trials.json"),
    data_dir: Annotated[Path, typer.Option(help="Where the weights hash is cached.")
                        ] = Path(".covey"),
) -> None:
    """Answer the trial prompts greedily with MODEL and write them, with the margin of each
    token, as references: pass the file to `covey coordinator --trials`."""
    from covey.coordinator.verify.trials import TRIAL_MAX_TOKENS, TRIAL_PROMPTS
    from covey.miner.models import ModelNotFound, resolve_model, weights_sha256

    try:
        model_file = resolve_model(model)
    except ModelNotFound as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    try:
        from covey.miner.backends.llama_cpp import LlamaCppBackend, LlamaCppConfig
        from covey.miner.trials import record_sync
    except ImportError as exc:
        err.print("[red]error:[/red] recording needs the llama.cpp backend: "
                  "pip install 'covey\\[llama]'")
        raise typer.Exit(2) from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    sha = weights_sha256(model_file.path, data_dir)
    backend = LlamaCppBackend(model_file, sha, 1, LlamaCppConfig(n_ctx=512))
    try:
        refs = record_sync(backend, TRIAL_PROMPTS, TRIAL_MAX_TOKENS)
    finally:
        backend.close()
    book = json.loads(output.read_text()) if output.exists() else {}
    book[sha] = refs
    output.write_text(json.dumps(book, indent=1) + "\n")
    low = min(min(r["margins"]) for r in refs)  # type: ignore[type-var]
    err.print(f"wrote {len(refs)} references for {model_file.name} ({sha[:12]}…) to {output};"
              f" smallest margin {low:.2f} logits")


@trials_app.command("record-embeddings")
def record_embeddings_cmd(
    model: Annotated[str, typer.Argument(help="A bundled embedding model name, a model "
                                         "folder or an hf:ORG/REPO reference.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON file to write (merged "
                                         "with its entries for other models if it exists).")
                      ] = Path("embedding_trials.json"),
    data_dir: Annotated[Path, typer.Option(help="Where the weights hash is cached.")
                        ] = Path(".covey"),
) -> None:
    """Embed the trial inputs with MODEL and write the vectors as its reference (the
    bundled model's ships with the coordinator)."""
    import asyncio

    from covey.coordinator.verify.embeddings import TRIAL_INPUTS
    from covey.miner.backends.registry import BackendUnavailable, ModelSettings, build
    from covey.miner.models import ModelNotFound, resolve_model, weights_sha256
    from covey.protocol import Embed
    from covey.protocol.embed import unpack_vectors

    try:
        model_file = resolve_model(model)
        data_dir.mkdir(parents=True, exist_ok=True)
        sha = weights_sha256(model_file.path, data_dir)
        backend = build("sentence-transformers", ModelSettings(
            model_file.name, model_file.path, sha, threads=1))
    except (ModelNotFound, BackendUnavailable, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    try:
        got = asyncio.run(backend.embed(Embed(  # type: ignore[attr-defined]
            job_id="trial", model=model_file.name, input=TRIAL_INPUTS)))
    finally:
        backend.close()
    vectors = [[round(x, 7) for x in row] for row in unpack_vectors(got.vectors, got.dimensions)]
    book = json.loads(output.read_text()) if output.exists() else {}
    book[sha] = {"inputs": list(TRIAL_INPUTS), "vectors": vectors,
                 "prompt_tokens": got.prompt_tokens}
    output.write_text(json.dumps(book) + "\n")
    err.print(f"wrote the reference vectors of {model_file.name} ({sha[:12]}…, "
              f"{got.dimensions} dimensions) to {output}")
