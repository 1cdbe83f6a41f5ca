"""The ledger on a SQL database (SQLite in WAL mode by default, PostgreSQL for networks).

All writes go through :meth:`Ledger.post`: one database transaction that locks the chain
head, refuses an operation whose idempotency key was already used, checks that no account but
the faucet goes below zero, appends the transfers with their chained hashes, updates the
balance cache and re-signs the head. Appends are serialized by the head lock, which is what
makes the chain a single order every replica agrees on.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config
from nacl.signing import SigningKey
from sqlalchemy import Connection, Engine, create_engine, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from covey.coordinator.ledger.chain import GENESIS, entry_hash, sign_head, verify_head
from covey.coordinator.ledger.schema import balances, chain_head, transfers

FAUCET = "faucet"
"""The mint: the only account whose balance may go below zero (−minted)."""
TREASURY = "treasury"


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
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Ledger:
    """Accounts, transfers and balances in µcr, on the database at ``url``.

    ``key`` signs the chain head (the coordinator's identity key).
    """

    def __init__(self, url: str, key: SigningKey) -> None:
        self.engine = make_engine(url)
        self.key = key
        self.public_key = key.verify_key.encode().hex()
        migrate(self.engine)
        with self.engine.begin() as conn:
            if conn.execute(select(chain_head.c.id)).first() is None:
                conn.execute(insert(chain_head).values(
                    id=1, seq=0, hash=GENESIS, signature=sign_head(key, 0, GENESIS),
                    public_key=self.public_key))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # --- writing -------------------------------------------------------------------------

    def post(self, op_key: str, ops: Sequence[Transfer],
             also: Callable[[Connection], None] | None = None) -> bool:
        """Append ``ops`` atomically under the idempotency key ``op_key``.

        Returns False (and changes nothing) when ``op_key`` was used before. ``also`` runs
        inside the same transaction when the operation applies (e.g. to record usage).

        Raises:
            InsufficientFunds: an account other than the faucet would go below zero.
            LedgerError: an amount is not a positive integer, or debit equals credit.
        """
        for t in ops:
            if not isinstance(t.amount, int) or t.amount <= 0 or t.debit == t.credit:
                raise LedgerError(f"invalid transfer {t}")
        if not ops:  # nothing moves, nothing to record (a free model)
            return True
        keys = [f"{op_key}:{i}" for i in range(len(ops))]
        try:
            with self._tx() as conn:
                head = conn.execute(
                    select(chain_head.c.seq, chain_head.c.hash).where(chain_head.c.id == 1)
                    .with_for_update()).one()
                if conn.execute(select(transfers.c.seq).where(transfers.c.key == keys[0])
                                ).first() is not None:
                    return False
                deltas: dict[str, int] = defaultdict(int)
                for t in ops:
                    deltas[t.debit] -= t.amount
                    deltas[t.credit] += t.amount
                current = dict(conn.execute(
                    select(balances.c.account, balances.c.balance)
                    .where(balances.c.account.in_(list(deltas)))).tuples().all())
                for account, delta in deltas.items():
                    if delta < 0 and account != FAUCET and current.get(account, 0) + delta < 0:
                        raise InsufficientFunds(account, current.get(account, 0), -delta)
                seq, prev = head.seq, head.hash
                now = _now_us()
                rows = []
                for key, t in zip(keys, ops, strict=True):
                    seq += 1
                    prev = entry_hash(prev, seq, key, t.debit, t.credit, t.amount, t.kind, now)
                    rows.append({"seq": seq, "key": key, "debit": t.debit, "credit": t.credit,
                                 "amount": t.amount, "kind": t.kind, "created_us": now,
                                 "prev_hash": rows[-1]["hash"] if rows else head.hash,
                                 "hash": prev})
                conn.execute(insert(transfers), rows)
                for account, delta in deltas.items():
                    if account in current:
                        conn.execute(update(balances).where(balances.c.account == account)
                                     .values(balance=balances.c.balance + delta))
                    else:
                        conn.execute(insert(balances).values(account=account, balance=delta))
                conn.execute(update(chain_head).where(chain_head.c.id == 1).values(
                    seq=seq, hash=prev, signature=sign_head(self.key, seq, prev),
                    public_key=self.public_key))
                if also is not None:
                    also(conn)
        except IntegrityError:
            # A concurrent writer used the same key between our check and insert.
            return False
        return True

    # --- reading -------------------------------------------------------------------------

    def balance(self, account: str) -> int:
        """Balance of ``account`` in µcr (0 if it never moved)."""
        with self.engine.connect() as conn:
            value = conn.execute(select(balances.c.balance)
                                 .where(balances.c.account == account)).scalar()
        return int(value or 0)

    def balances_like(self, prefix: str) -> dict[str, int]:
        """Balances of every account whose id starts with ``prefix``."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(balances.c.account, balances.c.balance)
                                .where(balances.c.account.startswith(prefix))).tuples().all()
        return dict(rows)

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

    def entries_with_key_prefix(self, prefix: str) -> list[dict[str, object]]:
        """Transfers whose idempotency key starts with ``prefix``, in order."""
        q = select(transfers).where(transfers.c.key.startswith(prefix)).order_by(transfers.c.seq)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

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
            head = conn.execute(select(chain_head).where(chain_head.c.id == 1)).one()
            cached = dict(conn.execute(select(balances.c.account, balances.c.balance))
                          .tuples().all())
        if head.seq != seq or head.hash != prev:
            report.problems.append(f"chain head ({head.seq}) does not match the log ({seq})")
        if not verify_head(public_key or head.public_key, head.seq, head.hash, head.signature):
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

    def count(self) -> int:
        """Number of entries in the log."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(transfers)).scalar() or 0)
