"""Operators' bulk operations on a subscription's queue: redrive dead letters, purge the DLQ,
purge the backlog (extensions to the fastpubsub API).

Each works in chunks: one statement per chunk, committed on its own (the caller's connection is
in autocommit mode, db.connect), of at most `chunk_rows` messages, until a chunk comes back
short. So a purge of a million messages holds row locks on a few thousand at a time, for a few
milliseconds, and consumers keep claiming and acking meanwhile.

A chunk picks its rows through the claim index (subscription_id, state, available_at, seq), in
that order, after the last key of the chunk before it (keyset), so it reads its own rows and not
the ones the chunks before it deleted or moved; `FOR UPDATE SKIP LOCKED`, so it never waits on a
claim, ack or nack in flight, nor makes one wait (a row skipped that way is left as it is). The
rows picked are then changed through their key, as messages.CLAIM does (see messages.KEYS).

The backlog, for a purge, is what is still owed to consumers: available messages (ready or in
backoff), delivered ones (leased) and those waiting behind an ordering key, not the DLQ, as SQS's
PurgeQueue. A leased message is purged too: its consumer's later ack, nack or extend finds nothing
(`not_found`), as for a message already acked. Purged messages are deleted, not acked: the
`acked` metric does not count them.
"""

import datetime as dt
import logging
from collections.abc import Sequence

import sqlalchemy as sa

from pubsub.messages import KEYS, NOTIFY_CHANNEL, ensure_subscription, uuid_array
from pubsub.tables import AVAILABLE, DELIVERED, DLQ, WAITING

log = logging.getLogger(__name__)

# The first key of a subscription's range of one state: every (available_at, seq) is after it.
FIRST_KEY = (dt.datetime.min.replace(tzinfo=dt.UTC), 0)


def chunk_statement(change: str, condition: str = "", also: str = "", answer: str = "") -> sa.TextClause:
    """A chunk: pick up to :chunk messages of :state after the key (:after_at, :after_seq),
    matching `condition`, and apply `change` (a DELETE or UPDATE of `sm` using `picked`, up to its
    WHERE), whose RETURNING makes `changed`. Answers how many were changed, and the last key
    picked (NULL when none was): where the next chunk starts. `also` adds CTEs, `answer` columns."""
    return sa.text(f"""
WITH chunk AS MATERIALIZED (
    SELECT id, available_at, seq FROM subscription_messages
    WHERE subscription_id = :subscription_id AND state = :state
      AND (available_at, seq) > (CAST(:after_at AS timestamptz), CAST(:after_seq AS bigint)){condition}
    ORDER BY available_at, seq LIMIT :chunk FOR UPDATE SKIP LOCKED
), picked AS MATERIALIZED (
    SELECT {KEYS}, ARRAY(SELECT id FROM chunk) AS ids
), changed AS (
    {change}
    WHERE sm.subscription_id = picked.subscription_id AND sm.id = ANY(picked.ids)
      AND sm.state + 0 = :state
    RETURNING 1
){also}
SELECT (SELECT count(*) FROM changed) AS count{answer}, last.available_at, last.seq
FROM (SELECT 1) AS one
LEFT JOIN (SELECT available_at, seq FROM chunk ORDER BY available_at DESC, seq DESC LIMIT 1) AS last ON true
""")


# The backlog published before :before (or all of it, when NULL). created_at is not in the claim
# index: it is a filter on the rows the chunk walks, each read once thanks to the keyset.
PURGE_BACKLOG = chunk_statement(
    "DELETE FROM subscription_messages AS sm USING picked",
    "\n      AND (CAST(:before AS timestamptz) IS NULL OR created_at < CAST(:before AS timestamptz))",
)
PURGE_DLQ = chunk_statement("DELETE FROM subscription_messages AS sm USING picked")

