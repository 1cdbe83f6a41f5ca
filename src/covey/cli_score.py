"""``covey score``: a scoring model's decision on rows of numbers, plain, proved or encrypted."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)


def _rows(inputs: list[str], file: Path | None) -> list[list[float]]:
    """Rows from ``--input`` (comma-separated numbers) and ``--file`` (CSV, or JSON: a list
    of rows); exits with a message naming the bad value."""
    texts: list[list[str]] = [text.split(",") for text in inputs]
    if file is not None:
        try:
            raw = file.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV starts with a BOM
        except OSError as exc:
            err.print(f"[red]error:[/red] --file {file}: {exc.strerror}")
            raise typer.Exit(2) from None
        except UnicodeDecodeError:
            err.print(f"[red]error:[/red] --file {file}: not text (CSV or JSON, UTF-8)")
            raise typer.Exit(2) from None
        if file.suffix == ".json":
            try:
                parsed = json.loads(raw)
                if not isinstance(parsed, list) or not all(isinstance(r, list) for r in parsed):
                    raise TypeError("expected [[…], …]")
                texts += [[str(x) for x in row] for row in parsed]
            except (ValueError, TypeError) as exc:
                err.print(f"[red]error:[/red] --file {file}: not a JSON list of rows ({exc})")
                raise typer.Exit(2) from None
        else:
            texts += [row for row in csv.reader(raw.splitlines()) if row]
    rows = []
    for i, row in enumerate(texts):
        try:
            values = [float(x) for x in row]
        except ValueError:
            err.print(f"[red]error:[/red] row {i} holds something that is not a number: "
                      f"{','.join(row)[:120]}")
            raise typer.Exit(2) from None
        if not all(math.isfinite(v) for v in values):
            err.print(f"[red]error:[/red] row {i} holds a value that is not finite")
            raise typer.Exit(2)
        rows.append(values)
    if not rows:
        err.print("[red]error:[/red] give rows with --input 1.2,3.4,… or --file rows.csv")
        raise typer.Exit(2)
    return rows


def score(
    model: Annotated[str, typer.Argument(help="A scoring model (GET /v1/models lists its "
                                         "features in order).")],
    input: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="One row: the features, comma-separated (repeat for rows).")
                     ] = None,
    file: Annotated[Path | None, typer.Option(help="Rows from a CSV file (no header) or a "
                                              "JSON list of rows.")] = None,
    proof: Annotated[bool, typer.Option(help="Ask for a zero-knowledge proof per row "
                                        "(verified by the coordinator before it pays; "
                                        "check it yourself with `covey proofs verify`).")
                     ] = False,
    encrypted: Annotated[bool, typer.Option(help="Encrypt the row (CKKS): neither the "
                                            "coordinator nor the miner sees it or its "
                                            "score.")] = False,
    keys: Annotated[Path | None, typer.Option(help="This client's CKKS keys (made on "
                                              "first use; default ~/.covey/he-keys.bin).")
                    ] = None,
    save: Annotated[Path | None, typer.Option(help="Write the whole answer (JSON) here, "
                                              "e.g. for `covey proofs verify`.")] = None,
    url: Annotated[str, typer.Option(help="Coordinator base URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="COVEY_API_KEY",
                                                help="API key (default: .covey/api_key).")
                       ] = None,
) -> None:
    """Score rows of numbers with a scoring model."""
    import httpx

    from covey.cli_money import resolve_key
    from covey.client.chat import ChatError
    from covey.client.scores import DEFAULT_KEYS, load_or_create_keys, score_encrypted
    from covey.client.scores import score as score_plain

    rows = _rows(input or [], file)
    if save is not None and not save.parent.is_dir():
        err.print(f"[red]error:[/red] --save {save}: no folder {save.parent} to write it in")
        raise typer.Exit(2)
    if keys is not None and keys.is_dir():
        err.print(f"[red]error:[/red] --keys {keys} is a folder; give a file path")
        raise typer.Exit(2)
    key = resolve_key(api_key)
    try:
        if encrypted:
            if len(rows) != 1 or proof:
                err.print("[red]error:[/red] --encrypted scores exactly one row, without "
                          "--proof")
                raise typer.Exit(2)
            from covey.scoring.he import HEError
            from covey.scoring.model import InputError

            try:
                value, answer = score_encrypted(url, model, rows[0], load_or_create_keys(
                    keys or DEFAULT_KEYS), api_key=key)
            except (HEError, InputError, OSError) as exc:
                err.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(1) from None
            scores = [value]
        else:
            answer = score_plain(url, model, rows, api_key=key, proof=proof)
            scores = [item["score"] for item in answer["data"]]
    except ChatError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] cannot reach {url}: {exc}. Is `covey up` running?")
        raise typer.Exit(1) from None
    table = Table("row", "score", title=f"{model}" + (" (encrypted: decrypted here)"
                                                      if encrypted else ""))
    for i, value in enumerate(scores):
        table.add_row(str(i), f"{value:.6f}")
    out.print(table)
    usage = answer.get("usage", {})
    out.print(f"rows {usage.get('rows')} · work {usage.get('work_ms')} ms"
              + (f" · proofs verified by the coordinator against vk "
                 f"{answer['proof']['vk_sha256'][:16]}…" if proof else ""))
    if save is not None:
        try:
            save.write_text(json.dumps(answer, indent=1))
        except OSError as exc:  # the answer was paid for: print it rather than lose it
            err.print(f"[red]error:[/red] --save {save}: {exc.strerror}; the answer follows")
            print(json.dumps(answer))
            raise typer.Exit(1) from None
        out.print(f"answer saved to {save}")
