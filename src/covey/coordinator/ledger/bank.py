"""Covey's money rules on top of the ledger: sign-up grants, API keys, escrow per request,
stake, unstake with an unbonding period, slashing.

Account ids: ``user:<id>``, ``miner:<public key>``, ``escrow:<job id>``, ``stake:<public
key>``, ``unbonding:<public key>``, ``treasury``, ``faucet``.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, func, literal_column, select

from covey.coordinator.ledger import keys
from covey.coordinator.ledger.invites import claim
from covey.coordinator.ledger.keys import KeyInfo, hash_key
from covey.coordinator.ledger.pricing import Settlement, settle, split
from covey.coordinator.ledger.schema import (
    api_keys,
    balances,
    escrow_owners,
    receipts,
    transfers,
    usage,
)
from covey.coordinator.ledger.store import (
    FAUCET,
    TREASURY,
    Ledger,
    LedgerError,
    Operation,
    Transfer,
)
from covey.protocol.receipts import Receipt, countersign
from covey.protocol.signing import canonical_json

_ACCOUNT_ID = re.compile(r"[0-9a-f]{16}")
_MINER_ID = re.compile(r"[0-9a-f]{64}")
DAY_US = 86_400_000_000
"""A UTC day in microseconds (the ledger's clock unit)."""
KEY_CACHE_S = 60.0
"""Seconds a key's account is trusted from memory before the database is asked again: a key
revoked through another coordinator replica stops working here within this time (one
revoked here, at once)."""


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
        # key hash → (account, when it was read from the database, monotonic seconds)
        self._key_cache: dict[str, tuple[str, float]] = {}
        self._revoked: set[str] = set()
        """Hashes of keys revoked by this process: never cached again (64 bytes each)."""
        self.replica: str | None = None
        """This coordinator's replica id: each hold records it as the escrow's owner
        (:mod:`covey.coordinator.ledger.replicas`); None writes no owner."""

    # --- accounts and keys ---------------------------------------------------------------

    def sign_up(self, invite_code: str | None = None) -> tuple[str, str]:
        """Create an account with one API key (named "default") and its grant: (account
        id, key). The key is returned once and stored only as its hash.

        The grant is the invite's (µcr) when ``invite_code`` is given and the code has one,
        else the faucet's (``policy.grant``). The invite's use and the key are written in one
        transaction, so a failed sign-up spends no use.

        Raises:
            InvalidInvite: ``invite_code`` is unknown or used up.
        """
        account_id = secrets.token_hex(8)
        grant = self.policy.grant
        with self.ledger.engine.begin() as conn:
            if invite_code is not None:
                invited = claim(conn, invite_code)
                grant = grant if invited is None else invited
            api_key, _ = keys.insert_key(conn, account_id, keys.DEFAULT_NAME)
        if grant > 0:  # idempotent by account: an account is granted once, ever
            self.ledger.post(f"grant:{account_id}",
                             [Transfer(FAUCET, user(account_id), grant, "grant")])
        return account_id, api_key

    def new_key(self, account_id: str, name: str) -> tuple[str, KeyInfo]:
        """Another API key for an existing account (no grant): (the key, shown once; its
        info). Raises :class:`~covey.coordinator.ledger.keys.TooManyKeys`."""
        return keys.create_key(self.ledger.engine, account_id, name)

    def revoke_key(self, account_id: str, key_id: str) -> None:
        """Revoke one of the account's keys by its public id; it stops working at once here.

        Raises:
            KeyNotFound, LastKey: see :func:`~covey.coordinator.ledger.keys.revoke_key`.
        """
        digest = keys.revoke_key(self.ledger.engine, account_id, key_id)
        self._revoked.add(digest)
        self._key_cache.pop(digest, None)

    def cached_account(self, api_key: str) -> str | None:
        """The account of a key seen in the last :data:`KEY_CACHE_S` seconds, without
        touching the database (None if not)."""
        hit = self._key_cache.get(hash_key(api_key))
        if hit is None or time.monotonic() - hit[1] > KEY_CACHE_S:
            return None
        return hit[0]

    def authenticate(self, api_key: str) -> str | None:
        """The account id an active (not revoked) API key belongs to, or None."""
        account = self.cached_account(api_key)
        if account is None:
            digest = hash_key(api_key)
            with self.ledger.engine.connect() as conn:
                account = conn.execute(select(api_keys.c.account).where(
                    api_keys.c.key_hash == digest, api_keys.c.revoked_us.is_(None))).scalar()
            # A revoke that committed after the read above must not be undone by caching
            # what the read saw.
            if account is not None and digest not in self._revoked:
                self._key_cache[digest] = (account, time.monotonic())
            elif digest in self._revoked:
                account = None
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
        op = self.hold_op(job_id, account_id, amount)
        if op is not None:
            self.ledger.run(op)

    def hold_op(self, job_id: str, account_id: str, amount: int) -> Operation[bool] | None:
        """:meth:`hold` as an operation to run (None: nothing to hold)."""
        if amount <= 0:
            return None
        owner = None
        if self.replica is not None:
            row = {"job_id": job_id, "replica_id": self.replica, "account": account_id,
                   "created_us": time.time_ns() // 1000}
            owner = lambda: (escrow_owners, row)  # noqa: E731
        return Operation.of(f"hold:{job_id}",
                           [Transfer(user(account_id), escrow(job_id), amount, "hold")],
                           also=owner)

    def settle(self, job_id: str, account_id: str, miner_id: str, charge: int,
               record: UsageRecord | None = None,
               receipt: tuple[Receipt, str] | None = None,
               shares: Sequence[tuple[str, int]] = (),
               shard_receipts: Sequence[tuple[Receipt, str]] = ()) -> Settlement | None:
        """Close a job's escrow once: pay the miner ``charge`` less the fee, refund the rest,
        and store ``record`` and the miner's ``receipt`` (with its signature; the
        coordinator countersigns it when it is read: :meth:`countersignature`) in the same
        transaction. ``shares`` (miner id,
        blocks) splits the miners' pay among a sharded model's chain instead, in
        proportion (:func:`~covey.coordinator.ledger.pricing.split`), and stores their
        ``shard_receipts`` (each under its chain session's id). Returns the split,
        or None when the escrow was already closed (a second call changes nothing).
        """
        return self.ledger.run(self.settle_op(job_id, account_id, miner_id, charge, record,
                                              receipt, shares, shard_receipts))

    def settle_op(self, job_id: str, account_id: str, miner_id: str, charge: int,
                  record: UsageRecord | None = None,
                  receipt: tuple[Receipt, str] | None = None,
                  shares: Sequence[tuple[str, int]] = (),
                  shard_receipts: Sequence[tuple[Receipt, str]] = ()
                  ) -> Operation[Settlement | None]:
        """:meth:`settle` as an operation to run."""
        box = escrow(job_id)
        result: list[Settlement] = []
        payees = [m for m, _ in shares] or [miner_id]

        def make(bal: Mapping[str, int]) -> list[Transfer]:
            s = settle(bal.get(box, 0), charge, self.policy.fee_bps)
            result.append(s)
            parts = split(s.miner, shares) if shares else [(miner_id, s.miner)]
            ops = [*(Transfer(box, miner(m), amount, "pay") for m, amount in parts),
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
            signed_by = [(job_id, r) for r in ([receipt] if receipt is not None else [])]
            # A shard's receipt is stored under its chain session's id, "<job_id>.<n>".
            signed_by += [(r[0].job_id, r) for r in shard_receipts
                          if r[0].job_id.startswith(f"{job_id}.")]
            for key, (signed, signature) in signed_by:
                rows.append((receipts, {
                    "job_id": key, "account": account_id, "miner": signed.miner,
                    "receipt": canonical_json(signed.model_dump()).decode(),
                    "miner_signature": signature,
                    # Countersigned when read (countersignature()): Ed25519 is
                    # deterministic, so that is the very signature made now, and a job's
                    # commit does not pay for one few receipts are ever asked for.
                    "coordinator_signature": "",
                    "created_us": now}))
            return rows

        return Operation.computed(
            f"close:{job_id}", [box, *dict.fromkeys(miner(m) for m in payees), TREASURY,
                                user(account_id)], make, also=write_usage,
            finish=lambda applied: result[0] if applied and result else None)

    def receipt(self, job_id: str, account_id: str) -> dict[str, object] | None:
        """The stored receipt of ``job_id`` if ``account_id`` made the request: receipt,
        miner and coordinator signatures, and the coordinator's public key (hex). A
        sharded model's request has one receipt per shard, stored under
        ``<job_id>.<n>``: they come as ``shards``, a list of such objects."""
        q = select(receipts).where(receipts.c.job_id == job_id,
                                   receipts.c.account == account_id)
        # The shards' ids sort between "<job_id>." and "<job_id>/" ("/" follows "."): a
        # range, never LIKE, whose wildcards a job id could hold.
        shards = select(receipts).where(receipts.c.job_id > f"{job_id}.",
                                        receipts.c.job_id < f"{job_id}/",
                                        receipts.c.account == account_id
                                        ).order_by(receipts.c.created_us, receipts.c.job_id)
        with self.ledger.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
            parts = [] if row is not None else list(conn.execute(shards).mappings())
        if row is None and not parts:
            return None
        if row is None:
            return {"object": "receipt.shards", "job_id": job_id,
                    "shards": [self._receipt_body(r) for r in parts]}
        return self._receipt_body(row)

    def _receipt_body(self, row: Mapping[str, Any]) -> dict[str, object]:
        return {"object": "receipt", "receipt": json.loads(row["receipt"]),
                "miner_signature": row["miner_signature"],
                "coordinator": self.ledger.public_key,
                "coordinator_signature": self.countersignature(row)}

    def countersignature(self, row: Mapping[str, Any]) -> str:
        """The coordinator's countersignature (hex) of a stored receipt ``row``: made
        with this coordinator's key when the row has none yet (rows are stored without
        one, see :meth:`settle_op`); rows of earlier versions keep the one they were
        stored with."""
        stored = row["coordinator_signature"]
        if stored:
            return str(stored)
        return countersign(self.ledger.key, Receipt.model_validate(json.loads(row["receipt"])),
                           row["miner_signature"])

    def usage_by_model(self, account_id: str) -> dict[str, dict[str, int]]:
        """Requests, tokens and µcr spent per model by ``account_id``."""
        q = (select(usage.c.model, func.count(), func.sum(usage.c.prompt_tokens),
                    func.sum(usage.c.completion_tokens), func.sum(usage.c.cost))
             .where(usage.c.account == account_id).group_by(usage.c.model))
        with self.ledger.engine.connect() as conn:
            return {m: {"requests": int(n), "prompt_tokens": int(p or 0),
                        "completion_tokens": int(c or 0), "cost": int(cost or 0)}
                    for m, n, p, c, cost in conn.execute(q)}

    def usage_by_day(self, account_id: str, days: int, now_us: int | None = None
                     ) -> list[dict[str, object]]:
        """Usage of ``account_id`` per UTC day and model over the last ``days`` days (today
        included), oldest first: ``{"date": "YYYY-MM-DD", "model", "requests",
        "prompt_tokens", "completion_tokens", "cost"}`` (µcr); days without usage are
        absent."""
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        first = (now_us // DAY_US - (days - 1)) * DAY_US
        # Integer division is portable (SQLite and PostgreSQL both truncate BIGINT / BIGINT);
        # a literal, not a bound parameter, so GROUP BY repeats the very same expression.
        day = usage.c.created_us // literal_column(str(DAY_US))
        q = (select(day, usage.c.model, func.count(), func.sum(usage.c.prompt_tokens),
                    func.sum(usage.c.completion_tokens), func.sum(usage.c.cost))
             .where(usage.c.account == account_id, usage.c.created_us >= first)
             .group_by(day, usage.c.model).order_by(day, usage.c.model))
        with self.ledger.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [{"date": datetime.fromtimestamp(int(d) * 86_400, UTC).date().isoformat(),
                 "model": m, "requests": int(n), "prompt_tokens": int(p or 0),
                 "completion_tokens": int(c or 0), "cost": int(cost or 0)}
                for d, m, n, p, c, cost in rows]

    def miner_earnings(self, miner_id: str) -> dict[str, int]:
        """A miner's jobs paid, tokens served and µcr earned (after the fee): see
        :meth:`miners_earnings`."""
        return self.miners_earnings([miner_id])[miner_id]

    def miners_earnings(self, miner_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """``{miner id: {"jobs", "completion_tokens", "balance", "staked"}}`` for each id:
        paid jobs, completion tokens served, µcr on the miner's account (its earnings after
        the fee, less what it staked) and µcr staked; zeros for a miner the ledger never
        saw. One statement per table on one connection, so a page polling the miners list
        costs the database the same for two miners or two hundred."""
        ids = sorted(set(miner_ids))
        out = {m: {"jobs": 0, "completion_tokens": 0, "balance": 0, "staked": 0} for m in ids}
        if not ids:
            return out
        accounts = {miner(m): (m, "balance") for m in ids} | {
            stake_account(m): (m, "staked") for m in ids}
        served = (select(usage.c.miner, func.count(), func.sum(usage.c.completion_tokens))
                  .where(usage.c.miner.in_(ids)).group_by(usage.c.miner))
        held = select(balances.c.account, balances.c.balance).where(
            balances.c.account.in_(list(accounts)))
        with self.ledger.engine.connect() as conn:
            for m, jobs, tokens in conn.execute(served):
                out[m]["jobs"] = int(jobs)
                out[m]["completion_tokens"] = int(tokens or 0)
            for account, balance in conn.execute(held):
                m, field = accounts[account]
                out[m][field] = int(balance)
        return out

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
        return self.ledger.run(self.refund_op(job_id, account_id))

    def refund_op(self, job_id: str, account_id: str) -> Operation[int]:
        """:meth:`refund` as an operation to run."""
        box = escrow(job_id)
        refunded: list[int] = []

        def make(bal: Mapping[str, int]) -> list[Transfer]:
            refunded.append(bal.get(box, 0))
            return [Transfer(box, user(account_id), refunded[0], "refund")] if refunded[0] else []

        return Operation.computed(f"close:{job_id}", [box, user(account_id)], make,
                                 finish=lambda applied: refunded[0] if applied and refunded
                                 else 0)

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
