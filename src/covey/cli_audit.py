"""``covey audit``: search everything a coordinator stored for some words.

With end-to-end encryption on, a prompt's or an answer's words must appear nowhere the
coordinator keeps anything: not in a row of its database, not in its log. This command lets
anyone who runs a coordinator (``covey up`` included) see that for themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console(soft_wrap=True)


def find_traces(words: list[str], data_dir: Path, database_url: str | None = None,
                logs: list[Path] | None = None) -> dict[str, int]:
    """Where each of ``words`` occurs in what a coordinator stored: ``{"table <name>" |
    "log <path>": occurrences}`` over every row of every table of its database (SQLite in
    ``data_dir`` unless ``database_url``) and the log files (default: ``data_dir``'s
    ``coordinator.log``). Only places with a hit are listed."""
    from sqlalchemy import MetaData, create_engine, select

    from covey.coordinator.app import default_database_url

    hits: dict[str, int] = {}
    engine = create_engine(database_url or default_database_url(data_dir))
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                found = sum(repr(tuple(row)).count(w) + str(tuple(row)).count(w)
                            for row in conn.execute(select(table)) for w in words)
                if found:
                    hits[f"table {table.name}"] = found
    finally:
        engine.dispose()
    for log in logs if logs is not None else [data_dir / "coordinator.log"]:
        if log.is_file():
            text = log.read_text(errors="replace")
            found = sum(text.count(w) for w in words)
            if found:
                hits[f"log {log}"] = found
    return hits


def audit(
    words: Annotated[list[str], typer.Argument(help="Words to look for (each searched "
                                               "for exactly, case-sensitive).")],
    data_dir: Annotated[Path, typer.Option(help="The coordinator's data directory (for "
                                           "`covey up`: .covey).")] = Path(".covey"),
    database_url: Annotated[str | None, typer.Option(
        help="The coordinator's database, when not the SQLite file in --data-dir.")] = None,
    log: Annotated[list[Path], typer.Option(help="Log files to search (default: "
                                            "DATA_DIR/coordinator.log). Repeatable.")
                   ] = [],  # noqa: B006
) -> None:
    """Search every database row and log line a coordinator kept for WORDS; exit 1 if any
    is found. Use it after chatting through `covey proxy` to see that the coordinator
    never saw your words (and after a plain request, to see it had no need to keep them)."""
    hits = find_traces(words, data_dir, database_url, log or None)
    if not hits:
        out.print(f"[green]not found[/green]: none of {len(words)} word(s) appears in the "
                  f"coordinator's database or log")
        return
    for place, count in hits.items():
        out.print(f"[red]found[/red] {count}× in {place}")
    raise typer.Exit(1)
