"""Replica leases and escrow owners, for several coordinators on one ledger.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("started_us", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "escrow_owners",
        sa.Column("job_id", sa.String(100), primary_key=True),
        sa.Column("replica_id", sa.String(64), nullable=False),
        sa.Column("account", sa.String(200), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_escrow_owners_replica_id", "escrow_owners", ["replica_id"])


def downgrade() -> None:
    op.drop_table("escrow_owners")
    op.drop_table("replicas")
