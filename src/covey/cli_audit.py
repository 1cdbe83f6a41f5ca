"""``covey audit``: search everything a coordinator kept, and everything it was sent, for
some words.

With end-to-end encryption on, a prompt's or an answer's words must appear nowhere the
coordinator keeps anything (a row of its database, its log) nor in what it received and sent
(``--record-traffic``). This command lets anyone who runs a coordinator (``covey up``
included) see that for themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console(soft_wrap=True)


DEFAULT_LOGS = ("coordinator.log", "traffic.log")
"""Files searched in the data directory unless others are named: the coordinator's log and,
when it was started with ``--record-traffic`` by ``covey up``, everything it received and
sent."""


class NoDatabase(Exception):
    """The data directory holds no coordinator database."""


def find_traces(words: list[str], data_dir: Path, database_url: str | None = None,
                logs: list[Path] | None = None) -> dict[tuple[str, str], int]:
    """Where each of ``words`` occurs in what a coordinator kept: ``{(word, "table <name>" |
    "file <path>"): occurrences}`` over every row of every table of its database (SQLite in
    ``data_dir`` unless ``database_url``) and the files ``logs`` (default:
    :data:`DEFAULT_LOGS` in ``data_dir``). Only places with a hit are listed.

    Raises:
        NoDatabase: no ``database_url`` and no SQLite database in ``data_dir``.
    """
    from sqlalchemy import MetaData, create_engine, select

    from covey.coordinator.app import default_database_url

    if database_url is None and not (data_dir / "covey.db").is_file():
        raise NoDatabase(f"{data_dir} holds no coordinator database (covey.db); pass the "
                         "coordinator's --data-dir (for `covey up`: .covey) or --database-url")
    hits: dict[tuple[str, str], int] = {}
    engine = create_engine(database_url or default_database_url(data_dir))
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                rows = [repr(tuple(row)) + str(tuple(row)) for row in conn.execute(select(table))]
                for w in words:
                    found = sum(r.count(w) for r in rows)
                    if found:
                        hits[(w, f"table {table.name}")] = found
    finally:
        engine.dispose()
    files = logs if logs is not None else [data_dir / name for name in DEFAULT_LOGS]
    for path in files:
        if path.is_file():
            text = path.read_text(errors="replace")
            for w in words:
                if (found := text.count(w)):
                    hits[(w, f"file {path}")] = found
    return hits


def audit(
    words: Annotated[list[str], typer.Argument(help="Words to look for (each searched "
                                               "for exactly, case-sensitive).")],
    data_dir: Annotated[Path, typer.Option(help="The coordinator's data directory (for "
                                           "`covey up`: .covey).")] = Path(".covey"),
    database_url: Annotated[str | None, typer.Option(
        help="The coordinator's database, when not the SQLite file in --data-dir.")] = None,
    log: Annotated[list[Path], typer.Option(help="Files to search (default: "
                                            "DATA_DIR/coordinator.log and traffic.log). "
                                            "Repeatable.")
                   ] = [],  # noqa: B006
) -> None:
    """Search every database row and log line a coordinator kept, and the traffic it
    recorded (`covey up --record-traffic`), for WORDS; exit 1 if any is found, 2 on an
    error. After chatting through `covey proxy`, none of your words is there; after a plain
    request, they are in the recorded traffic."""
    try:
        hits = find_traces(words, data_dir, database_url, log or None)
    except NoDatabase as exc:
        out.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    searched = ", ".join(str(p) for p in (log or [data_dir / n for n in DEFAULT_LOGS])
                         if p.is_file())
    if not hits:
        out.print(f"[green]not found[/green]: none of {len(words)} word(s) appears in the "
                  f"coordinator's database or in {searched or 'its files (none found)'}")
        return
    for (word, place), count in hits.items():
        out.print(f"[red]found[/red] {word!r} {count}× in {place}")
    raise typer.Exit(1)
