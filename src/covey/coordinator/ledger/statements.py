"""The ledger writer's statements as fixed SQL text, one set per database, run on the
driver's own cursor.

Each commit runs up to eleven statements. Built by SQLAlchemy's expression language, each
cost its compilation-cache lookup and parameter processing (about 0.1 ms of CPU apiece
here) and an ``IN`` list of a new length made new SQL text, which PostgreSQL could not
reuse as a prepared statement. Written once as text, with a list passed as one array
parameter on PostgreSQL, every commit sends the same few statements, which psycopg
prepares on the server after their fifth use (SQLite gets one placeholder per item).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table


class Statements:
    """The writer's SQL for ``dialect`` (``"postgresql"`` or ``"sqlite"``)."""

    def __init__(self, dialect: str) -> None:
        self.pg = dialect == "postgresql"
        lock = " FOR UPDATE" if self.pg else ""  # SQLite: BEGIN IMMEDIATE already locks
        self.head = f"SELECT seq, hash FROM chain_head WHERE id = 1{lock}"
        self.upsert = (f"INSERT INTO balances (account, balance) VALUES ({self._p('a')}, "
                       f"{self._p('b')}) ON CONFLICT (account) DO UPDATE SET balance = "
                       "excluded.balance")
        self.set_head = (f"UPDATE chain_head SET seq = {self._p('seq')}, hash = "
                         f"{self._p('hash')}, signature = {self._p('signature')}, "
                         f"public_key = {self._p('public_key')} WHERE id = 1")
        self._inserts: dict[tuple[str, tuple[str, ...]], str] = {}
        self._lists: dict[tuple[str, int], str] = {}

    def _p(self, name: str) -> str:
        return f"%({name})s" if self.pg else f":{name}"

    def seen(self, keys: Collection[str]) -> tuple[str, dict[str, object]]:
        """The idempotency keys among ``keys`` already used: SQL and parameters."""
        return self._in("SELECT key FROM transfers WHERE key", keys)

    def balances(self, accounts: Collection[str]) -> tuple[str, dict[str, object]]:
        """(account, balance) of those of ``accounts`` with a row: SQL and parameters."""
        return self._in("SELECT account, balance FROM balances WHERE account", accounts)

    def drop(self, accounts: Collection[str]) -> tuple[str, dict[str, object]]:
        """Delete the balance rows of ``accounts``: SQL and parameters."""
        return self._in("DELETE FROM balances WHERE account", accounts)

    def _in(self, head: str, items: Collection[str]) -> tuple[str, dict[str, object]]:
        if self.pg:  # one array parameter whatever the length: the SQL text never changes
            return f"{head} = ANY(%(v)s)", {"v": list(items)}
        # SQLite has no arrays, and its JSON functions cut a string at NUL: one
        # placeholder per item (sqlite3 keeps each length's statement compiled).
        n = len(items)
        sql = self._lists.get((head, n))
        if sql is None:
            sql = self._lists[head, n] = f"{head} IN ({', '.join(f':v{i}' for i in range(n))})"
        return sql, {f"v{i}": v for i, v in enumerate(items)}

    def insert(self, table: Table, columns: Sequence[str]) -> str:
        """``INSERT INTO table (columns) VALUES (…)``, made once per table and columns."""
        key = (table.name, tuple(columns))
        sql = self._inserts.get(key)
        if sql is None:
            names = ", ".join(f'"{c}"' for c in columns)
            params = ", ".join(self._p(c) for c in columns)
            sql = self._inserts[key] = f'INSERT INTO "{table.name}" ({names}) VALUES ({params})'
        return sql


def cursor(conn: Connection) -> Any:
    """The driver's cursor on ``conn``'s connection, inside its transaction."""
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def run(cur: Any, sql: str, params: Mapping[str, object]) -> list[tuple[Any, ...]]:
    """Execute one statement; its rows (none for a write)."""
    cur.execute(sql, params)
    return list(cur.fetchall()) if cur.description is not None else []


def run_many(cur: Any, sql: str, rows: Sequence[Mapping[str, object]]) -> None:
    """Execute one statement for each of ``rows``."""
    if rows:
        cur.executemany(sql, rows)
