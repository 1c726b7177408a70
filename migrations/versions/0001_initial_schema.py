"""Initial schema: topics, subscriptions, the claim table and the ack log.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 17:50:46.412520
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "acked_messages",
        sa.Column("subscription_id", sa.Text(), nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
    )
    op.create_index(
        "ix_acked_messages_subscription_id_acked_at",
        "acked_messages",
        ["subscription_id", "acked_at"],
        unique=False,
    )
    op.create_table(
        "subscription_messages",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("subscription_id", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("state", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("delivery_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "available_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("locked_by", sa.Text(), nullable=True),
        sa.Column("locked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN (0, 1, 2)", name=op.f("ck_subscription_messages_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscription_messages")),
    )
    op.create_index(
        "ix_subscription_messages_claim",
        "subscription_messages",
        ["subscription_id", "state", "available_at", "seq"],
        unique=False,
    )
    op.create_index(
        "ix_subscription_messages_locked_at",
        "subscription_messages",
        ["locked_at"],
        unique=False,
        postgresql_where=sa.text("state = 1"),
    )
    op.create_table(
        "topics",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_topics")),
    )
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("topic_id", sa.Text(), nullable=False),
        sa.Column("filter", postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True),
        sa.Column("max_delivery_attempts", sa.Integer(), nullable=False),
        sa.Column("backoff_min_seconds", sa.Integer(), nullable=False),
        sa.Column("backoff_max_seconds", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "backoff_min_seconds <= backoff_max_seconds", name=op.f("ck_subscriptions_backoff_range")
        ),
        sa.ForeignKeyConstraint(
            ["topic_id"], ["topics.id"], name=op.f("fk_subscriptions_topic_id_topics"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
    )
    op.create_index(op.f("ix_subscriptions_topic_id"), "subscriptions", ["topic_id"], unique=False)


def downgrade():
    op.drop_index(op.f("ix_subscriptions_topic_id"), table_name="subscriptions")
    op.drop_table("subscriptions")
    op.drop_table("topics")
    op.drop_index(
        "ix_subscription_messages_locked_at",
        table_name="subscription_messages",
        postgresql_where=sa.text("state = 1"),
    )
    op.drop_index("ix_subscription_messages_claim", table_name="subscription_messages")
    op.drop_table("subscription_messages")
    op.drop_index("ix_acked_messages_subscription_id_acked_at", table_name="acked_messages")
    op.drop_table("acked_messages")
