"""The message lifecycle: publish, claim, ack, nack, dead letters, and the cleanup jobs.

Every operation is one SQL statement (one round trip). Statements are plain SQL beside their
only caller because they read better that way than as Core expressions. Payloads travel as
JSON text in both directions: PostgreSQL parses the published batch and renders what a
consumer receives, so Python never decodes or re-encodes them.
"""

import uuid
from collections.abc import Sequence

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from pubsub.errors import NotFound
from pubsub.tables import AVAILABLE, DELIVERED, DLQ

# The whole batch, fanned out to every subscription whose filter matches, in one INSERT ...
# SELECT. FOR KEY SHARE keeps a concurrent subscription delete from committing between our read
# of the subscription and our insert, which would leave orphan messages behind.
# Filter: every key's allowed values must contain the payload's field; a missing field gives
# [null], which no filter contains (null is not an accepted filter value).
PUBLISH = sa.text(f"""
WITH topic AS (
    SELECT id FROM topics WHERE id = :topic_id
), subs AS (
    SELECT id, filter FROM subscriptions WHERE topic_id = :topic_id FOR KEY SHARE
), inserted AS (
    INSERT INTO subscription_messages (id, subscription_id, payload, state)
    SELECT gen_random_uuid(), subs.id, m.payload, {AVAILABLE}
    FROM jsonb_array_elements(CAST(:payloads AS jsonb)) WITH ORDINALITY AS m (payload, n)
    CROSS JOIN subs
    WHERE subs.filter IS NULL OR NOT EXISTS (
        SELECT 1 FROM jsonb_each(subs.filter) AS f (key, allowed)
        WHERE NOT f.allowed @> jsonb_build_array(m.payload -> f.key)
    )
    ORDER BY m.n, subs.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM topic) AS topics, (SELECT count(*) FROM inserted) AS copies
""")

# SKIP LOCKED: consumers never wait on each other, and never get the same locked message.
# `id = ANY(ARRAY(...))` rather than a join to the subquery: with LIMIT as a parameter, a generic
# plan (psycopg prepares statements after five runs) guesses a tenth of the table and joins it
# back with a hash join over a full scan; an array of ids is always looked up through the key.
CLAIM = sa.text(f"""
WITH claimed AS (
    UPDATE subscription_messages AS sm
    SET state = {DELIVERED},
        delivery_attempts = sm.delivery_attempts + 1,
        locked_by = :consumer_id,
        locked_at = now()
    WHERE sm.id = ANY(ARRAY(
        SELECT id FROM subscription_messages
        WHERE subscription_id = :subscription_id AND state = {AVAILABLE} AND available_at <= now()
        ORDER BY available_at, seq
        LIMIT :batch_size
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING sm.id::text AS id, sm.payload::text AS payload, sm.delivery_attempts, sm.created_at,
              sm.available_at, sm.seq
)
SELECT id, payload, delivery_attempts, created_at FROM claimed ORDER BY available_at, seq
""")

# Acked rows leave the claim table; one log row per statement remembers how many, for metrics.
ACK = sa.text(f"""
WITH acked AS (
    DELETE FROM subscription_messages
    WHERE subscription_id = :subscription_id AND id = ANY(CAST(:ids AS uuid[])) AND state = {DELIVERED}
    RETURNING 1
)
INSERT INTO acked_messages (subscription_id, count)
SELECT :subscription_id, count(*) FROM acked HAVING count(*) > 0
RETURNING count
""")

# Seconds before retry number `delivery_attempts`: min(max, min * 2^(attempts-1)).
BACKOFF_SECONDS = "LEAST(s.backoff_max_seconds, s.backoff_min_seconds * power(2, sm.delivery_attempts - 1))"

# Retry after the backoff, or dead-letter once attempts are used up.
NACK = sa.text(f"""
UPDATE subscription_messages AS sm
SET state = CASE WHEN sm.delivery_attempts >= s.max_delivery_attempts THEN {DLQ} ELSE {AVAILABLE} END,
    available_at = CASE
        WHEN sm.delivery_attempts >= s.max_delivery_attempts THEN now()
        ELSE now() + make_interval(secs => {BACKOFF_SECONDS})
    END,
    locked_by = NULL,
    locked_at = NULL
FROM subscriptions AS s
WHERE s.id = sm.subscription_id
  AND sm.subscription_id = :subscription_id AND sm.id = ANY(CAST(:ids AS uuid[])) AND sm.state = {DELIVERED}
""")

REPROCESS = sa.text(f"""
UPDATE subscription_messages
SET state = {AVAILABLE}, delivery_attempts = 0, available_at = now(), locked_by = NULL, locked_at = NULL
WHERE subscription_id = :subscription_id AND id = ANY(CAST(:ids AS uuid[])) AND state = {DLQ}
""")

LIST_DLQ = sa.text(f"""
SELECT id::text AS id, payload::text AS payload, delivery_attempts, created_at
FROM subscription_messages
WHERE subscription_id = :subscription_id AND state = {DLQ}
ORDER BY available_at, seq
OFFSET :offset LIMIT :limit
""")

# A lock older than the timeout means the consumer died: release the message, or dead-letter it
# when its attempts are used up, so a consumer that always crashes cannot loop forever.
RELEASE_STUCK = sa.text(f"""
WITH released AS (
    UPDATE subscription_messages AS sm
    SET state = CASE WHEN sm.delivery_attempts >= s.max_delivery_attempts THEN {DLQ} ELSE {AVAILABLE} END,
        available_at = now(),
        locked_by = NULL,
        locked_at = NULL
    FROM subscriptions AS s
    WHERE s.id = sm.subscription_id
      AND sm.state = {DELIVERED} AND sm.locked_at < now() - make_interval(secs => :lock_timeout)
    RETURNING sm.state
)
SELECT count(*) FILTER (WHERE state = {AVAILABLE}) AS released,
       count(*) FILTER (WHERE state = {DLQ}) AS dead_lettered
FROM released
""")

