"""``covey signup``, ``covey wallet …`` and ``covey ledger verify``."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True, soft_wrap=True)

DEV_KEY_FILE = Path(".covey") / "api_key"
"""Where `covey up` leaves its dev key, read when neither --api-key nor COVEY_API_KEY is set."""

Url = Annotated[str, typer.Option(help="Coordinator base URL.")]
ApiKey = Annotated[str | None, typer.Option(envvar="COVEY_API_KEY",
                                            help="API key (default: .covey/api_key).")]

wallet = typer.Typer(help="Your balance, history and transfers.", no_args_is_help=True)
ledger_app = typer.Typer(help="Audit the ledger.", no_args_is_help=True)


def resolve_key(api_key: str | None) -> str | None:
    """--api-key / COVEY_API_KEY, else the dev key `covey up` wrote, else None."""
    if api_key:
        return api_key
    if DEV_KEY_FILE.is_file():
        return DEV_KEY_FILE.read_text().strip()
    return None


def credits(ucr: int) -> str:
    """µcr as credits with 6 decimals."""
    return f"{ucr / 1_000_000:,.6f}"


def call_api(method: str, url: str, api_key: str | None, **kw: object) -> dict:
    """``method url`` with the API key; the JSON body, or exit 1 with the API's message
    (exit 2 without a key)."""
    key = resolve_key(api_key)
    if not key:
        err.print("[red]error:[/red] no API key: pass --api-key, set COVEY_API_KEY or run "
                  "`covey signup`")
        raise typer.Exit(2)
    try:
        r = httpx.request(method, url, headers={"Authorization": f"Bearer {key}"},
                          timeout=30, **kw)  # type: ignore[arg-type]
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] cannot reach {url}: {exc}")
        raise typer.Exit(1) from exc
    body = r.json()
    if r.status_code >= 400:
        err.print(f"[red]error:[/red] {body.get('error', {}).get('message', r.text)}")
        raise typer.Exit(1)
    return body


def signup(url: Url = "http://127.0.0.1:8000",
           save: Annotated[bool, typer.Option(help="Also write the key to .covey/api_key.")
                           ] = False,
           invite: Annotated[str | None, typer.Option(
               help="Invite code (an invite-only network refuses sign-up without one).")
           ] = None) -> None:
    """Create an account and print its API key (shown once)."""
    try:
        r = httpx.post(f"{url}/v1/accounts", timeout=30,
                       json={"invite_code": invite} if invite else None)
        body = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        err.print(f"[red]error:[/red] cannot reach {url}: {exc}")
        raise typer.Exit(1) from exc
    if r.status_code >= 400:
        err.print(f"[red]error:[/red] {body.get('error', {}).get('message', r.text)}")
        raise typer.Exit(1)
    out.print(f"account {body['id']}, balance {credits(body['balance'])} credits")
    out.print(body["api_key"], highlight=False)
    if save:
        DEV_KEY_FILE.parent.mkdir(exist_ok=True)
        fd = os.open(DEV_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(body["api_key"] + "\n")


@wallet.command()
def balance(url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Balance, held credits and usage by model."""
    body = call_api("GET", f"{url}/v1/account", api_key)
    out.print(f"account [bold]{body['id']}[/bold]: {credits(body['balance'])} credits "
              f"({credits(body['held'])} held for running requests)")
    if body["usage"]:
        table = Table("model", "requests", "prompt tokens", "completion tokens", "spent")
        for model, u in body["usage"].items():
            table.add_row(model, str(u["requests"]), str(u["prompt_tokens"]),
                          str(u["completion_tokens"]), credits(u["cost"]))
        out.print(table)


