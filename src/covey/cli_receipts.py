"""``covey receipts``: fetch a request's receipt and check its signatures offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from covey.cli_money import call_api
from covey.protocol.receipts import Receipt, verify_countersignature, verify_receipt

receipts_app = typer.Typer(help="Signed receipts of requests.", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@receipts_app.command()
def get(job_id: Annotated[str, typer.Argument(help="The request id (a completion's 'id').")],
        url: Annotated[str, typer.Option(help="Coordinator base URL.")] = (
            "http://127.0.0.1:8000"),
        api_key: Annotated[str | None, typer.Option(envvar="COVEY_API_KEY",
                                                    help="API key of the request's account.")
                           ] = None) -> None:
    """Print a request's receipt as JSON (save it to verify it later, anywhere)."""
    out.print_json(json.dumps(call_api("GET", f"{url}/v1/receipts/{job_id}", api_key)))


@receipts_app.command()
def verify(
    source: Annotated[str, typer.Argument(help="A receipt JSON file, or a request id to "
                                          "fetch from --url.")],
    url: Annotated[str, typer.Option(help="Coordinator base URL (for an id).")] = (
        "http://127.0.0.1:8000"),
    api_key: Annotated[str | None, typer.Option(envvar="COVEY_API_KEY",
                                                help="API key (for an id).")] = None,
    coordinator: Annotated[str | None, typer.Option(
        help="The coordinator public key (hex) to require; default: the one in the "
             "receipt.")] = None,
) -> None:
    """Check a receipt's miner signature and the coordinator's countersignature; exit 1 if
    either fails (any changed byte does)."""
    path = Path(source)
    try:
        body = (json.loads(path.read_text()) if path.is_file()
                else call_api("GET", f"{url}/v1/receipts/{source}", api_key))
        receipt = Receipt.model_validate(body["receipt"])
        miner_sig, counter_sig = body["miner_signature"], body["coordinator_signature"]
        signer = body["coordinator"]
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        err.print(f"[red]✗[/red] not a receipt: {exc}")
        raise typer.Exit(1) from None
    problems = []
    if not verify_receipt(receipt, miner_sig):
        problems.append(f"the miner signature does not match (miner {receipt.miner[:16]}…)")
    if coordinator and coordinator != signer:
        problems.append(f"countersigned by {signer[:16]}…, not the required {coordinator[:16]}…")
    if not verify_countersignature(receipt, miner_sig, signer, counter_sig):
        problems.append("the coordinator countersignature does not match")
    for problem in problems:
        err.print(f"[red]✗[/red] {problem}")
    if problems:
        raise typer.Exit(1)
    out.print(f"[green]receipt OK[/green]: job {receipt.job_id}, miner {receipt.miner[:16]}…, "
              f"model {receipt.model_sha256[:12]}…, {receipt.prompt_tokens} prompt + "
              f"{receipt.completion_tokens} completion tokens; coordinator {signer[:16]}…")
