"""Covey's money rules on top of the ledger: sign-up grants, API keys, escrow per request,
stake, unstake with an unbonding period, slashing.

Account ids: ``user:<id>``, ``miner:<public key>``, ``escrow:<job id>``, ``stake:<public
key>``, ``unbonding:<public key>``, ``treasury``, ``faucet``.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Table, func, insert, select

from covey.coordinator.ledger.pricing import Settlement, settle
from covey.coordinator.ledger.schema import api_keys, balances, receipts, transfers, usage
from covey.coordinator.ledger.store import FAUCET, TREASURY, Ledger, LedgerError, Transfer
from covey.protocol.receipts import Receipt, countersign
from covey.protocol.signing import canonical_json

KEY_PREFIX = "sk-covey-"
_ACCOUNT_ID = re.compile(r"[0-9a-f]{16}")
_MINER_ID = re.compile(r"[0-9a-f]{64}")


def user(account_id: str) -> str:
    return f"user:{account_id}"


def miner(miner_id: str) -> str:
    return f"miner:{miner_id}"


def escrow(job_id: str) -> str:
    return f"escrow:{job_id}"


def stake_account(miner_id: str) -> str:
    return f"stake:{miner_id}"


def unbonding(miner_id: str) -> str:
    return f"unbonding:{miner_id}"


def hash_key(api_key: str) -> str:
    """SHA-256 hex of an API key: keys are random 256-bit strings, so a fast hash suffices
    (a slow password hash protects low-entropy secrets, which these are not)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class UsageRecord:
    """What a settled request used: its model and token counts."""

    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class BankPolicy:
    """``grant``: µcr a new account receives from the faucet (0: none); ``fee_bps``: the
    protocol fee in basis points of a miner's pay; ``unbonding_s``: seconds unstaked credits
    stay locked; ``min_stake``: µcr a miner must have staked to receive paid jobs."""

    grant: int = 10_000_000
    fee_bps: int = 500
    unbonding_s: float = 7 * 24 * 3600
    min_stake: int = 0


