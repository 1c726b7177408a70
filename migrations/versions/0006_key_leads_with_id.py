"""The primary key of subscription_messages leads with the message id: (id, subscription_id).

Led by subscription_id, the key was a second index that could serve a claim's
`subscription_id = ?` and, sorted afterwards, its `ORDER BY available_at, seq`. When the
statistics know nothing of a subscription (a new one, after the table was analyzed without live
rows, which keeps the old column statistics) both paths are estimated at one row and cost within
a hundredth of each other; which one wins depends on the two B-trees' heights. The bench's
`rounds` saw the key win: each claim read the subscription's whole backlog and sorted it, twice
PostgreSQL's CPU per message at 10k rows, a read of the whole backlog per claim at any size. Led
by id, the key serves only lookups by id, which name both columns; the claim index is the only
one a claim can use.

Rebuilding the key takes an exclusive lock on the table while the new index is built.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 21:30:00
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TABLE = "subscription_messages"
KEY = "pk_subscription_messages"


def rebuild_key(*columns: str) -> None:
    op.drop_constraint(KEY, TABLE, type_="primary")
    op.create_primary_key(KEY, TABLE, list(columns))


def upgrade():
    rebuild_key("id", "subscription_id")


def downgrade():
    rebuild_key("subscription_id", "id")
