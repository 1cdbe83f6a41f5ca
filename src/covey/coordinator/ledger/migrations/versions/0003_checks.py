"""Checks: the evidence and money of each failed verification.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checks",
        sa.Column("check_id", sa.String(100), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("job_id", sa.String(100), nullable=False),
        sa.Column("account", sa.String(200), nullable=True),
        sa.Column("miner", sa.String(64), nullable=False),
        sa.Column("validator", sa.String(64), nullable=True),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("verdict", sa.Text, nullable=False),
        sa.Column("receipt", sa.Text, nullable=True),
        sa.Column("slashed", sa.BigInteger, nullable=False),
        sa.Column("to_validator", sa.BigInteger, nullable=False),
        sa.Column("refunded", sa.BigInteger, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_checks_job_id", "checks", ["job_id"])
    op.create_index("ix_checks_miner", "checks", ["miner"])


def downgrade() -> None:
    op.drop_table("checks")
