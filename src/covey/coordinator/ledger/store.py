"""The ledger on a SQL database (SQLite in WAL mode by default, PostgreSQL for networks).

All writes go through :meth:`Ledger.post` (or :meth:`Ledger.post_computed`). Operations
are committed in batches by one writer thread (group commit): one database transaction locks
the chain head, refuses each operation whose idempotency key was already used, checks that no
account but the faucet goes below zero, appends the transfers with their chained hashes,
updates the balance cache and re-signs the head. Appends are serialized by the head lock,
which is what makes the chain a single order every replica agrees on; batching is what lets
that single order carry many operations per commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from alembic import command
from alembic.config import Config
from nacl.signing import SigningKey
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    create_engine,
    event,
    insert,
    select,
)

from covey.coordinator.ledger.chain import GENESIS, entry_hash, sign_head, verify_head
from covey.coordinator.ledger.schema import balances, chain_head, transfers
from covey.coordinator.ledger.statements import Statements, cursor, run, run_many

FAUCET = "faucet"
"""The mint: the only account whose balance may go below zero (−minted)."""
TREASURY = "treasury"
TRANSIENT = "escrow:"
"""Accounts of this prefix are one job's each: their balance row goes once they are empty."""


class LedgerError(Exception):
    """A ledger operation that cannot be carried out."""


class InsufficientFunds(LedgerError):
    """``account`` holds ``balance`` µcr, less than the ``needed`` µcr."""

    def __init__(self, account: str, balance: int, needed: int) -> None:
        super().__init__(f"{account} holds {balance} µcr, {needed} µcr needed")
        self.account = account
        self.balance = balance
        self.needed = needed


@dataclass(frozen=True)
class Transfer:
    """Move ``amount`` µcr (> 0) from ``debit`` to ``credit``; ``kind`` names why
    (grant, hold, pay, fee, refund, stake, unstake, release, slash, transfer)."""

    debit: str
    credit: str
    amount: int
    kind: str


@dataclass
class VerifyReport:
    """Outcome of :meth:`Ledger.verify`; ``ok`` is False when ``problems`` is not empty."""

    entries: int = 0
    minted: int = 0
    total: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _now_us() -> int:
    return time.time_ns() // 1000


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE``.

    ``BEGIN IMMEDIATE`` takes SQLite's write lock at the start of each transaction, so two
    writers queue instead of deadlocking on a read-then-write upgrade (SQLAlchemy's
    documented pysqlite recipe).
    """
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # Reads through a memory map, not a system call per page, and 64 MiB of page
        # cache: a commit's index inserts (idempotency keys, accounts) land on scattered
        # pages of a table that only grows.
        cur.execute("PRAGMA mmap_size=268435456")
        cur.execute("PRAGMA cache_size=-65536")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # On the driver's connection: through exec_driver_sql this cost the ledger's
        # writer a tenth of each commit's CPU.
        conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]

    return engine


MIGRATION_LOCK = 0x636F7665  # "cove": the PostgreSQL advisory lock key of migrations


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Replicas starting together: one migrates, the others wait and find it done.
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


_TRANSFER_COLUMNS = ("seq", "key", "debit", "credit", "amount", "kind", "created_us",
                     "prev_hash", "hash")
_MAX_BATCH = 256
"""Operations committed together at most; bounds a transaction's size and lock time."""

Row = tuple[Table, dict[str, object]]
Record = Callable[[], "list[Row] | Row | None"]
"""Called once an operation applied: rows to insert in the same transaction (one, a list,
or None)."""


def _read_head(conn: Connection) -> dict[str, object]:
    """The ``chain_head`` row: seq, hash, signature, public_key."""
    row = conn.execute(select(chain_head.c.seq, chain_head.c.hash, chain_head.c.signature,
                              chain_head.c.public_key).where(chain_head.c.id == 1)).one()
    return dict(row._mapping)


