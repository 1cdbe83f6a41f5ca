"""What a failed check costs a miner: the user made whole, part of the stake slashed, the
validator rewarded, the evidence kept.

One ledger operation per failed check (idempotency key ``penalty:<check id>``), so a check
judged twice moves money once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Table, func, select

from covey.coordinator.ledger.bank import Bank, escrow, miner, stake_account, user
from covey.coordinator.ledger.schema import checks, receipts, transfers
from covey.coordinator.ledger.store import TREASURY, Transfer


@dataclass(frozen=True)
class Evidence:
    """Why a miner failed: ``kind`` is ``trial``, ``sampled`` or ``usage``; ``verdict`` the
    judge's reasons and figures; ``account`` the user who paid for ``job_id`` (None for a
    trial); ``validator`` the miner that re-checked (None when the coordinator itself saw the
    fault)."""

    check_id: str
    kind: str
    job_id: str
    miner_id: str
    model_sha256: str
    verdict: dict[str, object]
    account: str | None = None
    validator: str | None = None


@dataclass(frozen=True)
class Penalty:
    """µcr moved by a penalty: ``slashed`` from the stake, ``to_validator`` of it paid to
    the validator, ``refunded`` to the user (from the miner's pay for the job, then the
    slashed stake, then the treasury's fee)."""

    slashed: int
    to_validator: int
    refunded: int


def penalize(bank: Bank, evidence: Evidence, slash_bps: int, validator_bps: int
             ) -> Penalty | None:
    """Apply one failed check: refund what the user paid for the job, slash ``slash_bps``
    basis points of the miner's stake, pay ``validator_bps`` basis points of the slashed
    amount (after the refund's share) to the validator, the rest to the treasury, and store
    the evidence with the job's receipt. Returns None if this check was already applied.

    The refund comes first from the miner's balance (up to what the job paid it), then from
    the slashed stake, then from the treasury (up to the fee it took), so a user is made whole
    whenever the job was paid at all.
    """
    m, a = evidence.miner_id, evidence.account
    cost, pay = job_cost(bank, evidence.job_id) if a else (0, 0)
    receipt = _receipt(bank, evidence.job_id)  # read here: the writer's thread must not wait
    result: list[Penalty] = []
    validator = miner(evidence.validator) if evidence.validator else None
    accounts = [stake_account(m), miner(m), TREASURY]
    accounts += [user(a)] if a else []
    accounts += [validator] if validator else []

    def make(bal: Mapping[str, int]) -> list[Transfer]:
        slashed = bal.get(stake_account(m), 0) * slash_bps // 10_000
        ops: list[Transfer] = []
        owed = cost
        if a:
            clawback = min(owed, pay, max(bal.get(miner(m), 0), 0))
            from_stake = min(owed - clawback, slashed)
            from_fees = max(0, min(owed - clawback - from_stake, cost - pay,
                                   bal.get(TREASURY, 0)))
            ops += [Transfer(miner(m), user(a), clawback, "clawback"),
                    Transfer(stake_account(m), user(a), from_stake, "slash"),
                    Transfer(TREASURY, user(a), from_fees, "refund")]
            owed = clawback + from_stake + from_fees
        else:
            from_stake = 0
        rest = slashed - from_stake
        reward = rest * validator_bps // 10_000 if validator else 0
        if validator:
            ops.append(Transfer(stake_account(m), validator, reward, "slash"))
        ops.append(Transfer(stake_account(m), TREASURY, rest - reward, "slash"))
        result.append(Penalty(slashed, reward, owed))
        return [t for t in ops if t.amount > 0]

    def record() -> list[tuple[Table, dict[str, object]]]:
        p = result[0]
        return [(checks, {
            "check_id": evidence.check_id, "kind": evidence.kind, "job_id": evidence.job_id,
            "account": a, "miner": m, "validator": evidence.validator,
            "model_sha256": evidence.model_sha256,
            "verdict": json.dumps(evidence.verdict, sort_keys=True),
            "receipt": receipt, "slashed": p.slashed,
            "to_validator": p.to_validator, "refunded": p.refunded,
            "created_us": time.time_ns() // 1000})]

    applied = bank.ledger.post_computed(f"penalty:{evidence.check_id}", accounts, make,
                                        also=record)
    return result[0] if applied and result else None


def job_cost(bank: Bank, job_id: str) -> tuple[int, int]:
    """(what the user paid for ``job_id``: the miner's pay plus the fee, what the miner got
    of it), in µcr, from the job's settlement transfers."""
    q = select(transfers.c.kind, func.sum(transfers.c.amount)).where(
        transfers.c.debit == escrow(job_id), transfers.c.kind.in_(["pay", "fee"])
    ).group_by(transfers.c.kind)
    with bank.ledger.engine.connect() as conn:
        paid = {kind: int(amount) for kind, amount in conn.execute(q)}
    return paid.get("pay", 0) + paid.get("fee", 0), paid.get("pay", 0)


def _receipt(bank: Bank, job_id: str) -> str | None:
    """The stored receipt row of ``job_id`` as JSON (receipt and both signatures)."""
    with bank.ledger.engine.connect() as conn:
        row = conn.execute(select(receipts).where(receipts.c.job_id == job_id)
                           ).mappings().first()
    if row is None:
        return None
    return json.dumps({"receipt": json.loads(row["receipt"]),
                       "miner_signature": row["miner_signature"],
                       "coordinator_signature": bank.countersignature(row)},
                      sort_keys=True)


def failed_checks(bank: Bank, miner_id: str | None = None, limit: int = 100
                  ) -> list[dict[str, object]]:
    """The latest failed checks (all miners, or ``miner_id``'s), newest first."""
    q = select(checks).order_by(checks.c.created_us.desc()).limit(limit)
    if miner_id is not None:
        q = q.where(checks.c.miner == miner_id)
    with bank.ledger.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    return [{**dict(r), "verdict": json.loads(r["verdict"]),
             "receipt": json.loads(r["receipt"]) if r["receipt"] else None} for r in rows]
