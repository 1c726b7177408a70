"""Idempotent publish: a publish sent with an Idempotency-Key is stored once per topic and key
within PUBLISH_IDEMPOTENCY_SECONDS; a repeat gets the first one's receipts and stores nothing.

The key's record and the messages commit in one transaction, so there is never one without the
other. PostgreSQL decides races: the claim is an INSERT ... ON CONFLICT, and a second request
with the same key waits on the first one's uncommitted row until that commits (the second then
reads the record and answers from it) or rolls back (the second publishes).
"""

import hashlib
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from pubsub import messages
from pubsub.errors import InvalidInput, RetryConflict
from pubsub.tables import publish_keys, topics

# A message's receipt: its id and how many subscriptions got a copy.
Receipt = tuple[str, int]

KEY_REUSED = "this Idempotency-Key was used with a different body (or delay) for this topic"
KEY_IN_USE = "a publish with this Idempotency-Key is in progress or was just forgotten; retry"


def body_hash(body: bytes, delay: messages.Delay = None) -> bytes:
    """What a repeat must match: the body, and the delay if any (a repeat asking for another
    due time is another request)."""
    if delay is None:
        return hashlib.sha256(body).digest()
    return hashlib.sha256(body + b"\0" + str(delay).encode()).digest()


def claim_publish_key(
    conn: sa.Connection, topic_id: str, key: str, digest: bytes, window_seconds: int
) -> bool:
    """Take the key for this publish: true if it is new (or its record is older than the window,
    or than the topic, deleted and created again since: the record is then replaced), false if
    another publish holds it. Waits for a publish in progress with the same key to end."""
    topic_created = sa.select(topics.c.created_at).where(topics.c.id == topic_id).scalar_subquery()
    expired = sa.or_(
        publish_keys.c.created_at <= sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, window_seconds),
        publish_keys.c.created_at < topic_created,
    )
    statement = (
        insert(publish_keys)
        .values(topic_id=topic_id, key=key, body_hash=digest)
        .on_conflict_do_update(
            index_elements=[publish_keys.c.topic_id, publish_keys.c.key],
            set_={
                "body_hash": digest,
                "message_ids": sa.text("'{}'"),
                "subscriptions": sa.text("'{}'"),
                "created_at": sa.func.now(),
            },
            where=expired,
        )
        .returning(publish_keys.c.key)
    )
    return conn.execute(statement).first() is not None


def record_receipts(conn: sa.Connection, topic_id: str, key: str, receipts: list[Receipt]) -> None:
    conn.execute(
        publish_keys.update()
        .where(publish_keys.c.topic_id == topic_id, publish_keys.c.key == key)
        .values(message_ids=[id for id, _ in receipts], subscriptions=[n for _, n in receipts])
    )


def stored_receipts(conn: sa.Connection, topic_id: str, key: str, digest: bytes) -> list[Receipt]:
    """The receipts of the publish that holds the key: InvalidInput (422) if it had another body,
    RetryConflict (409) if its record is gone (deleted by the cleanup since the claim)."""
    row = conn.execute(
        sa.select(publish_keys.c.body_hash, publish_keys.c.message_ids, publish_keys.c.subscriptions).where(
            publish_keys.c.topic_id == topic_id, publish_keys.c.key == key
        )
    ).first()
    if row is None:
        raise RetryConflict(KEY_IN_USE)
    if row.body_hash != digest:
        raise InvalidInput(KEY_REUSED)
    return [(str(id), n) for id, n in zip(row.message_ids, row.subscriptions, strict=True)]


def publish_once(
    conn: sa.Connection,
    topic_id: str,
    key: str,
    body: bytes,
    window_seconds: int,
    delay: messages.Delay = None,
) -> tuple[list[Receipt], bool]:
    """Publish the body (a JSON array of objects) unless a publish with this key and body was
    stored within the window: the receipts, and whether they are the earlier publish's. In the
    caller's transaction, which must commit the messages and the record together."""
    digest = body_hash(body, delay)
    if not claim_publish_key(conn, topic_id, key, digest, window_seconds):
        return stored_receipts(conn, topic_id, key, digest), True
    receipts = messages.publish_with_receipts(conn, topic_id, body.decode(), None, delay)
    record_receipts(conn, topic_id, key, receipts)
    return receipts, False


# Records deleted per statement (and transaction) by the cleanup.
DELETE_CHUNK = 10_000


def key_cutoff(conn: sa.Connection, older_than_seconds: int) -> datetime:
    """The record time before which the cleanup forgets keys: now, by the database's clock, less
    older_than_seconds."""
    interval = sa.func.make_interval(0, 0, 0, 0, 0, 0, older_than_seconds)
    return conn.execute(sa.select(sa.func.now() - interval)).scalar_one()


# The oldest records first, found through the index on their time, deleted by their row address:
# the statement reads only what it deletes. The cutoff is a value, not now() less an interval, so
# that the planner sees from its statistics how few rows it selects. The time is checked again on
# the row deleted, and a record replaced since (a key reused after the window) has another
# address: it stays.
DELETE_EXPIRED_KEYS = sa.text("""
DELETE FROM publish_keys
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM publish_keys WHERE created_at < :cutoff ORDER BY created_at LIMIT :limit
)) AND created_at < :cutoff
""")


def delete_publish_keys(conn: sa.Connection, cutoff: datetime, limit: int | None = None) -> int:
    """Forget up to `limit` (DELETE_CHUNK) keys recorded before the cutoff, oldest first; returns
    how many."""
    return conn.execute(DELETE_EXPIRED_KEYS, {"cutoff": cutoff, "limit": limit or DELETE_CHUNK}).rowcount
