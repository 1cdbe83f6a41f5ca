"""``covey invite create``: invite codes for an invite-only network (``covey coordinator
--invite-only``), written straight into the coordinator's database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)

invite_app = typer.Typer(help="Invite codes for an invite-only network.", no_args_is_help=True)


MAX_GRANT = 10**12
"""µcr (a million credits): far above any test grant, far below what would overflow the
ledger's 64-bit sums when many accounts hold it."""


@invite_app.command()
def create(
    grant: Annotated[int | None, typer.Option(
        min=0, max=MAX_GRANT, help="µcr each account signed up with this code receives "
        "(default: the coordinator's faucet grant, its --grant; at most 10^12).")] = None,
    uses: Annotated[int, typer.Option(min=1, help="How many sign-ups the code allows.")] = 1,
    data_dir: Annotated[Path, typer.Option(help="Coordinator data dir.")] = Path(".covey"),
    database_url: Annotated[str | None, typer.Option(
        help="Ledger database URL (default: SQLite in DATA_DIR).")] = None,
) -> None:
    """Make an invite code and print it alone on stdout (what it grants goes to stderr).
    Safe while the coordinator runs: the code is one row in its database."""
    from sqlalchemy.exc import SQLAlchemyError

    from covey.coordinator.app import default_database_url
    from covey.coordinator.ledger.invites import create_invite
    from covey.coordinator.ledger.store import make_engine, migrate

    if database_url is None and not (data_dir / "covey.db").is_file():
        # Making a database here would hide a mistyped --data-dir: the code would be valid
        # on no coordinator.
        err.print(f"[red]error:[/red] no coordinator database in {data_dir}: pass the "
                  "coordinator's --data-dir or --database-url")
        raise typer.Exit(2)
    engine = make_engine(database_url or default_database_url(data_dir))
    try:
        migrate(engine)  # a database from before invites existed gets the table
        code = create_invite(engine, grant, uses)
    except SQLAlchemyError as exc:
        err.print(f"[red]error:[/red] cannot write to the ledger database: {exc}")
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    typer.echo(code)
    what = ("the coordinator's faucet grant" if grant is None
            else f"{grant / 1_000_000:,.6f} credits ({grant} µcr)")
    err.print(f"invite for {uses} sign-up{'s' if uses > 1 else ''}, each granted {what}; "
              "sign up with POST /v1/accounts {\"invite_code\": \"…\"} or the web page",
              highlight=False, markup=False)
