"""Several coordinators on one ledger: replica leases, escrow owners, and duties run once.

- **Lease.** Each replica has an id (kept in its data folder, so a restarted coordinator is
  the same replica) and a row in ``replicas`` whose ``expires_us`` it renews every
  ``ttl / 3`` seconds. A replica that stops renewing (killed, cut off) is dead once its
  lease expires.
- **Escrow owners.** A hold records its replica in ``escrow_owners`` in the hold's own
  transaction, so no escrow exists without its owner. Only the owner can settle a job (it
  holds the miner's stream); an escrow of a dead replica can never be settled, and is
  refunded whole (:func:`refund_orphaned`). Escrows of live replicas are never touched:
  their jobs are running. An escrow with no owner row predates replicas and is refunded
  as before.
- **Start-up.** A replica starting refunds its own escrows (left by its previous run: none
  of them can be running now) and the orphans of dead replicas.
- **Duties.** Sweeps that must run once across replicas (refunding the escrows of replicas
  that died since, dropping the owner rows of closed escrows) run on the leader only: the
  holder of a PostgreSQL session advisory lock, which the database frees when the leader's
  connection dies. On SQLite there is one replica, which leads.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from sqlalchemy import Connection, delete, func, insert, select, update

from covey.coordinator.ledger.bank import Bank
from covey.coordinator.ledger.schema import balances, escrow_owners, replicas
from covey.coordinator.ledger.store import Ledger, LedgerError

log = logging.getLogger("covey.coordinator.ledger")

LEASE_TTL_S = 15.0
"""Seconds a replica's lease lasts unless renewed; it renews every third of that. After
a replica dies, its escrows are refunded within about this long (plus a sweep)."""
LEADER_LOCK = 0x636F7666
"""The PostgreSQL advisory lock key of the duties' leader."""


def _now_us() -> int:
    return time.time_ns() // 1000


def replica_id(data_dir: Path) -> str:
    """This coordinator's replica id: 16 random hex digits made once and kept in
    ``data_dir/replica-id``, so a restart is the same replica."""
    path = data_dir / "replica-id"
    try:
        found = path.read_text().strip()
        if found:
            return found
    except FileNotFoundError:
        pass
    made = secrets.token_hex(8)
    path.write_text(made + "\n")
    return made


class Lease:
    """``replica``'s lease in ``ledger``'s database (see the module docstring).

    ``ttl``: seconds a renewal lasts.
    """

    def __init__(self, ledger: Ledger, replica: str, ttl: float = LEASE_TTL_S) -> None:
        self.ledger = ledger
        self.replica = replica
        self.ttl = ttl
        self._leader: Connection | None = None

    def take(self) -> None:
        """Start (or restart) the lease: the row is written with a fresh expiry."""
        now = _now_us()
        with self.ledger.engine.begin() as conn:
            conn.execute(delete(replicas).where(replicas.c.replica_id == self.replica))
            conn.execute(insert(replicas).values(replica_id=self.replica, started_us=now,
                                                 expires_us=now + int(self.ttl * 1e6)))

    def renew(self) -> None:
        """Push the expiry ``ttl`` seconds ahead."""
        with self.ledger.engine.begin() as conn:
            conn.execute(update(replicas).where(replicas.c.replica_id == self.replica)
                         .values(expires_us=_now_us() + int(self.ttl * 1e6)))

    def end(self) -> None:
        """Expire the lease now (a clean shutdown, after the replica's jobs ended) and give
        up leadership."""
        with self.ledger.engine.begin() as conn:
            conn.execute(update(replicas).where(replicas.c.replica_id == self.replica)
                         .values(expires_us=_now_us()))
        self._drop_leader()

    def lead(self) -> bool:
        """Whether this replica runs the duties now: it holds (or just took) the leader's
        advisory lock. Always True on SQLite."""
        engine = self.ledger.engine
        if engine.dialect.name != "postgresql":
            return True
        if self._leader is not None:
            try:
                self._leader.exec_driver_sql("SELECT 1")
                self._leader.commit()  # not left idle in a transaction
                return True
            except Exception:  # noqa: BLE001 - the connection died: the lock went with it
                self._drop_leader()
        conn = engine.connect()
        try:
            got = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({LEADER_LOCK})").scalar()
            conn.commit()
        except Exception:
            conn.close()
            raise
        if got:
            self._leader = conn
            log.info("replica %s leads the ledger duties", self.replica)
            return True
        conn.close()
        return False

    def _drop_leader(self) -> None:
        if self._leader is not None:
            # Invalidated, not returned to the pool: the session lock must go with it.
            try:
                self._leader.invalidate()
                self._leader.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
            self._leader = None


