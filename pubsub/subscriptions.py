"""Subscriptions: a topic's filtered feed with its own retry policy, queue and DLQ."""

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from pubsub.errors import (
    SUBSCRIPTION_ALREADY_EXISTS,
    SUBSCRIPTION_NOT_FOUND,
    TOPIC_NOT_FOUND,
    AlreadyExists,
    NotFound,
    ValidationFailed,
)
from pubsub.tables import (
    AVAILABLE,
    DELIVERED,
    DLQ,
    WAITING,
    acked_messages,
    subscription_messages,
    subscriptions,
    topics,
)

SUBSCRIPTION_COLUMNS = (
    subscriptions.c.id,
    subscriptions.c.topic_id,
    subscriptions.c.filter,
    subscriptions.c.max_delivery_attempts,
    subscriptions.c.backoff_min_seconds,
    subscriptions.c.backoff_max_seconds,
    subscriptions.c.created_at,
    subscriptions.c.ack_deadline_seconds,
    subscriptions.c.ordering_key,
)


def create_subscription(
    conn: sa.Connection,
    subscription_id: str,
    topic_id: str,
    filter: dict | None,
    max_delivery_attempts: int,
    backoff_min_seconds: int,
    backoff_max_seconds: int,
    ack_deadline_seconds: int,
    ordering_key: str | None = None,
) -> dict:
    # INSERT ... SELECT from topics: a missing topic inserts nothing instead of raising.
    source = sa.select(
        sa.literal(subscription_id, sa.Text),
        topics.c.id,
        sa.cast(sa.literal(filter, subscriptions.c.filter.type), subscriptions.c.filter.type),
        sa.literal(max_delivery_attempts),
        sa.literal(backoff_min_seconds),
        sa.literal(backoff_max_seconds),
        sa.literal(ack_deadline_seconds),
        sa.literal(ordering_key, sa.Text),
    ).where(topics.c.id == topic_id)
    stmt = (
        insert(subscriptions)
        .from_select(
            [
                "id",
                "topic_id",
                "filter",
                "max_delivery_attempts",
                "backoff_min_seconds",
                "backoff_max_seconds",
                "ack_deadline_seconds",
                "ordering_key",
            ],
            source,
        )
        .on_conflict_do_nothing()
        .returning(*SUBSCRIPTION_COLUMNS)
    )
    try:
        row = conn.execute(stmt).mappings().first()
    except sa.exc.IntegrityError:  # the topic was deleted between our read and our insert
        raise NotFound(TOPIC_NOT_FOUND) from None
    if row is not None:
        return dict(row)
    if conn.execute(sa.select(topics.c.id).where(topics.c.id == topic_id)).first() is None:
        raise NotFound(TOPIC_NOT_FOUND)
    raise AlreadyExists(SUBSCRIPTION_ALREADY_EXISTS)


def get_subscription(conn: sa.Connection, subscription_id: str) -> dict:
    stmt = sa.select(*SUBSCRIPTION_COLUMNS).where(subscriptions.c.id == subscription_id)
    row = conn.execute(stmt).mappings().first()
    if row is None:
        raise NotFound(SUBSCRIPTION_NOT_FOUND)
    return dict(row)


def list_subscriptions(conn: sa.Connection, offset: int, limit: int) -> list[dict]:
    stmt = sa.select(*SUBSCRIPTION_COLUMNS).order_by(subscriptions.c.id).offset(offset).limit(limit)
    return [dict(row) for row in conn.execute(stmt).mappings()]


def delete_subscription(conn: sa.Connection, subscription_id: str) -> None:
    """Delete a subscription and all its messages in one transaction."""
    # The DELETE waits for publishes holding FOR KEY SHARE on this row, so their messages are
    # committed before we delete them; later publishes no longer see the subscription.
    if conn.execute(sa.delete(subscriptions).where(subscriptions.c.id == subscription_id)).rowcount == 0:
        raise NotFound(SUBSCRIPTION_NOT_FOUND)
    lock_ordering(conn, [subscription_id])
    conn.execute(
        sa.delete(subscription_messages).where(subscription_messages.c.subscription_id == subscription_id)
    )
    conn.execute(sa.delete(acked_messages).where(acked_messages.c.subscription_id == subscription_id))


