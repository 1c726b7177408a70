"""Leases and long-poll: ack deadlines, lease numbers, one id per published message.

* ``subscriptions.ack_deadline_seconds``: existing subscriptions get the deployment's
  CLEANUP_STUCK_MESSAGES_LOCK_TIMEOUT_SECONDS (clamped to 10-600), the lock timeout their
  consumers already live with.
* ``subscriptions.notify_until``: when publishes should NOTIFY long-poll consumers.
* ``subscription_messages.lease``: numbers deliveries, for lease tokens (ack_id).
* Delivered messages get their deadline in ``available_at``, where the claim now looks for
  expired leases.
* The primary key becomes (subscription_id, id): a published message's copies share its id.
  Downgrading gives every copy but one of each message a new id again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 21:00:00
"""

import sqlalchemy as sa
from alembic import op
from flask import current_app, has_app_context

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

DEFAULT_DEADLINE = 60


def deployment_deadline() -> int:
    timeout = DEFAULT_DEADLINE
    if has_app_context():
        timeout = current_app.config.get("CLEANUP_STUCK_MESSAGES_LOCK_TIMEOUT_SECONDS", DEFAULT_DEADLINE)
    return min(600, max(10, int(timeout)))


def upgrade():
    op.add_column(
        "subscriptions",
        sa.Column(
            "ack_deadline_seconds", sa.Integer(), nullable=False, server_default=str(deployment_deadline())
        ),
    )
    op.alter_column("subscriptions", "ack_deadline_seconds", server_default=None)
    op.add_column("subscriptions", sa.Column("notify_until", sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint(
        "ck_subscriptions_ack_deadline_range", "subscriptions", "ack_deadline_seconds BETWEEN 10 AND 600"
    )
    op.add_column(
        "subscription_messages",
        sa.Column("lease", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.execute("""
        UPDATE subscription_messages AS sm
        SET available_at = sm.locked_at + make_interval(secs => s.ack_deadline_seconds)
        FROM subscriptions AS s
        WHERE s.id = sm.subscription_id AND sm.state = 1
    """)
    op.drop_constraint("pk_subscription_messages", "subscription_messages", type_="primary")
    op.create_primary_key("pk_subscription_messages", "subscription_messages", ["subscription_id", "id"])


def downgrade():
    op.execute("""
        UPDATE subscription_messages AS sm
        SET id = gen_random_uuid()
        FROM (
            SELECT subscription_id, id, row_number() OVER (PARTITION BY id ORDER BY subscription_id) AS copy
            FROM subscription_messages
        ) AS c
        WHERE c.subscription_id = sm.subscription_id AND c.id = sm.id AND c.copy > 1
    """)
    op.drop_constraint("pk_subscription_messages", "subscription_messages", type_="primary")
    op.create_primary_key("pk_subscription_messages", "subscription_messages", ["id"])
    op.execute("UPDATE subscription_messages SET available_at = locked_at WHERE state = 1")
    op.drop_column("subscription_messages", "lease")
    op.drop_constraint("ck_subscriptions_ack_deadline_range", "subscriptions", type_="check")
    op.drop_column("subscriptions", "notify_until")
    op.drop_column("subscriptions", "ack_deadline_seconds")
