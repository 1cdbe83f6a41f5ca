"""``covey proofs``: check the zero-knowledge proofs of a scoring answer offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

proofs_app = typer.Typer(help="Check zero-knowledge proofs of scores.", no_args_is_help=True)
out = Console()
err = Console(stderr=True, soft_wrap=True)


@proofs_app.command("verify")
def verify_cmd(
    answer: Annotated[Path, typer.Argument(help="The JSON answer of POST /v1/scores made "
                                           "with \"proof\": true.")],
    vk: Annotated[Path, typer.Option("--vk", help="The model's verifying key (vk.key of its "
                                     "proof setup).")],
    settings: Annotated[Path | None, typer.Option(
        help="The setup's settings.json (default: beside VK).")] = None,
    srs: Annotated[Path | None, typer.Option(
        help="The setup's kzg.srs (default: beside VK).")] = None,
) -> None:
    """Verify every proof in ANSWER against VK: each score must be what the committed model
    computes from that item's input. Needs no network and no proving key (setup.json is read
    from beside VK). Exit 0 when all verify, 1 when one does not."""
    try:
        data = json.loads(answer.read_text())
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] cannot read {answer} as JSON: {exc}")
        raise typer.Exit(2) from exc
    from covey.scoring.proofs import ProofError, verify_answer

    try:
        scores = verify_answer(data, vk, settings=settings, srs=srs)
    except ImportError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except ProofError as exc:
        err.print(f"[red]proof check failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    for item, score in zip(data["data"], scores, strict=True):
        out.print(f"item {item.get('index', '?')}: score {score:.6f} verified")
    err.print(f"[green]all {len(scores)} proofs verify[/green] against {vk}")