class Bank:
    """Money operations, each one idempotent ledger post."""

    def __init__(self, ledger: Ledger, policy: BankPolicy) -> None:
        self.ledger = ledger
        self.policy = policy
        self._key_cache: dict[str, str] = {}

    # --- accounts and keys ---------------------------------------------------------------

    def sign_up(self) -> tuple[str, str]:
        """Create an account with one API key and the faucet grant: (account id, key).

        The key is returned once and stored only as its hash.
        """
        account_id = secrets.token_hex(8)
        return account_id, self.new_key(account_id)

    def new_key(self, account_id: str) -> str:
        """A fresh API key for ``account_id``; grants the faucet amount on first use."""
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.ledger.engine.begin() as conn:
            conn.execute(insert(api_keys).values(
                key_hash=hash_key(api_key), account=account_id, prefix=api_key[:12],
                created_us=time.time_ns() // 1000))
        if self.policy.grant > 0:
            self.ledger.post(f"grant:{account_id}",
                             [Transfer(FAUCET, user(account_id), self.policy.grant, "grant")])
        return api_key

    def cached_account(self, api_key: str) -> str | None:
        """The account of a key seen before, without touching the database (None if not)."""
        return self._key_cache.get(hash_key(api_key))

    def authenticate(self, api_key: str) -> str | None:
        """The account id an API key belongs to, or None."""
        digest = hash_key(api_key)
        account = self._key_cache.get(digest)
        if account is None:
            with self.ledger.engine.connect() as conn:
                account = conn.execute(select(api_keys.c.account)
                                       .where(api_keys.c.key_hash == digest)).scalar()
            if account is not None:
                self._key_cache[digest] = account
        return account

    def transfer(self, from_account: str, to_account: str, amount: int, op: str) -> bool:
        """Send ``amount`` µcr from a user to another user (an account id) or to a miner
        (``miner:<public key>``, e.g. to fund its stake); False if ``op`` was already done.

        Raises:
            InsufficientFunds: the sender cannot cover it.
            LedgerError: ``to_account`` is not a valid account id.
        """
        if to_account.startswith("miner:"):
            if not _MINER_ID.fullmatch(to_account.removeprefix("miner:")):
                raise LedgerError(f"{to_account!r} is not a miner account (miner:<64 hex>)")
            target = to_account
        elif _ACCOUNT_ID.fullmatch(to_account):
            target = user(to_account)
        else:
            raise LedgerError(f"{to_account!r} is not an account id")
        return self.ledger.post(f"transfer:{op}", [Transfer(user(from_account), target,
                                                            amount, "transfer")])

    # --- escrow --------------------------------------------------------------------------

    def hold(self, job_id: str, account_id: str, amount: int) -> None:
        """Move a request's maximum cost from the user into its escrow.

        Raises:
            InsufficientFunds: the user cannot cover ``amount``.
        """
        if amount > 0:
            self.ledger.post(f"hold:{job_id}",
                             [Transfer(user(account_id), escrow(job_id), amount, "hold")])

    def settle(self, job_id: str, account_id: str, miner_id: str, charge: int,
               record: UsageRecord | None = None,
               receipt: tuple[Receipt, str] | None = None) -> Settlement | None:
        """Close a job's escrow once: pay the miner ``charge`` less the fee, refund the rest,
        and store ``record`` and the miner's ``receipt`` (with its signature; the
        coordinator countersigns it here) in the same transaction. Returns the split, or
        None when the escrow was already closed (a second call changes nothing).
        """
        box = escrow(job_id)
        result: list[Settlement] = []

        def make(bal: Mapping[str, int]) -> list[Transfer]:
            s = settle(bal.get(box, 0), charge, self.policy.fee_bps)
            result.append(s)
            ops = [Transfer(box, miner(miner_id), s.miner, "pay"),
                   Transfer(box, TREASURY, s.fee, "fee"),
                   Transfer(box, user(account_id), s.refund, "refund")]
            return [t for t in ops if t.amount > 0]

        def write_usage() -> list[tuple[Table, dict[str, object]]]:
            rows: list[tuple[Table, dict[str, object]]] = []
            now = time.time_ns() // 1000
            if record is not None:
                rows.append((usage, {
                    "job_id": job_id, "account": account_id, "miner": miner_id,
                    "model": record.model, "prompt_tokens": record.prompt_tokens,
                    "completion_tokens": record.completion_tokens,
                    "cost": result[0].miner + result[0].fee, "created_us": now}))
            if receipt is not None:
                signed, signature = receipt
                rows.append((receipts, {
                    "job_id": job_id, "account": account_id, "miner": signed.miner,
                    "receipt": canonical_json(signed.model_dump()).decode(),
                    "miner_signature": signature,
                    "coordinator_signature": countersign(self.ledger.key, signed, signature),
                    "created_us": now}))
            return rows

        applied = self.ledger.post_computed(
            f"close:{job_id}", [box, miner(miner_id), TREASURY, user(account_id)], make,
            also=write_usage)
        return result[0] if applied and result else None

    def receipt(self, job_id: str, account_id: str) -> dict[str, object] | None:
        """The stored receipt of ``job_id`` if ``account_id`` made the request: receipt,
        miner and coordinator signatures, and the coordinator's public key (hex)."""
        q = select(receipts).where(receipts.c.job_id == job_id,
                                   receipts.c.account == account_id)
        with self.ledger.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
        if row is None:
            return None
        return {"object": "receipt", "receipt": json.loads(row["receipt"]),
                "miner_signature": row["miner_signature"],
                "coordinator": self.ledger.public_key,
                "coordinator_signature": row["coordinator_signature"]}

    def usage_by_model(self, account_id: str) -> dict[str, dict[str, int]]:
        """Requests, tokens and µcr spent per model by ``account_id``."""
        q = (select(usage.c.model, func.count(), func.sum(usage.c.prompt_tokens),
                    func.sum(usage.c.completion_tokens), func.sum(usage.c.cost))
             .where(usage.c.account == account_id).group_by(usage.c.model))
        with self.ledger.engine.connect() as conn:
            return {m: {"requests": int(n), "prompt_tokens": int(p or 0),
                        "completion_tokens": int(c or 0), "cost": int(cost or 0)}
                    for m, n, p, c, cost in conn.execute(q)}

    def miner_earnings(self, miner_id: str) -> dict[str, int]:
        """A miner's jobs paid, tokens served and µcr earned (after the fee)."""
        q = (select(func.count(), func.sum(usage.c.completion_tokens))
             .where(usage.c.miner == miner_id))
        with self.ledger.engine.connect() as conn:
            jobs, tokens = conn.execute(q).one()
        return {"jobs": int(jobs), "completion_tokens": int(tokens or 0),
                "balance": self.ledger.balance(miner(miner_id)),
                "staked": self.staked(miner_id)}

    def balance_and_held(self, account_id: str) -> tuple[int, int]:
        """(balance, µcr in open escrows) of ``account_id``, read in one statement so both
        come from the same snapshot (a settlement landing between two reads would otherwise
        show credits in neither place)."""
        funded = (select(transfers.c.credit).where(transfers.c.debit == user(account_id))
                  .where(transfers.c.kind == "hold").distinct())
        q = select(
            select(balances.c.balance).where(balances.c.account == user(account_id))
            .scalar_subquery(),
            select(func.sum(balances.c.balance)).where(balances.c.account.in_(funded))
            .scalar_subquery())
        with self.ledger.engine.connect() as conn:
            balance, held = conn.execute(q).one()
        return int(balance or 0), int(held or 0)

    def account_exists(self, account: str) -> bool:
        """True for a signed-up user's account id, or ``miner:<id>`` of a miner the ledger
        has seen (paid, funded or staked)."""
        with self.ledger.engine.connect() as conn:
            if account.startswith("miner:"):
                q = select(balances.c.account).where(balances.c.account.in_(
                    [account, stake_account(account.removeprefix("miner:"))]))
            else:
                q = select(api_keys.c.account).where(api_keys.c.account == account)
            return conn.execute(q.limit(1)).first() is not None

    def refund(self, job_id: str, account_id: str) -> int:
        """Return a failed job's whole escrow to the user; µcr refunded (0 if already
        closed)."""
        box = escrow(job_id)
        refunded: list[int] = []

        def make(bal: Mapping[str, int]) -> list[Transfer]:
            refunded.append(bal.get(box, 0))
            return [Transfer(box, user(account_id), refunded[0], "refund")] if refunded[0] else []

        applied = self.ledger.post_computed(f"close:{job_id}", [box, user(account_id)], make)
        return refunded[0] if applied and refunded else 0

    def refund_open_escrows(self) -> int:
        """Refund every escrow still holding credits (jobs that died with a coordinator);
        returns how many. Run at start-up, before serving."""
        n = 0
        for account, held in self.ledger.balances_like("escrow:").items():
            if held <= 0:
                continue
            job_id = account.removeprefix("escrow:")
            hold = self.ledger.entries_with_key_prefix(f"hold:{job_id}:")
            if not hold:
                raise LedgerError(f"{account} holds credits but has no hold entry")
            payer = str(hold[0]["debit"]).removeprefix("user:")
            self.refund(job_id, payer)
            n += 1
        return n

    # --- stake ---------------------------------------------------------------------------

    def stake(self, miner_id: str, amount: int, op: str) -> None:
        """Lock ``amount`` µcr of a miner's earnings as stake (``op``: idempotency key)."""
        self.ledger.post(f"stake:{op}",
                         [Transfer(miner(miner_id), stake_account(miner_id), amount, "stake")])

    def unstake(self, miner_id: str, amount: int, op: str) -> None:
        """Start unbonding ``amount`` µcr; it returns to the miner after the unbonding period."""
        self.ledger.post(f"unstake:{op}", [Transfer(stake_account(miner_id),
                                                    unbonding(miner_id), amount, "unstake")])

    def release_unbonded(self, miner_id: str, now_us: int | None = None) -> int:
        """Move unbonded stake whose period has passed back to the miner; µcr released."""
        now_us = now_us if now_us is not None else time.time_ns() // 1000
        cutoff = now_us - int(self.policy.unbonding_s * 1_000_000)
        entries = self.ledger.history(unbonding(miner_id), limit=1_000_000)
        matured = sum(int(e["amount"]) for e in entries  # type: ignore[call-overload]
                      if e["kind"] == "unstake" and int(e["created_us"]) <= cutoff)
        released = sum(int(e["amount"]) for e in entries if e["kind"] == "release")
        due = min(matured - released, self.ledger.balance(unbonding(miner_id)))
        if due > 0:
            self.ledger.post(f"release:{miner_id}:{released + due}",
                             [Transfer(unbonding(miner_id), miner(miner_id), due, "release")])
        return max(due, 0)

    def slash(self, miner_id: str, amount: int, reason: str, op: str) -> int:
        """Take up to ``amount`` µcr of a miner's stake to the treasury; µcr slashed.

        ``reason`` is recorded in the idempotency key (``slash:<op>:<reason>``).
        """
        amount = min(amount, self.ledger.balance(stake_account(miner_id)))
        if amount > 0:
            self.ledger.post(f"slash:{op}:{reason}"[:180],
                             [Transfer(stake_account(miner_id), TREASURY, amount, "slash")])
        return max(amount, 0)

    def staked(self, miner_id: str) -> int:
        return self.ledger.balance(stake_account(miner_id))
