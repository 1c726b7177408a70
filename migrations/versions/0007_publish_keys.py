"""Idempotent publish: the record of each publish sent with an Idempotency-Key.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 21:30:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "publish_keys",
        sa.Column("topic_id", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("body_hash", sa.LargeBinary(), nullable=False),
        sa.Column("message_ids", postgresql.ARRAY(sa.UUID()), server_default=sa.text("'{}'"), nullable=False),
        sa.Column(
            "subscriptions", postgresql.ARRAY(sa.Integer()), server_default=sa.text("'{}'"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("topic_id", "key", name=op.f("pk_publish_keys")),
    )
    op.create_index(op.f("ix_publish_keys_created_at"), "publish_keys", ["created_at"], unique=False)


def downgrade():
    op.drop_index(op.f("ix_publish_keys_created_at"), table_name="publish_keys")
    op.drop_table("publish_keys")