# Back to the queue as messages.REPROCESS does: available now, attempts reset. Long-poll
# consumers waiting on the subscription are woken as by a publish (messages.publish_ctes), by
# one NOTIFY per chunk, only while some process has waiters on it.
REDRIVE = chunk_statement(
    f"""UPDATE subscription_messages AS sm
    SET state = {AVAILABLE}, delivery_attempts = 0, available_at = now(), locked_by = NULL, locked_at = NULL
    FROM picked""",
    also=f""", notified AS (
    SELECT pg_notify('{NOTIFY_CHANNEL}', concat_ws(' ', s.id, n.count, pg_current_xact_id()))
    FROM subscriptions AS s, (SELECT count(*) AS count FROM changed) AS n
    WHERE s.id = :subscription_id AND s.notify_until > now() AND n.count > 0
)""",
    answer=", (SELECT count(*) FROM notified) AS notified",  # a CTE nobody reads is not run
)

PURGE_DLQ_IDS = sa.text(f"""
WITH target AS MATERIALIZED (
    SELECT {KEYS}, CAST(:ids AS uuid[]) AS ids
)
DELETE FROM subscription_messages AS sm
USING target
WHERE sm.subscription_id = target.subscription_id AND sm.id = ANY(target.ids) AND sm.state + 0 = {DLQ}
""")


def run_chunks(
    conn: sa.Connection,
    statement: sa.TextClause,
    subscription_id: str,
    states: Sequence[int],
    chunk_rows: int,
    limit: int | None = None,
    **params,
) -> int:
    """Run a chunk statement over each state's range until a chunk comes back short (or `limit`
    messages are changed); returns how many were."""
    total = 0
    for state in states:
        after_at, after_seq = FIRST_KEY
        while limit is None or total < limit:
            chunk = chunk_rows if limit is None else min(chunk_rows, limit - total)
            row = conn.execute(
                statement,
                {
                    "subscription_id": subscription_id,
                    "state": state,
                    "after_at": after_at,
                    "after_seq": after_seq,
                    "chunk": chunk,
                    **params,
                },
            ).one()
            total += row.count
            if row.seq is None:
                break
            after_at, after_seq = row.available_at, row.seq
            if row.count < chunk:
                break
    if not total:
        ensure_subscription(conn, subscription_id)
    return total


def redrive_dlq(conn: sa.Connection, subscription_id: str, chunk_rows: int, limit: int | None = None) -> int:
    """Move dead letters back to the queue, available now with their attempts reset: all of them,
    or the first `limit` in the DLQ's order (the oldest dead first). Returns how many."""
    count = run_chunks(conn, REDRIVE, subscription_id, [DLQ], chunk_rows, limit)
    log.info("redrove %d dead letters of %s", count, subscription_id)
    return count


def purge_dlq(
    conn: sa.Connection, subscription_id: str, chunk_rows: int, ids: Sequence[str] | None = None
) -> int:
    """Delete dead letters: all of them, or those named. Returns how many."""
    if ids is None:
        count = run_chunks(conn, PURGE_DLQ, subscription_id, [DLQ], chunk_rows)
    else:
        params = {"subscription_id": subscription_id, "ids": uuid_array(ids)}
        count = conn.execute(PURGE_DLQ_IDS, params).rowcount
        if not count:
            ensure_subscription(conn, subscription_id)
    log.info("purged %d dead letters of %s", count, subscription_id)
    return count


def purge_backlog(
    conn: sa.Connection, subscription_id: str, chunk_rows: int, before: dt.datetime | None = None
) -> int:
    """Delete the available, delivered and waiting messages (not the dead letters), or only
    those published before `before`. Returns how many.

    With ordering keys, the messages waiting behind a key go first: deleting a key's head makes the
    next one available (migration 0008's trigger), with its publish time as its place in the
    available range, which the keyset of that range may have passed already."""
    count = run_chunks(
        conn, PURGE_BACKLOG, subscription_id, [WAITING, AVAILABLE, DELIVERED], chunk_rows, before=before
    )
    log.info(
        "purged %d messages of %s%s", count, subscription_id, f" published before {before}" if before else ""
    )
    return count
