"""The ledger: transfers, balances, chain head, API keys, usage records.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transfers",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=False),
        sa.Column("key", sa.String(200), nullable=False, unique=True),
        sa.Column("debit", sa.String(200), nullable=False),
        sa.Column("credit", sa.String(200), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("amount > 0", name="amount_positive"),
        sa.CheckConstraint("debit <> credit", name="distinct_accounts"),
    )
    op.create_index("ix_transfers_debit", "transfers", ["debit"])
    op.create_index("ix_transfers_credit", "transfers", ["credit"])
    op.create_table(
        "balances",
        sa.Column("account", sa.String(200), primary_key=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "chain_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("account", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_api_keys_account", "api_keys", ["account"])
    op.create_table(
        "usage",
        sa.Column("job_id", sa.String(100), primary_key=True),
        sa.Column("account", sa.String(200), nullable=False),
        sa.Column("miner", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cost", sa.BigInteger, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_usage_account", "usage", ["account"])
    op.create_index("ix_usage_miner", "usage", ["miner"])


def downgrade() -> None:
    for table in ("usage", "api_keys", "chain_head", "balances", "transfers"):
        op.drop_table(table)
