"""Indexes that no lagging statistics can turn against the claim, and one for cleanup-acked.

* The index cleanup-stuck reads covered `state = 1` rows. Any claim of expired leases (`state = 1`
  too) could use it, and did whenever the statistics saw few deliveries: a full read of every
  delivery in the table, per claim. Keyed on `locked_at IS NOT NULL` instead (a delivered message
  is the only one with a lock time), only cleanup-stuck, which says so, can use it.
* cleanup-acked deleted by `acked_at` with no index leading on it: a full read of the ack log,
  which grows with every ack call.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 16:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LOCKED = "ix_subscription_messages_locked_at"
ACKED_AT = "ix_acked_messages_acked_at"


def upgrade():
    op.drop_index(LOCKED, table_name="subscription_messages")
    op.create_index(
        LOCKED, "subscription_messages", ["locked_at"], postgresql_where=sa.text("locked_at IS NOT NULL")
    )
    op.create_index(ACKED_AT, "acked_messages", ["acked_at"])


def downgrade():
    op.drop_index(ACKED_AT, table_name="acked_messages")
    op.drop_index(LOCKED, table_name="subscription_messages")
    op.create_index(LOCKED, "subscription_messages", ["locked_at"], postgresql_where=sa.text("state = 1"))
