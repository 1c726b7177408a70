"""The ack log's index carries count, so the acked metric is an index-only scan.

Without it a generic plan of the metrics query (psycopg prepares statements after five runs)
read the whole ack log whenever few subscriptions had acked (tests/test_query_plans.py).
The log is pruned by cleanup-acked, so rebuilding its index in one transaction is brief.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 20:30:00
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

INDEX = "ix_acked_messages_subscription_id_acked_at"


def upgrade():
    op.drop_index(INDEX, table_name="acked_messages")
    op.create_index(INDEX, "acked_messages", ["subscription_id", "acked_at"], postgresql_include=["count"])


def downgrade():
    op.drop_index(INDEX, table_name="acked_messages")
    op.create_index(INDEX, "acked_messages", ["subscription_id", "acked_at"])