DELETE_ACKED = sa.text("""
WITH deleted AS (
    DELETE FROM acked_messages WHERE acked_at < now() - make_interval(secs => :older_than)
    RETURNING count
)
SELECT coalesce(sum(count), 0) FROM deleted
""")


# The hot statements run on the psycopg connection beneath the SQLAlchemy one, in psycopg's own
# parameter style: SQLAlchemy's execution and result layers cost more CPU per request than
# psycopg and PostgreSQL together (bench/README.md, "Where the time goes"). Transactions and the
# pool stay SQLAlchemy's, and psycopg prepares each statement server-side after five runs.
_DIALECT = PGDialect_psycopg()


def driver_sql(statement: sa.TextClause) -> str:
    """A text() statement as psycopg takes it: %(name)s placeholders."""
    return str(statement.compile(dialect=_DIALECT))


# Run only when a statement matched nothing, to tell an empty queue from a missing subscription.
SUBSCRIPTION_EXISTS = sa.text("SELECT 1 FROM subscriptions WHERE id = :subscription_id")

_DRIVER_SQL = {
    statement: driver_sql(statement)
    for statement in (PUBLISH, CLAIM, ACK, NACK, REPROCESS, LIST_DLQ, SUBSCRIPTION_EXISTS)
}


def run(conn: sa.Connection, statement: sa.TextClause, params: dict) -> psycopg.Cursor:
    """Execute a hot statement on the driver connection; rows come back as plain tuples."""
    return conn.connection.driver_connection.execute(_DRIVER_SQL[statement], params)


def uuid_array(ids: Sequence[uuid.UUID | str]) -> str:
    """Message ids as one uuid[] literal: a single text parameter that PostgreSQL parses in C,
    where psycopg would adapt a list item by item in Python. Ids are UUIDs or canonical UUID
    text (blueprints.message_id), so nothing in them needs quoting."""
    return "{" + ",".join(map(str, ids)) + "}"


def ensure_subscription(conn: sa.Connection, subscription_id: str) -> None:
    """Raise NotFound unless the subscription exists."""
    if run(conn, SUBSCRIPTION_EXISTS, {"subscription_id": subscription_id}).fetchone() is None:
        raise NotFound(f"subscription {subscription_id!r} not found")


def publish(conn: sa.Connection, topic_id: str, payloads_json: str) -> int:
    """Publish a JSON array of objects (as text) to a topic; returns how many copies were queued."""
    topics, copies = run(conn, PUBLISH, {"topic_id": topic_id, "payloads": payloads_json}).fetchone()
    if topics == 0:
        raise NotFound(f"topic {topic_id!r} not found")
    return copies


def consume(conn: sa.Connection, subscription_id: str, consumer_id: str, batch_size: int) -> list:
    """Lock up to batch_size available messages for consumer_id: (id, payload as JSON text,
    delivery_attempts, created_at) tuples."""
    params = {"subscription_id": subscription_id, "consumer_id": consumer_id, "batch_size": batch_size}
    rows = run(conn, CLAIM, params).fetchall()
    if not rows:
        ensure_subscription(conn, subscription_id)
    return rows


def ack(conn: sa.Connection, subscription_id: str, ids: Sequence[uuid.UUID | str]) -> int:
    """Acknowledge delivered messages; ids that are not delivered to this subscription are ignored."""
    row = run(conn, ACK, {"subscription_id": subscription_id, "ids": uuid_array(ids)}).fetchone()
    if row is None:
        ensure_subscription(conn, subscription_id)
        return 0
    return row[0]


def nack(conn: sa.Connection, subscription_id: str, ids: Sequence[uuid.UUID | str]) -> int:
    """Return delivered messages for a retry after backoff, or to the DLQ when attempts are used up."""
    count = run(conn, NACK, {"subscription_id": subscription_id, "ids": uuid_array(ids)}).rowcount
    if not count:
        ensure_subscription(conn, subscription_id)
    return count


def reprocess(conn: sa.Connection, subscription_id: str, ids: Sequence[uuid.UUID | str]) -> int:
    """Move dead letters back to the queue, available now, with their attempts reset."""
    count = run(conn, REPROCESS, {"subscription_id": subscription_id, "ids": uuid_array(ids)}).rowcount
    if not count:
        ensure_subscription(conn, subscription_id)
    return count


def list_dlq(conn: sa.Connection, subscription_id: str, offset: int, limit: int) -> list:
    """Dead letters, as consume() returns messages."""
    params = {"subscription_id": subscription_id, "offset": offset, "limit": limit}
    rows = run(conn, LIST_DLQ, params).fetchall()
    if not rows:
        ensure_subscription(conn, subscription_id)
    return rows


def release_stuck(conn: sa.Connection, lock_timeout_seconds: int) -> tuple[int, int]:
    """Release messages locked longer than the timeout; returns (released, dead-lettered)."""
    row = conn.execute(RELEASE_STUCK, {"lock_timeout": lock_timeout_seconds}).one()
    return row.released, row.dead_lettered


def delete_acked(conn: sa.Connection, older_than_seconds: int) -> int:
    """Forget acked messages older than the retention; returns how many."""
    return int(conn.execute(DELETE_ACKED, {"older_than": older_than_seconds}).scalar())