def live_replicas(ledger: Ledger, now_us: int | None = None) -> set[str]:
    """Ids of the replicas whose lease has not expired."""
    now = _now_us() if now_us is None else now_us
    with ledger.engine.connect() as conn:
        return set(conn.execute(select(replicas.c.replica_id)
                                .where(replicas.c.expires_us > now)).scalars())


def orphaned_escrows(bank: Bank, own: str | None = None, now_us: int | None = None
                     ) -> list[tuple[str, str]]:
    """(job id, payer) of each open escrow no live replica owns: its owner's lease
    expired, or it has no owner row; with ``own``, this replica's own escrows too (at its
    start-up, when none of its jobs can be running).

    Raises:
        LedgerError: an escrow holds credits but has no hold entry (a damaged ledger).
    """
    ledger = bank.ledger
    open_boxes = {a.removeprefix("escrow:"): held
                  for a, held in ledger.balances_like("escrow:").items() if held > 0}
    if not open_boxes:
        return []
    live = live_replicas(ledger, now_us) - ({own} if own else set())
    with ledger.engine.connect() as conn:
        owners = {job: (replica, account) for job, replica, account in conn.execute(
            select(escrow_owners.c.job_id, escrow_owners.c.replica_id,
                   escrow_owners.c.account)
            .where(escrow_owners.c.job_id.in_(list(open_boxes))))}
    out = []
    for job_id in open_boxes:
        owner = owners.get(job_id)
        if owner is not None and owner[0] in live:
            continue
        if owner is not None:
            out.append((job_id, owner[1]))
            continue
        hold = ledger.entries_with_key_prefix(f"hold:{job_id}:")
        if not hold:
            raise LedgerError(f"escrow:{job_id} holds credits but has no hold entry")
        out.append((job_id, str(hold[0]["debit"]).removeprefix("user:")))
    return out


def refund_orphaned(bank: Bank, own: str | None = None) -> int:
    """Refund every escrow :func:`orphaned_escrows` names; returns how many were refunded
    now (one another replica refunded first is not counted: a refund is one ledger
    operation per job, ``close:<job id>``, applied once)."""
    n = 0
    for job_id, payer in orphaned_escrows(bank, own):
        n += bank.refund(job_id, payer) > 0
    return n


OWNER_ROWS_KEPT_S = 60.0
"""Seconds an escrow's owner row outlives its escrow at least (a sweep then drops it)."""


def prune_owners(ledger: Ledger, now_us: int | None = None,
                 kept_s: float = OWNER_ROWS_KEPT_S) -> int:
    """Drop the owner rows of escrows that closed (settled or refunded) at least
    ``kept_s`` seconds after they were written; returns how many went. Only open escrows
    need an owner (:func:`orphaned_escrows`), and one row per request would otherwise grow
    the table for ever."""
    now = _now_us() if now_us is None else now_us
    open_jobs = select(func.substr(balances.c.account, len("escrow:") + 1)).where(
        balances.c.account.startswith("escrow:"))
    with ledger.engine.begin() as conn:
        result = conn.execute(delete(escrow_owners).where(
            escrow_owners.c.created_us < now - int(kept_s * 1_000_000),
            escrow_owners.c.job_id.not_in(open_jobs)))
    return result.rowcount
