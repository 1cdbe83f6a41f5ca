"""Named, revocable API keys and invite codes.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN on both dialects: SQLite accepts a NOT NULL column with a default,
    # so existing keys get the name "" (shown as "default") and stay active.
    op.add_column("api_keys", sa.Column("name", sa.String(64), nullable=False,
                                        server_default=""))
    op.add_column("api_keys", sa.Column("revoked_us", sa.BigInteger, nullable=True))
    op.create_table(
        "invites",
        sa.Column("code_hash", sa.String(64), primary_key=True),
        sa.Column("grant", sa.BigInteger, nullable=True),
        sa.Column("max_uses", sa.Integer, nullable=False),
        sa.Column("used", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("invites")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("revoked_us")
        batch.drop_column("name")
