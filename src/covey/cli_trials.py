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
