"""``covey receipts``: fetch a request's receipt and check its signatures offline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from covey.cli_money import call_api
from covey.protocol.receipts import Receipt, verify_countersignature, verify_receipt

receipts_app = typer.Typer(help="Signed receipts of requests.", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REQUEST_ID = re.compile(r"^(chat)?cmpl-[0-9a-f]+$")


def _not_a_receipt(why: str) -> NoReturn:
    err.print(f"[red]✗[/red] not a receipt: {why}")
    raise typer.Exit(1)


def _load(source: str, url: str, api_key: str | None) -> dict:
    """A receipt from a file, or fetched when ``source`` is a request id."""
    if _REQUEST_ID.match(source) and not Path(source).exists():
        return call_api("GET", f"{url}/v1/receipts/{source}", api_key)
    path = Path(source)
    if not path.is_file():
        err.print(f"[red]error:[/red] {source}: no such file (nor a request id like "
                  "chatcmpl-…)")
        raise typer.Exit(2)
    try:
        body = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError):
        _not_a_receipt(f"{source} is not JSON")
    if not isinstance(body, dict):
        _not_a_receipt("expected a JSON object")
    return body


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
    """Check a receipt's signatures (miner's and coordinator's); exit 1 if one fails."""
    if coordinator is not None and not _HEX64.match(coordinator.lower()):
        err.print("[red]error:[/red] --coordinator must be a public key: 64 hex digits")
        raise typer.Exit(2)
    body = _load(source, url, api_key)
    coordinator = coordinator.lower() if coordinator else None
    # A sharded model's request has a receipt per shard: each must hold.
    parts = body.get("shards") if isinstance(body.get("shards"), list) else [body]
    failed = False
    for part in parts:
        if not isinstance(part, dict):
            _not_a_receipt("expected a JSON object")
        failed |= not _verify_one(part, coordinator, shard="shards" in body)
    if failed:
        raise typer.Exit(1)


def _verify_one(body: dict, coordinator: str | None, shard: bool = False) -> bool:
    """Check one receipt object's two signatures, printing the verdict (a ``shard``'s
    receipt counts positions and steps where others count tokens)."""
    try:
        receipt = Receipt.model_validate(body["receipt"])
        miner_sig, counter_sig = body["miner_signature"], body["coordinator_signature"]
        signer = str(body["coordinator"]).lower()
    except KeyError as exc:
        _not_a_receipt(f"the field {exc} is missing")
    except ValidationError as exc:
        first = exc.errors()[0]
        _not_a_receipt(f"receipt.{'.'.join(map(str, first['loc']))}: {first['msg']}")
    except TypeError:
        _not_a_receipt("expected a JSON object")
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
        return False
    usage = (f"{receipt.prompt_tokens} positions in {receipt.completion_tokens} steps"
             if shard else f"{receipt.prompt_tokens} prompt + {receipt.completion_tokens} "
             "completion tokens")
    out.print(f"[green]receipt OK[/green]: job {receipt.job_id}, miner {receipt.miner[:16]}…, "
              f"model {receipt.model_sha256[:12]}…, {usage}; coordinator {signer[:16]}…")
    return True