def lock_ordering(conn: sa.Connection, subscription_ids: list[str]) -> None:
    """Take the ordering locks of these subscriptions (migration 0008), in id order, before
    deleting their messages: the delete's triggers would take them otherwise after its row locks,
    while an ack holding one may be waiting for the row lock of a message the delete holds."""
    conn.execute(
        sa.text("SELECT pubsub_lock_ordering(id) FROM unnest(CAST(:ids AS text[])) AS id ORDER BY id"),
        {"ids": subscription_ids},
    )


def mark_waiting(conn: sa.Connection, subscription_id: str, seconds: int) -> None:
    """Have publishes NOTIFY this subscription for the next `seconds` (pubsub.listener).

    FOR UPDATE conflicts with the FOR KEY SHARE each publish takes on the subscriptions it
    writes to, so this waits for publishes in flight, and publishes that start meanwhile wait
    for us and then see the mark: none can slip between a waiter's mark and its claim unseen."""
    locked = sa.select(subscriptions.c.id).where(subscriptions.c.id == subscription_id).with_for_update()
    conn.execute(
        sa.update(subscriptions)
        .where(subscriptions.c.id == locked.scalar_subquery())
        .values(
            notify_until=sa.func.greatest(
                subscriptions.c.notify_until, sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)
            )
        )
    )


def count_messages(subscription_id: str, state: int, *when) -> sa.ScalarSelect:
    m = subscription_messages
    return (
        sa.select(sa.func.count())
        .select_from(m)
        .where(m.c.subscription_id == subscription_id, m.c.state == state, *when)
        .scalar_subquery()
    )


def get_metrics(conn: sa.Connection, subscription_id: str) -> dict:
    """Counts by state, from the claim index and the per-ack-statement log (never full history).
    A delivery past its ack deadline counts as available: the next consume claims it. Messages
    published with a delay that is not over yet count as delayed, not available."""
    m = subscription_messages
    acked = (
        sa.select(sa.func.coalesce(sa.func.sum(acked_messages.c.count), 0))
        .where(acked_messages.c.subscription_id == subscription_id)
        .scalar_subquery()
    )
    now = sa.func.now()
    lapsed = count_messages(subscription_id, DELIVERED, m.c.available_at <= now)
    # Never delivered and due later: published with a delay (a retry has delivery_attempts > 0).
    delayed = count_messages(subscription_id, AVAILABLE, m.c.available_at > now, m.c.delivery_attempts == 0)
    stmt = sa.select(
        subscriptions.c.id.label("subscription_id"),
        (count_messages(subscription_id, AVAILABLE) + lapsed - delayed).label("available"),
        delayed.label("delayed"),
        count_messages(subscription_id, DELIVERED, m.c.available_at > now).label("delivered"),
        acked.label("acked"),
        count_messages(subscription_id, DLQ).label("dlq"),
        count_messages(subscription_id, WAITING).label("waiting"),
    ).where(subscriptions.c.id == subscription_id)
    row = conn.execute(stmt).mappings().first()
    if row is None:
        raise NotFound(SUBSCRIPTION_NOT_FOUND)
    return {key: (int(value) if key != "subscription_id" else value) for key, value in row.items()}


BACKLOG_STATES = ("available", "delayed", "backoff", "delivered", "dlq", "waiting")