@wallet.command()
def history(url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None,
            limit: Annotated[int, typer.Option(min=1, max=500)] = 20) -> None:
    """Latest transfers of your account."""
    body = call_api("GET", f"{url}/v1/account/transactions", api_key, params={"limit": limit})
    table = Table("ledger seq", "time (UTC)", "kind", "amount", "counterparty")
    for t in body["data"]:
        sign = "-" if t["direction"] == "out" else "+"
        when = datetime.fromtimestamp(t["created"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(str(t["seq"]), when, t["kind"], f"{sign}{credits(t['amount'])}",
                      t["counterparty"])
    out.print(table)


def to_ucr(amount: str) -> int:
    """Credits as text (``"0.5"``) → µcr; exits with a clear message unless it is a positive
    number with at most 6 decimals."""
    try:
        value = Decimal(amount) * 1_000_000
    except InvalidOperation:
        value = Decimal(-1)
    if value <= 0 or value != value.to_integral_value():
        err.print(f"[red]error:[/red] {amount!r} is not a positive amount of credits with at "
                  "most 6 decimals (1 µcr = 0.000001 credit)")
        raise typer.Exit(2)
    return int(value)


@wallet.command()
def transfer(to: Annotated[str, typer.Argument(help="Account id, or miner:<id>, to pay.")],
             amount: Annotated[str, typer.Argument(help="Credits to send, e.g. 0.5.")],
             url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Send credits to another account (or to a miner, to fund its stake)."""
    ucr = to_ucr(amount)
    body = call_api("POST", f"{url}/v1/account/transfers", api_key,
                 json={"to": to, "amount": ucr, "idempotency_key": uuid.uuid4().hex})
    out.print(f"sent {credits(ucr)} credits to {to}; balance {credits(body['balance'])}")


MinerKey = Annotated[Path, typer.Option("--key", help="The miner's identity key file.")]


def _miner_action(url: str, key_file: Path, action: str, amount: str) -> None:
    import time

    from covey.protocol import sign_action
    from covey.protocol.identity import IdentityError, load_or_create

    if not key_file.exists():
        err.print(f"[red]error:[/red] no miner key at {key_file}")
        raise typer.Exit(2)
    try:
        key = load_or_create(key_file)
    except IdentityError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    miner_id = key.verify_key.encode().hex()
    body: dict[str, object] = {"action": action, "amount": to_ucr(amount),
                               "op": uuid.uuid4().hex, "ts": int(time.time())}
    body["signature"] = sign_action(key, {**body, "miner": miner_id})
    try:
        r = httpx.post(f"{url}/v1/miners/{miner_id}/stake", json=body, timeout=30)
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] cannot reach {url}: {exc}")
        raise typer.Exit(1) from exc
    if r.status_code >= 400:
        err.print(f"[red]error:[/red] {r.json()['error']['message']}")
        raise typer.Exit(1)
    e = r.json()
    out.print(f"miner {miner_id[:16]}…: staked {credits(e['staked'])}, balance "
              f"{credits(e['balance'])} credits, {e['jobs']} paid jobs")


@wallet.command()
def stake(amount: Annotated[str, typer.Argument(help="Credits to lock as stake.")],
          key: MinerKey = Path(".covey/miner.key"), url: Url = "http://127.0.0.1:8000") -> None:
    """Lock a miner's credits as stake (signed with its identity key)."""
    _miner_action(url, key, "stake", amount)


@wallet.command()
def unstake(amount: Annotated[str, typer.Argument(help="Credits to unlock.")],
            key: MinerKey = Path(".covey/miner.key"), url: Url = "http://127.0.0.1:8000"
            ) -> None:
    """Start unbonding a miner's stake; it returns after the unbonding period."""
    _miner_action(url, key, "unstake", amount)


@wallet.command()
def earnings(miner_id: Annotated[str, typer.Argument(help="Miner id (public key, hex).")],
             url: Url = "http://127.0.0.1:8000") -> None:
    """A miner's paid jobs, balance and stake."""
    try:
        e = httpx.get(f"{url}/v1/miners/{miner_id}/earnings", timeout=30).json()
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] cannot reach {url}: {exc}")
        raise typer.Exit(1) from exc
    out.print(f"miner {miner_id[:16]}…: {e['jobs']} paid jobs, {e['completion_tokens']} "
              f"tokens, balance {credits(e['balance'])}, staked {credits(e['staked'])} credits")


@ledger_app.command()
def verify(data_dir: Annotated[Path, typer.Option(help="Coordinator data dir.")] = Path(
        ".covey"),
           database_url: Annotated[str | None, typer.Option(help="Ledger database URL.")
                                   ] = None) -> None:
    """Re-check the hash chain, the signed head and sum of balances = minted; exit 1 on any
    break."""
    from covey.coordinator.app import default_database_url
    from covey.coordinator.ledger.store import Ledger
    from covey.protocol.identity import load_or_create

    key_file = data_dir / "coordinator.key"
    if not key_file.exists() and database_url is None:
        err.print(f"[red]error:[/red] no coordinator data in {data_dir}")
        raise typer.Exit(2)
    key = load_or_create(key_file)
    ledger = Ledger(database_url or default_database_url(data_dir), key)
    report = ledger.verify(public_key=key.verify_key.encode().hex())
    ledger.close()
    out.print(f"{report.entries} entries, minted {credits(report.minted)}, balances sum to "
              f"{credits(report.total)} credits")
    if not report.ok:
        for problem in report.problems[:50]:
            err.print(f"[red]✗[/red] {problem}")
        raise typer.Exit(1)
    out.print("[green]ledger OK[/green]")