def _check(ops: Sequence[Transfer]) -> None:
    for t in ops:
        if not isinstance(t.amount, int) or t.amount <= 0 or t.debit == t.credit:
            raise LedgerError(f"invalid transfer {t}")


@dataclass(eq=False)
class _Pending:
    op_key: str
    ops: tuple[Transfer, ...]
    also: Record | None
    accounts: tuple[str, ...] = ()
    make: Callable[[Mapping[str, int]], Sequence[Transfer]] | None = None
    applied: bool = False
    error: BaseException | None = None
    event: threading.Event | None = None
    """Set once the operation was decided (a blocking caller waits on it)."""
    done: Callable[[], None] | None = None
    """Called on the writer thread once the operation was decided (an async caller's
    wake-up)."""

    def decided(self) -> None:
        if self.event is not None:
            self.event.set()
        if self.done is not None:
            self.done()


T = TypeVar("T")


@dataclass(eq=False)
class Operation(Generic[T]):
    """One ledger operation, prepared: what :meth:`Ledger.post` or
    :meth:`Ledger.post_computed` would submit, and ``finish(applied)``, which turns the
    outcome into the caller's result. Run it with :meth:`Ledger.run` (blocking) or
    :meth:`Ledger.submit` (from the event loop, as a future: no thread of its own)."""

    pending: _Pending
    finish: Callable[[bool], T]

    @classmethod
    def of(cls, op_key: str, ops: Sequence[Transfer], also: Record | None = None,
           finish: Callable[[bool], T] = bool) -> Operation[T]:  # type: ignore[assignment]
        """An operation of fixed transfers (see :meth:`Ledger.post`).

        Raises:
            LedgerError: an amount is not a positive integer, or debit equals credit.
        """
        _check(ops)
        return cls(_Pending(op_key, tuple(ops), also), finish)

    @classmethod
    def computed(cls, op_key: str, accounts: Sequence[str],
                 make: Callable[[Mapping[str, int]], Sequence[Transfer]],
                 also: Record | None = None,
                 finish: Callable[[bool], T] = bool) -> Operation[T]:  # type: ignore[assignment]
        """An operation computed from balances (see :meth:`Ledger.post_computed`)."""
        return cls(_Pending(op_key, (), also, tuple(accounts), make), finish)


