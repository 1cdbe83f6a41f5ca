"""Closed escrows leave no balance row: drop the empty ones earlier versions kept.

A missing balance row reads as 0, so nothing a reader sees changes; the table then holds the
open escrows alone, which the duty that refunds orphaned escrows scans.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # substr, not LIKE: exact on every engine (SQLite's LIKE ignores case).
    op.execute("DELETE FROM balances WHERE balance = 0 AND substr(account, 1, 7) = 'escrow:'")


def downgrade() -> None:
    """Nothing to restore: an absent row and a zero row read the same."""
