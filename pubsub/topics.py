"""Topics: named channels that messages are published to."""

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from pubsub.errors import TOPIC_ALREADY_EXISTS, TOPIC_NOT_FOUND, AlreadyExists, NotFound
from pubsub.subscriptions import lock_ordering
from pubsub.tables import acked_messages, subscription_messages, subscriptions, topics

TOPIC_COLUMNS = (topics.c.id, topics.c.created_at)


def create_topic(conn: sa.Connection, topic_id: str) -> dict:
    stmt = insert(topics).values(id=topic_id).on_conflict_do_nothing().returning(*TOPIC_COLUMNS)
    row = conn.execute(stmt).mappings().first()
    if row is None:
        raise AlreadyExists(TOPIC_ALREADY_EXISTS)
    return dict(row)


def get_topic(conn: sa.Connection, topic_id: str) -> dict:
    row = conn.execute(sa.select(*TOPIC_COLUMNS).where(topics.c.id == topic_id)).mappings().first()
    if row is None:
        raise NotFound(TOPIC_NOT_FOUND)
    return dict(row)


def list_topics(conn: sa.Connection, offset: int, limit: int) -> list[dict]:
    stmt = sa.select(*TOPIC_COLUMNS).order_by(topics.c.id).offset(offset).limit(limit)
    return [dict(row) for row in conn.execute(stmt).mappings()]


def delete_topic(conn: sa.Connection, topic_id: str) -> None:
    """Delete a topic, its subscriptions and every message they hold, in one transaction."""
    # The topic row first: a subscription being created holds a lock on it until it commits,
    # so this waits for those, and blocks new ones (they then find no topic). The statement
    # below therefore sees every subscription the topic will ever have, and deletes their
    # messages; without this, one created meanwhile was removed by the cascade, its messages not.
    locked = conn.execute(sa.select(topics.c.id).where(topics.c.id == topic_id).with_for_update()).first()
    if locked is None:
        raise NotFound(TOPIC_NOT_FOUND)
    # Deleting the subscription rows first takes their row locks: a concurrent publish that
    # already holds FOR KEY SHARE finishes first (and its messages are deleted below); one that
    # comes later finds the subscriptions gone.
    deleted = (
        conn.execute(
            sa.delete(subscriptions).where(subscriptions.c.topic_id == topic_id).returning(subscriptions.c.id)
        )
        .scalars()
        .all()
    )
    if deleted:
        lock_ordering(conn, deleted)
        conn.execute(
            sa.delete(subscription_messages).where(subscription_messages.c.subscription_id.in_(deleted))
        )
        conn.execute(sa.delete(acked_messages).where(acked_messages.c.subscription_id.in_(deleted)))
    conn.execute(sa.delete(topics).where(topics.c.id == topic_id))
