"""Tables of the ledger (SQLAlchemy Core). Alembic migrations in ``migrations/`` create them.

``transfers`` is append-only: rows are only ever inserted. ``balances`` is a cache of the
sums, written in the same transaction as the transfers; ``chain_head`` holds the last entry's
hash and the coordinator's signature over it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

transfers = Table(
    "transfers", metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=False),
    Column("key", String(200), nullable=False, unique=True),
    Column("debit", String(200), nullable=False, index=True),
    Column("credit", String(200), nullable=False, index=True),
    Column("amount", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("debit <> credit", name="distinct_accounts"),
)

balances = Table(
    "balances", metadata,
    Column("account", String(200), primary_key=True),
    Column("balance", BigInteger, nullable=False),
)

chain_head = Table(
    "chain_head", metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("signature", String(128), nullable=False),
    Column("public_key", String(64), nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("account", String(200), nullable=False, index=True),
    Column("prefix", String(16), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("name", String(64), nullable=False, server_default=""),
    Column("revoked_us", BigInteger, nullable=True),
)
"""API keys, stored only as SHA-256 hashes. A revoked key keeps its row (``revoked_us`` set)
so its id stays taken and the account's history stays readable; keys made before names
existed have the name ``""``."""

invites = Table(
    "invites", metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("grant", BigInteger, nullable=True),
    Column("max_uses", Integer, nullable=False),
    Column("used", Integer, nullable=False, server_default="0"),
    Column("created_us", BigInteger, nullable=False),
)
"""Invite codes (SHA-256 hashes only): µcr each sign-up with the code receives (NULL: the
faucet's grant), and how many sign-ups it allows."""

usage = Table(
    "usage", metadata,
    Column("job_id", String(100), primary_key=True),
    Column("account", String(200), nullable=False, index=True),
    Column("miner", String(64), nullable=False, index=True),
    Column("model", String(200), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost", BigInteger, nullable=False),
    Column("created_us", BigInteger, nullable=False),
)
"""One row per settled request: what was used and charged (µcr), for accounts and audits."""

receipts = Table(
    "receipts", metadata,
    Column("job_id", String(100), primary_key=True),
    Column("account", String(200), nullable=False, index=True),
    Column("miner", String(64), nullable=False, index=True),
    Column("receipt", Text, nullable=False),
    Column("miner_signature", String(128), nullable=False),
    Column("coordinator_signature", String(128), nullable=False),
    Column("created_us", BigInteger, nullable=False),
)
"""The miner's signed receipt of each settled request (canonical JSON). An empty
``coordinator_signature`` is made when the row is read
(:meth:`~covey.coordinator.ledger.bank.Bank.countersignature`)."""

checks = Table(
    "checks", metadata,
    Column("check_id", String(100), primary_key=True),
    Column("kind", String(20), nullable=False),
    Column("job_id", String(100), nullable=False, index=True),
    Column("account", String(200), nullable=True),
    Column("miner", String(64), nullable=False, index=True),
    Column("validator", String(64), nullable=True),
    Column("model_sha256", String(64), nullable=False),
    Column("verdict", Text, nullable=False),
    Column("receipt", Text, nullable=True),
    Column("slashed", BigInteger, nullable=False),
    Column("to_validator", BigInteger, nullable=False),
    Column("refunded", BigInteger, nullable=False),
    Column("created_us", BigInteger, nullable=False),
)
"""One row per failed check (trial, sampled re-check or usage recount): the evidence (the
verdict with its figures, the miner's signed receipt when there is one) and the money it
moved (µcr slashed, paid to the validator, refunded to the user)."""

replicas = Table(
    "replicas", metadata,
    Column("replica_id", String(64), primary_key=True),
    Column("started_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
)
"""Coordinator replicas sharing this ledger, each with its lease: a replica renews
``expires_us`` while it lives (:mod:`covey.coordinator.ledger.replicas`)."""

escrow_owners = Table(
    "escrow_owners", metadata,
    Column("job_id", String(100), primary_key=True),
    Column("replica_id", String(64), nullable=False, index=True),
    Column("account", String(200), nullable=False),
    Column("created_us", BigInteger, nullable=False),
)
"""Which replica holds each escrow (written in the hold's own transaction): only escrows of
a replica whose lease expired are refunded by another."""
