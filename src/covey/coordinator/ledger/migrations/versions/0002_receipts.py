"""Receipts: the miner's signed account of each settled request, countersigned.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts",
        sa.Column("job_id", sa.String(100), primary_key=True),
        sa.Column("account", sa.String(200), nullable=False),
        sa.Column("miner", sa.String(64), nullable=False),
        sa.Column("receipt", sa.Text, nullable=False),
        sa.Column("miner_signature", sa.String(128), nullable=False),
        sa.Column("coordinator_signature", sa.String(128), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_receipts_account", "receipts", ["account"])
    op.create_index("ix_receipts_miner", "receipts", ["miner"])


def downgrade() -> None:
    op.drop_table("receipts")