class Ledger:
    """Accounts, transfers and balances in µcr, on the database at ``url``.

    ``key`` signs the chain head (the coordinator's identity key).
    """

    def __init__(self, url: str, key: SigningKey) -> None:
        self._queue: list[_Pending] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.engine = make_engine(url)
        self._sql = Statements(self.engine.dialect.name)
        self.key = key
        self.public_key = key.verify_key.encode().hex()
        migrate(self.engine)
        with self.engine.begin() as conn:
            if conn.execute(select(chain_head.c.id)).first() is None:
                conn.execute(insert(chain_head).values(
                    id=1, seq=0, hash=GENESIS, signature=sign_head(key, 0, GENESIS),
                    public_key=self.public_key))

    def close(self) -> None:
        """Finish queued writes, stop the writer thread, release connections."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self.engine.dispose()

    def _pipeline(self, conn: Connection) -> contextlib.AbstractContextManager[object]:
        """psycopg's pipeline mode on PostgreSQL (statements sent without waiting for each
        answer); nothing elsewhere."""
        if self.engine.dialect.name != "postgresql":
            return contextlib.nullcontext()
        return conn.connection.driver_connection.pipeline()  # type: ignore[union-attr]

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # --- writing -------------------------------------------------------------------------

    def post(self, op_key: str, ops: Sequence[Transfer], also: Record | None = None) -> bool:
        """Append ``ops`` atomically under the idempotency key ``op_key``.

        Returns False (and changes nothing) when ``op_key`` was used before. When the
        operation applies, ``also()`` may return a (table, row) that is inserted in the same
        transaction (e.g. a usage record). Thread-safe; concurrent calls are committed
        together by one writer thread (see :meth:`_commit_batch`).

        Raises:
            InsufficientFunds: an account other than the faucet would go below zero.
            LedgerError: an amount is not a positive integer, or debit equals credit.
        """
        if not ops:  # nothing moves, nothing to record (a free model)
            return True
        return self.run(Operation.of(op_key, ops, also))

    def post_computed(self, op_key: str, accounts: Sequence[str],
                      make: Callable[[Mapping[str, int]], Sequence[Transfer]],
                      also: Record | None = None) -> bool:
        """Like :meth:`post`, with the transfers computed inside the transaction by
        ``make(balances)`` from the current balances of ``accounts`` (e.g. closing an escrow
        for exactly what it holds). ``make`` runs only if ``op_key`` is new. List every
        account the transfers may touch: others cost a query each.
        """
        return self.run(Operation.computed(op_key, accounts, make, also))

    def run(self, op: Operation[T]) -> T:
        """Submit ``op`` and wait for it (blocking: not from the event loop).

        Raises:
            InsufficientFunds, LedgerError: as :meth:`post` does.
        """
        return op.finish(self._submit(op.pending))

    def submit(self, op: Operation[T],
               on_error: Callable[[BaseException], T] | None = None) -> asyncio.Future[T]:
        """Submit ``op`` from the event loop: a future of its result, set on the loop
        once the writer decided it (no task and no thread per operation). ``on_error``
        turns the operation's error into its result, or raises another in its place;
        without it the future holds the error (InsufficientFunds, LedgerError, as
        :meth:`post` raises them). Cancelling the future does not withdraw the operation.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        pending = op.pending

        def decided() -> None:  # on the loop
            if future.cancelled():
                return
            try:
                if pending.error is None:
                    result = op.finish(pending.applied)
                elif on_error is None:
                    raise pending.error
                else:
                    result = on_error(pending.error)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits it
                future.set_exception(exc)
            else:
                future.set_result(result)

        def wake() -> None:  # on the writer thread
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(decided)

        pending.done = wake
        self._enqueue(pending)
        return future

    def _submit(self, pending: _Pending) -> bool:
        pending.event = event = threading.Event()
        self._enqueue(pending)
        event.wait()
        if pending.error is not None:
            raise pending.error
        return pending.applied

    def _enqueue(self, pending: _Pending) -> None:
        # Group commit: one writer thread commits everything queued so far in one
        # transaction, so one commit (one fsync, one chain-head lock) carries many operations.
        with self._wake:
            if self._closed:
                raise LedgerError("the ledger is closed")
            self._queue.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, name="ledger-writer",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            self._commit_batch(batch)
        except Exception:
            if len(batch) == 1:
                batch[0].error = sys.exc_info()[1]
                batch[0].decided()
                return
            for one in batch:  # isolate the operation that failed
                self._commit([one])
            return
        for p in batch:
            p.decided()

    def _commit_batch(self, batch: list[_Pending]) -> None:
        """Apply ``batch`` in order in one transaction: each operation succeeds, is a repeat
        (``applied`` False) or lacks funds (``error``), independently of the others."""
        sql = self._sql
        with self._tx() as conn:
            cur = cursor(conn)
            head_seq, head_hash = run(cur, sql.head, {})[0]
            firsts = [f"{p.op_key}:0" for p in batch]
            seen = {key for key, in run(cur, *sql.seen(firsts))}
            known: dict[str, int] = {}
            current: dict[str, int] = {}
            queried: set[str] = set()

            def load(names: set[str]) -> None:
                missing = names - queried
                if missing:
                    found = {a: int(b) for a, b in run(cur, *sql.balances(missing))}
                    known.update(found)
                    for a, b in found.items():
                        current.setdefault(a, b)
                    queried.update(missing)

            load({a for p in batch for t in p.ops for a in (t.debit, t.credit)}
                 | {a for p in batch for a in p.accounts})
            seq, prev = int(head_seq), str(head_hash)
            now = _now_us()
            rows: list[dict[str, object]] = []
            for p in batch:
                p.applied, p.error = False, None
                if f"{p.op_key}:0" in seen:
                    continue
                if p.make is not None:
                    try:
                        p.ops = tuple(p.make(current))
                        _check(p.ops)
                    except Exception as exc:  # noqa: BLE001 - reported to its caller
                        p.error = exc
                        continue
                    if not p.ops:
                        p.applied = True
                        continue
                    load({a for t in p.ops for a in (t.debit, t.credit)})
                deltas: dict[str, int] = defaultdict(int)
                for t in p.ops:
                    deltas[t.debit] -= t.amount
                    deltas[t.credit] += t.amount
                short = next((a for a, d in deltas.items()
                              if d < 0 and a != FAUCET and current.get(a, 0) + d < 0), None)
                if short is not None:
                    p.error = InsufficientFunds(short, current.get(short, 0), -deltas[short])
                    continue
                for a, d in deltas.items():
                    current[a] = current.get(a, 0) + d
                for i, t in enumerate(p.ops):
                    seq += 1
                    key = f"{p.op_key}:{i}"
                    h = entry_hash(prev, seq, key, t.debit, t.credit, t.amount, t.kind, now)
                    rows.append({"seq": seq, "key": key, "debit": t.debit, "credit": t.credit,
                                 "amount": t.amount, "kind": t.kind, "created_us": now,
                                 "prev_hash": prev, "hash": h})
                    prev = h
                seen.add(f"{p.op_key}:0")
                p.applied = True
            # Rows written with an operation (usage, receipts, evidence) go in even when it
            # moved no credits.
            extra: dict[tuple[Table, tuple[str, ...]], list[dict[str, object]]] = \
                defaultdict(list)
            for p in batch:
                rows_also = p.also() if p.applied and p.also is not None else None
                if isinstance(rows_also, tuple):
                    rows_also = [rows_also]
                for table, row in rows_also or ():
                    extra[table, tuple(row)].append(row)
            if not rows and not extra:
                return
            with self._pipeline(conn):  # the writes need no answers: one round trip
                if rows:
                    self._write_transfers(cur, rows, current, known, seq, prev)
                for (table, columns), table_rows in extra.items():
                    run_many(cur, sql.insert(table, columns), table_rows)

    def _write_transfers(self, cur: Any, rows: list[dict[str, object]],
                         current: dict[str, int], known: dict[str, int], seq: int, prev: str
                         ) -> None:
        """Insert a batch's transfer rows, update the balance cache and sign the new head."""
        sql = self._sql
        run_many(cur, sql.insert(transfers, _TRANSFER_COLUMNS), rows)
        changed = [a for a in current if current[a] != known.get(a)]
        # A closed escrow leaves no row behind (a missing row reads as 0): the table keeps
        # only open ones, however many jobs ran, so scanning them stays cheap.
        gone = {a for a in changed if current[a] == 0 and a.startswith(TRANSIENT)}
        emptied = [a for a in gone if a in known]
        if emptied:
            run(cur, *sql.drop(emptied))
        run_many(cur, sql.upsert, [{"a": a, "b": current[a]} for a in changed
                                   if a not in gone])
        run(cur, sql.set_head, {"seq": seq, "hash": prev,
                                "signature": sign_head(self.key, seq, prev),
                                "public_key": self.public_key})

    # --- reading -------------------------------------------------------------------------

    def balance(self, account: str) -> int:
        """Balance of ``account`` in µcr (0 if it never moved)."""
        with self.engine.connect() as conn:
            value = conn.execute(select(balances.c.balance)
                                 .where(balances.c.account == account)).scalar()
        return int(value or 0)

    def balances_like(self, prefix: str) -> dict[str, int]:
        """Balances of every account whose id starts with ``prefix`` exactly."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(balances.c.account, balances.c.balance)
                                .where(balances.c.account.startswith(prefix, autoescape=True))
                                ).tuples().all()
        return {account: balance for account, balance in rows if account.startswith(prefix)}

    def history(self, account: str, limit: int = 50, before: int | None = None
                ) -> list[dict[str, object]]:
        """Transfers touching ``account``, newest first; page with ``before`` (a ``seq``)."""
        q = select(transfers).where((transfers.c.debit == account) |
                                    (transfers.c.credit == account))
        if before is not None:
            q = q.where(transfers.c.seq < before)
        q = q.order_by(transfers.c.seq.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def head(self) -> dict[str, object]:
        """The chain head: ``seq`` and ``hash`` of the last entry, the coordinator's
        ``signature`` over them and its ``public_key`` (hex)."""
        with self.engine.connect() as conn:
            return _read_head(conn)

    def entries_with_key_prefix(self, prefix: str) -> list[dict[str, object]]:
        """Transfers whose idempotency key starts with ``prefix`` exactly (case and every
        character as given), in order."""
        # LIKE treats _ and % as wildcards (escaped here) and, on SQLite, ignores ASCII
        # case: the exact test after it drops what LIKE let through, so a client's key
        # "case-1" never finds the transfer of "Case-1".
        q = (select(transfers).where(transfers.c.key.startswith(prefix, autoescape=True))
             .order_by(transfers.c.seq))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q) if r.key.startswith(prefix)]

    # --- auditing ------------------------------------------------------------------------

    def verify(self, public_key: str | None = None) -> VerifyReport:
        """Re-check the whole log: the hash chain, the signed head, the balance cache, no
        negative balance but the faucet's, and sum of balances = minted (all from the faucet).

        ``public_key`` (hex): the coordinator key the head must be signed by; by default the
        one recorded with the head.
        """
        report = VerifyReport()
        derived: dict[str, int] = defaultdict(int)
        prev, seq = GENESIS, 0
        with self.engine.connect() as conn:
            for row in conn.execute(select(transfers).order_by(transfers.c.seq)
                                    .execution_options(yield_per=5000)):
                seq += 1
                if row.seq != seq:
                    report.problems.append(f"entry {seq} is missing (found {row.seq})")
                    seq = row.seq
                if row.prev_hash != prev:
                    report.problems.append(f"entry {row.seq}: prev_hash does not match")
                expected = entry_hash(prev, row.seq, row.key, row.debit, row.credit,
                                      row.amount, row.kind, row.created_us)
                if row.hash != expected:
                    report.problems.append(f"entry {row.seq}: hash does not match its content")
                prev = expected
                derived[row.debit] -= row.amount
                derived[row.credit] += row.amount
                report.entries += 1
            head = _read_head(conn)
            cached = dict(conn.execute(select(balances.c.account, balances.c.balance))
                          .tuples().all())
        if head["seq"] != seq or head["hash"] != prev:
            report.problems.append(f"chain head ({head['seq']}) does not match the log ({seq})")
        if not verify_head(str(public_key or head["public_key"]), int(head["seq"]),
                           str(head["hash"]), str(head["signature"])):
            report.problems.append("chain head signature is invalid")
        for account in set(derived) | set(cached):
            if derived.get(account, 0) != cached.get(account, 0):
                report.problems.append(f"{account}: cached balance {cached.get(account, 0)} "
                                       f"≠ replayed {derived.get(account, 0)}")
            if account != FAUCET and derived.get(account, 0) < 0:
                report.problems.append(f"{account} is negative")
        report.minted = -derived.get(FAUCET, 0)
        report.total = sum(v for k, v in derived.items() if k != FAUCET)
        if report.total != report.minted:
            report.problems.append(f"balances sum to {report.total}, minted {report.minted}")
        return report