def count_backlog(conn: sa.Connection) -> list[dict]:
    """Every subscription's messages by state and the age of its oldest unacked one (zeros when it
    has none), in one pass over the messages: the Prometheus backlog gauges."""
    m = subscription_messages
    now = sa.func.now()  # one instant for the whole statement: each message counts in one state
    by_subscription = (
        sa.select(
            m.c.subscription_id,
            # A delivery past its ack deadline is available again: the next consume claims it.
            sa.func.count()
            .filter(m.c.state.in_((AVAILABLE, DELIVERED)), m.c.available_at <= now)
            .label("available"),
            # Published with a delay that is not over (never delivered), or waiting out a backoff.
            sa.func.count()
            .filter(m.c.state == AVAILABLE, m.c.available_at > now, m.c.delivery_attempts == 0)
            .label("delayed"),
            sa.func.count()
            .filter(m.c.state == AVAILABLE, m.c.available_at > now, m.c.delivery_attempts > 0)
            .label("backoff"),
            sa.func.count().filter(m.c.state == DELIVERED, m.c.available_at > now).label("delivered"),
            sa.func.count().filter(m.c.state == DLQ).label("dlq"),
            # Behind an earlier message with the same ordering key.
            sa.func.count().filter(m.c.state == WAITING).label("waiting"),
            # A delayed message is not owed to anyone yet: it would age the backlog for days.
            sa.func.min(m.c.created_at)
            .filter(
                m.c.state.in_((AVAILABLE, DELIVERED, WAITING)),
                ~sa.and_(m.c.state == AVAILABLE, m.c.available_at > now, m.c.delivery_attempts == 0),
            )
            .label("oldest"),
        )
        .group_by(m.c.subscription_id)
        .subquery()
    )
    # greatest(..., 0): a message committed just after now() was taken may be visible, and younger.
    age = sa.func.greatest(sa.func.extract("epoch", now - by_subscription.c.oldest), 0)
    stmt = (
        sa.select(
            subscriptions.c.id.label("subscription_id"),
            *(sa.func.coalesce(by_subscription.c[state], 0).label(state) for state in BACKLOG_STATES),
            sa.func.coalesce(age, 0).label("oldest_unacked_age_seconds"),
        )
        .select_from(
            subscriptions.outerjoin(by_subscription, by_subscription.c.subscription_id == subscriptions.c.id)
        )
        .order_by(subscriptions.c.id)
    )
    return [
        {**row, "oldest_unacked_age_seconds": float(row["oldest_unacked_age_seconds"])}
        for row in conn.execute(stmt).mappings()
    ]


def update_subscription(conn: sa.Connection, subscription_id: str, changes: dict) -> dict:
    """Change some of a subscription's filter, retry policy and ack deadline (the keys of
    `changes`); returns it as get_subscription does. A new filter applies to the publishes that
    start after this commits; the retry policy to the next nacks; the deadline to the next claims.

    FOR NO KEY UPDATE, as the UPDATE takes anyway: publishes (FOR KEY SHARE) are never held up."""
    stmt = sa.select(*SUBSCRIPTION_COLUMNS).where(subscriptions.c.id == subscription_id)
    row = conn.execute(stmt.with_for_update(key_share=True)).mappings().first()
    if row is None:
        raise NotFound(SUBSCRIPTION_NOT_FOUND)
    merged = {**row, **changes}
    if merged["backoff_min_seconds"] > merged["backoff_max_seconds"]:
        field = "backoff_min_seconds" if "backoff_min_seconds" in changes else "backoff_max_seconds"
        other = "backoff_max_seconds" if field == "backoff_min_seconds" else "backoff_min_seconds"
        relation = "exceed" if field == "backoff_min_seconds" else "be less than"
        raise ValidationFailed({f"json.{field}": [f"must not {relation} {other} ({merged[other]})"]})
    if not changes:
        return dict(row)
    update = (
        sa.update(subscriptions)
        .where(subscriptions.c.id == subscription_id)
        .values(**changes)
        .returning(*SUBSCRIPTION_COLUMNS)
    )
    return dict(conn.execute(update).mappings().one())
