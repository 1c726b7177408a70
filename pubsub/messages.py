"""The message lifecycle: publish, claim, ack, nack, dead letters, and the cleanup jobs.

Every operation is one SQL statement (one round trip). Statements are plain SQL beside their
only caller because they read better that way than as Core expressions. Payloads travel as
JSON text in both directions: PostgreSQL parses the published batch and renders what a
consumer receives, so Python never decodes or re-encodes them.
"""

import uuid
from collections.abc import Sequence

import orjson
import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from pubsub.clients import TokenRef, token_current_sql
from pubsub.db import OutcomeUnknown
from pubsub.errors import (
    DATABASE_TIMED_OUT,
    SUBSCRIPTION_NOT_FOUND,
    TOKEN_REVOKED,
    TOPIC_NOT_FOUND,
    DatabaseUnavailable,
    NotFound,
    Unauthorized,
    ValidationFailed,
)
from pubsub.tables import AVAILABLE, DELIVERED, DLQ

# Long-poll wake-ups: publishes NOTIFY this channel (pubsub.listener).
NOTIFY_CHANNEL = "pubsub"

# Delayed delivery: how far ahead a publish may set its messages' due time (7 days).
MAX_DELAY_SECONDS = 7 * 24 * 3600
DELAY_TOO_LONG = f"must be at most {MAX_DELAY_SECONDS} seconds ({MAX_DELAY_SECONDS // 86400} days) from now"

# Plans that hold whatever the statistics say. PostgreSQL's statistics of subscription_messages
# lag behind it: they may know only other subscriptions (a new one, an uncommon one), or describe
# a table analyzed empty before a burst, or see no deliveries at all. A subscription_id or state
# that they take for nearly absent makes "read that subscription's range and filter the ids" look
# cheaper than a key lookup per id, and a custom plan of that shape walks 100,000 rows per claim.
# So the statements that look messages up by id never give the planner that choice:
# - the key comes from a MATERIALIZED CTE (`KEYS`), which the planner cannot see through, so
#   subscription_messages has no condition of its own: every way in but the key lookup (both key
#   columns as index conditions, by join) reads the whole table, and the table's size the planner
#   always knows from its pages;
# - the state is checked as a filter (`state + 0`), so no index on state is ever chosen for it.
KEYS = "CAST(:subscription_id AS text) AS subscription_id"

# Per-item outcomes of ack, nack and extend (settle_statement).
DONE, STALE, NOT_FOUND = 0, 1, 2

# The claim's one row when the subscription does not exist (in place of a message's state), so
# that an empty answer needs no second round trip to tell "nothing to claim" from a 404.
MISSING = -1
# The same for ack, nack and extend: a column that says whether the subscription exists,
# evaluated once per statement.
KNOWN = "EXISTS (SELECT FROM subscriptions WHERE id = :subscription_id) AS known"

# Revocation (auth on): claim, ack, nack and extend make the request's revocation check themselves
# (auth.revocation_token), so that it costs no statement or round trip of its own. The token comes
# as :client_id and :token_version, both NULL when there is none to check (auth off); `gate` says
# once, in the statement's snapshot, whether it is current. With a revoked token the statement
# changes nothing, and its answer says so: the claim's one row REVOKED_STATE, or a column `current`.
GATE = f"""gate AS MATERIALIZED (
    SELECT CAST(:client_id AS uuid) IS NULL
        OR {token_current_sql("CAST(:client_id AS uuid)", "CAST(:token_version AS integer)")} AS current
)"""
CURRENT = "(SELECT current FROM gate)"
REVOKED_STATE = -2


def token_params(token: TokenRef | None) -> dict:
    """The parameters of GATE for a token, or for none."""
    client_id, token_version = token or (None, None)
    return {"client_id": client_id, "token_version": token_version}


# Publishes, each a batch to one topic, in one INSERT ... SELECT: every message fanned out to
# each subscription of its topic whose filter matches. Several requests' publishes may share one
# statement and its commit (publish_many); request k is the k-th topic id and the k-th array of
# :payloads. Each message gets one id, shared by its copies. FOR KEY SHARE keeps a concurrent
# subscription delete from committing between our read of the subscription and our insert, which
# would leave orphan messages behind; it also makes a long-poll waiter's FOR UPDATE of the
# subscription (listener.mark_waiting) wait for this statement, or this statement see its mark.
# Filter: every key's allowed values must contain the payload's field; a missing field gives
# [null], which no filter contains (null is not an accepted filter value).
# NOTIFY: once per subscription that got copies and has long-poll consumers waiting, with how
# many it got and the transaction id ("<subscription> <count> <xid>"), which tells the worker
# processes of a server apart one notification from another (pubsub.listener).
# The topic ids travel as one JSON array: as a text[] matched with `= ANY`, the generic plan's
# estimates differed from the custom plans', so PostgreSQL planned the statement anew at every run,
# which cost more than running it.
# Revocation (auth on): :tokens is NULL, or a JSON array whose k-th item is request k's token, as
# [client id, token_version], or null for none to check. A request whose token is no longer
# current is `revoked` and publishes nothing; the others go on. The check is the statement's own,
# in its snapshot: a client deleted, deactivated or updated before the statement began is seen,
# with no round trip of its own (SPEC §4).
# Delayed delivery: :delays is NULL, or a JSON array whose k-th item is request k's delay: a
# number of seconds, an RFC 3339 due time as a string, or null for none. The database clock
# decides: now() + seconds, or the due time (one in the past means now). A due time more than
# MAX_DELAY_SECONDS away makes the request `late`: it publishes nothing. Delayed copies wake no
# long-poll waiter (`notified` counts only the copies claimable now); the listener's re-check
# finds them when they are due.
# Ordering keys (migration 0008): a copy for a subscription with an ordering key carries the MD5 of
# the key field's JSON value (NULL without the field, or with null in it); the trigger then makes it
# wait behind its key's earlier messages. `ordered` first takes the locks of the keys published to,
# subscription by subscription in id order, each one's keys in key order, so that statements
# taking several cannot deadlock; the INSERT's one-time filter on it runs before any row is
# inserted. Without ordered subscriptions it reads nothing: the keys are a subquery per ordered
# subscription, not a join that every publish would run. NOWAIT: a subscription locked
# exclusively fails the statement at once (LockNotAvailable), as the FOR KEY SHARE does; a key
# lock is waited for (an ack or publish of that key committing).
ORDERING_KEY = "CAST(md5(CAST(NULLIF(published.payload -> subs.ordering_key, 'null') AS text)) AS uuid)"


def publish_ctes(lock: str) -> str:
    current = token_current_sql("CAST(t.token ->> 0 AS uuid)", "CAST(t.token ->> 1 AS integer)")
    nowait = "true" if "NOWAIT" in lock else "false"
    return f"""
WITH revoked AS MATERIALIZED (
    SELECT t.k FROM jsonb_array_elements(CAST(:tokens AS jsonb)) WITH ORDINALITY AS t (token, k)
    WHERE jsonb_typeof(t.token) = 'array' AND NOT {current}
), due AS MATERIALIZED (
    SELECT d.k, CASE jsonb_typeof(d.delay)
        WHEN 'number' THEN now() + make_interval(secs => CAST(d.delay AS integer))
        ELSE greatest(now(), CAST(d.delay #>> '{{}}' AS timestamptz))
    END AS available_at
    FROM jsonb_array_elements(CAST(:delays AS jsonb)) WITH ORDINALITY AS d (delay, k)
    WHERE jsonb_typeof(d.delay) <> 'null'
), late AS MATERIALIZED (
    SELECT k FROM due WHERE available_at > now() + make_interval(secs => {MAX_DELAY_SECONDS})
), requests AS MATERIALIZED (
    SELECT r.topic_id, r.k, (SELECT available_at FROM due WHERE due.k = r.k) AS available_at
    FROM jsonb_array_elements_text(CAST(:topic_ids AS jsonb)) WITH ORDINALITY AS r (topic_id, k)
    WHERE r.k NOT IN (SELECT k FROM revoked) AND r.k NOT IN (SELECT k FROM late)
), found AS (
    SELECT requests.k FROM requests JOIN topics ON topics.id = requests.topic_id
), subs AS (
    SELECT id, topic_id, filter, coalesce(notify_until > now(), false) AS notify, ordering_key
    FROM subscriptions WHERE topic_id IN (SELECT topic_id FROM requests) {lock}
), published AS MATERIALIZED (
    SELECT gen_random_uuid() AS id, m.payload, b.k, m.n
    FROM jsonb_array_elements(CAST(:payloads AS jsonb)) WITH ORDINALITY AS b (batch, k),
         jsonb_array_elements(b.batch) WITH ORDINALITY AS m (payload, n)
), ordered AS MATERIALIZED (
    SELECT pubsub_lock_keys(o.id, o.keys, {nowait}) FROM (
        SELECT subs.id, ARRAY(
            SELECT DISTINCT {ORDERING_KEY} FROM published JOIN requests ON requests.k = published.k
            WHERE requests.topic_id = subs.topic_id AND {ORDERING_KEY} IS NOT NULL
        ) AS keys
        FROM subs WHERE subs.ordering_key IS NOT NULL ORDER BY subs.id
    ) AS o
    WHERE cardinality(o.keys) > 0
), inserted AS (
    INSERT INTO subscription_messages (subscription_id, id, payload, state, available_at, ordering_key)
    SELECT subs.id, published.id, published.payload, {AVAILABLE}, coalesce(requests.available_at, now()),
           {ORDERING_KEY}
    FROM published JOIN requests ON requests.k = published.k JOIN subs ON subs.topic_id = requests.topic_id
    WHERE (SELECT count(*) FROM ordered) >= 0 AND (subs.filter IS NULL OR NOT EXISTS (
        SELECT 1 FROM jsonb_each(subs.filter) AS f (key, allowed)
        WHERE NOT f.allowed @> jsonb_build_array(published.payload -> f.key)
    ))
    ORDER BY published.k, published.n, subs.id
    RETURNING subscription_id, id, available_at, state
), notified AS (
    SELECT pg_notify('{NOTIFY_CHANNEL}', concat_ws(' ', subs.id, count(*), pg_current_xact_id()))
    FROM subs JOIN inserted ON inserted.subscription_id = subs.id
    WHERE subs.notify AND inserted.available_at <= now() AND inserted.state = {AVAILABLE}
    GROUP BY subs.id
)
"""


# Which requests' topics exist and which requests' tokens are revoked (their k), and how many
# copies were queued in all; which requests were due too late.
PUBLISHED = """
SELECT ARRAY(SELECT k FROM found) AS found, ARRAY(SELECT k FROM revoked) AS revoked,
       (SELECT count(*) FROM inserted) AS copies, (SELECT count(*) FROM notified) AS notified,
       ARRAY(SELECT k FROM late) AS late
"""
PUBLISH = sa.text(publish_ctes("FOR KEY SHARE") + PUBLISHED)
# Shared by several requests: a subscription locked against publishes (being deleted, or marked
# by a long-poll waiter) fails it at once, and each request runs PUBLISH alone, so that one
# topic's wait holds up no other topic's publishes.
PUBLISH_NOWAIT = sa.text(publish_ctes("FOR KEY SHARE NOWAIT") + PUBLISHED)

# One request's publish, answering each message's id and how many subscriptions got it, in
# request order.
PUBLISH_RECEIPTS = sa.text(
    publish_ctes("FOR KEY SHARE")
    + """
SELECT EXISTS (SELECT 1 FROM found) AS found, EXISTS (SELECT 1 FROM revoked) AS revoked,
       (SELECT count(*) FROM notified) AS notified, published.id::text AS id,
       count(inserted.id) AS subscriptions, EXISTS (SELECT 1 FROM late) AS late
FROM published LEFT JOIN inserted ON inserted.id = published.id
GROUP BY published.n, published.id
ORDER BY published.n
"""
)

# SKIP LOCKED: consumers never wait on each other, and never get the same locked message.
# Claimable: available messages past their backoff, and delivered ones past their ack deadline
# (both have it in available_at), expired leases first, each read in claim-index order. The
# second read only takes what the first left of the batch, so only the rows claimed are locked.
# An expired lease counts as a failed attempt: with attempts used up, the message goes to the
# DLQ instead of back to a consumer.
# `id = ANY(ids)` rather than a join to the subquery: with LIMIT as a parameter, a generic plan
# (psycopg prepares statements after five runs) guesses a tenth of the table and joins it back
# with a hash join over a full scan; an array of ids is always looked up through the key.
EXPIRED = f"(sm.state = {DELIVERED} AND sm.delivery_attempts >= s.max_delivery_attempts)"
CLAIM = sa.text(f"""
WITH {GATE}, expired AS MATERIALIZED (
    SELECT ARRAY(
        SELECT id FROM subscription_messages
        WHERE subscription_id = :subscription_id AND state = {DELIVERED} AND available_at <= now()
          AND {CURRENT}
        ORDER BY available_at, seq LIMIT :batch_size FOR UPDATE SKIP LOCKED
    ) AS ids
), picked AS MATERIALIZED (
    SELECT {KEYS}, expired.ids || ARRAY(
        SELECT id FROM subscription_messages
        WHERE subscription_id = :subscription_id AND state = {AVAILABLE} AND available_at <= now()
          AND {CURRENT}
        ORDER BY available_at, seq LIMIT :batch_size - cardinality(expired.ids) FOR UPDATE SKIP LOCKED
    ) AS ids
    FROM expired
), claimed AS (
    UPDATE subscription_messages AS sm
    SET state = CASE WHEN {EXPIRED} THEN {DLQ} ELSE {DELIVERED} END,
        delivery_attempts = CASE WHEN {EXPIRED} THEN sm.delivery_attempts ELSE sm.delivery_attempts + 1 END,
        available_at = CASE WHEN {EXPIRED} THEN now()
                            ELSE now() + make_interval(secs => s.ack_deadline_seconds) END,
        locked_by = CASE WHEN {EXPIRED} THEN NULL ELSE :consumer_id END,
        locked_at = CASE WHEN {EXPIRED} THEN NULL ELSE now() END,
        lease = sm.lease + 1
    FROM picked, subscriptions AS s
    WHERE sm.subscription_id = picked.subscription_id AND sm.id = ANY(picked.ids) AND s.id = :subscription_id
    RETURNING sm.id::text AS id, sm.payload::text AS payload, sm.delivery_attempts, sm.created_at,
              sm.lease, sm.state, array_position(picked.ids, sm.id) AS n
)
SELECT id, payload, delivery_attempts, created_at, lease, state FROM (
    SELECT id, payload, delivery_attempts, created_at, lease, state, n FROM claimed
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, {MISSING}, 0
    WHERE NOT EXISTS (SELECT FROM subscriptions WHERE id = :subscription_id)
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, {REVOKED_STATE}, -1 WHERE NOT {CURRENT}
) AS answer
ORDER BY n
""")


def settle_statement(action: str, also: str = "") -> sa.TextClause:
    """Ack, nack or extend: `action` (a DELETE or UPDATE of `sm` joined to `requested`, up to its
    WHERE) changes the current deliveries named in `requested`; the answer is each requested
    item's outcome, in request order. `also` adds CTEs after `done`.

    A request item is a message id (lease NULL: whatever delivery is current) or a lease token
    (only that delivery). Outcomes: 0 done, 1 stale (the message is here but that delivery is
    not current), 2 not found; whether the subscription exists; and whether the token is current
    (nothing is done otherwise)."""
    return sa.text(f"""
WITH {GATE}, requested AS MATERIALIZED (
    SELECT {KEYS}, r.id, r.lease, r.n
    FROM unnest(CAST(:ids AS uuid[]), CAST(:leases AS integer[])) WITH ORDINALITY AS r (id, lease, n)
), done AS (
    {action}
    WHERE sm.subscription_id = requested.subscription_id AND sm.id = requested.id
      AND sm.state + 0 = {DELIVERED} AND (requested.lease IS NULL OR sm.lease = requested.lease)
      AND {CURRENT}
    RETURNING sm.id, sm.lease
){also}
SELECT CASE
    WHEN done.id IS NOT NULL THEN {DONE}
    WHEN EXISTS (SELECT 1 FROM subscription_messages AS sm
                 WHERE sm.subscription_id = requested.subscription_id AND sm.id = requested.id) THEN {STALE}
    ELSE {NOT_FOUND}
END AS outcome, {KNOWN}, {CURRENT} AS current
FROM requested
LEFT JOIN done ON done.id = requested.id AND (requested.lease IS NULL OR done.lease = requested.lease)
ORDER BY requested.n
""")


# Acked rows leave the claim table; one log row per statement remembers how many, for metrics.
ACK = settle_statement(
    "DELETE FROM subscription_messages AS sm USING requested",
    """, logged AS (
    INSERT INTO acked_messages (subscription_id, count)
    SELECT :subscription_id, count(*) FROM done HAVING count(*) > 0
)""",
)

# The hot path's form, fastpubsub's: message ids, no outcomes asked. One row back (how many),
# instead of an outcome per id: the outcomes cost PostgreSQL about a fifth more per ack.
ACK_CURRENT = sa.text(f"""
WITH {GATE}, target AS MATERIALIZED (
    SELECT {KEYS}, CAST(:ids AS uuid[]) AS ids WHERE {CURRENT}
), done AS (
    DELETE FROM subscription_messages AS sm USING target
    WHERE sm.subscription_id = target.subscription_id AND sm.id = ANY(target.ids)
      AND sm.state + 0 = {DELIVERED}
    RETURNING 1
), logged AS (
    INSERT INTO acked_messages (subscription_id, count)
    SELECT :subscription_id, count(*) FROM done HAVING count(*) > 0
    RETURNING count
)
SELECT coalesce((SELECT count FROM logged), 0) AS count, {KNOWN}, {CURRENT} AS current
""")

# Seconds before retry number `delivery_attempts`: min(max, min * 2^(attempts-1)).
BACKOFF_SECONDS = "LEAST(s.backoff_max_seconds, s.backoff_min_seconds * power(2, sm.delivery_attempts - 1))"
EXHAUSTED = "sm.delivery_attempts >= s.max_delivery_attempts"

# Retry after the backoff (or the caller's delay), or dead-letter once attempts are used up.
# The subscription is joined through its key: `s.id = sm.subscription_id`, with sm pinned to
# :subscription_id by the shared WHERE.
NACK = settle_statement(f"""UPDATE subscription_messages AS sm
    SET state = CASE WHEN {EXHAUSTED} THEN {DLQ} ELSE {AVAILABLE} END,
        available_at = CASE
            WHEN {EXHAUSTED} THEN now()
            ELSE now() + make_interval(secs => coalesce(CAST(:delay_seconds AS integer), {BACKOFF_SECONDS}))
        END,
        locked_by = NULL,
        locked_at = NULL
    FROM requested JOIN subscriptions AS s ON s.id = :subscription_id""")

# A new deadline, now + seconds (the subscription's ack deadline unless the caller says).
EXTEND = settle_statement("""UPDATE subscription_messages AS sm
    SET available_at = now()
        + make_interval(secs => coalesce(CAST(:seconds AS integer), s.ack_deadline_seconds))
    FROM requested JOIN subscriptions AS s ON s.id = :subscription_id""")

REPROCESS = sa.text(f"""
WITH target AS MATERIALIZED (
    SELECT {KEYS}, CAST(:ids AS uuid[]) AS ids
)
UPDATE subscription_messages AS sm
SET state = {AVAILABLE}, delivery_attempts = 0, available_at = now(), locked_by = NULL, locked_at = NULL
FROM target
WHERE sm.subscription_id = target.subscription_id AND sm.id = ANY(target.ids) AND sm.state + 0 = {DLQ}
""")

LIST_DLQ = sa.text(f"""
SELECT id::text AS id, payload::text AS payload, delivery_attempts, created_at
FROM subscription_messages
WHERE subscription_id = :subscription_id AND state = {DLQ}
ORDER BY available_at, seq
OFFSET :offset LIMIT :limit
""")

# A delivery past its ack deadline means the consumer died or gave up: release the message, or
# dead-letter it when its attempts are used up, so a consumer that always crashes cannot loop
# forever. A lock timeout, when given, also releases locks older than that (deadlines extended).
# The next consume claims expired leases itself, so this only tidies the metrics.
# One subscription with an ordering key at a time (:subscription_id), or all the others (NULL):
# a dead letter's trigger takes its subscription's ordering lock, and a statement that took the
# locks of several in the order of its rows could deadlock with a publish taking them in id order.
RELEASE_STUCK = sa.text(f"""
WITH released AS (
    UPDATE subscription_messages AS sm
    SET state = CASE WHEN {EXHAUSTED} THEN {DLQ} ELSE {AVAILABLE} END,
        available_at = now(),
        locked_by = NULL,
        locked_at = NULL
    FROM subscriptions AS s
    WHERE s.id = sm.subscription_id AND sm.locked_at IS NOT NULL AND sm.state = {DELIVERED}
      AND (s.id = CAST(:subscription_id AS text)
           OR CAST(:subscription_id AS text) IS NULL AND s.ordering_key IS NULL)
      AND (sm.available_at <= now()
           OR sm.locked_at < now() - make_interval(secs => CAST(:lock_timeout AS integer)))
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


# Run only when a statement matched nothing, to tell an empty queue from a missing subscription
# (and, for ack, nack and extend with no ids, a revoked token).
SUBSCRIPTION_EXISTS = sa.text(
    f"WITH {GATE} SELECT EXISTS (SELECT FROM subscriptions WHERE id = :subscription_id), {CURRENT}"
)

_DRIVER_SQL = {
    statement: driver_sql(statement)
    for statement in (
        PUBLISH,
        PUBLISH_NOWAIT,
        PUBLISH_RECEIPTS,
        CLAIM,
        ACK,
        ACK_CURRENT,
        NACK,
        EXTEND,
        REPROCESS,
        LIST_DLQ,
        SUBSCRIPTION_EXISTS,
    )
}


def run(conn: sa.Connection, statement: sa.TextClause, params: dict) -> psycopg.Cursor:
    """Execute a hot statement on the driver connection; rows come back as plain tuples."""
    return conn.connection.driver_connection.execute(_DRIVER_SQL[statement], params)


def uuid_array(ids: Sequence[uuid.UUID | str]) -> str:
    """Message ids as one uuid[] literal: a single text parameter that PostgreSQL parses in C,
    where psycopg would adapt a list item by item in Python. Ids are UUIDs or canonical UUID
    text (blueprints.message_id), so nothing in them needs quoting."""
    return "{" + ",".join(map(str, ids)) + "}"


def ensure_subscription(conn: sa.Connection, subscription_id: str, token: TokenRef | None = None) -> None:
    """Raise NotFound unless the subscription exists (Unauthorized first, unless the token, if
    any, is current)."""
    params = {"subscription_id": subscription_id, **token_params(token)}
    known, current = run(conn, SUBSCRIPTION_EXISTS, params).fetchone()
    if not current:
        raise Unauthorized(TOKEN_REVOKED)
    if not known:
        raise NotFound(SUBSCRIPTION_NOT_FOUND)


# What became of a request's batch (publish_many).
PUBLISHED, NO_TOPIC, REVOKED = 0, 1, 2
TOO_LATE = 3  # its due time is more than MAX_DELAY_SECONDS away

# When a batch's messages become claimable: None (now), seconds from now (0 to
# MAX_DELAY_SECONDS), or a due time as RFC 3339 text (the database's clock decides).
Delay = int | str | None

# A request's batch: (topic id, JSON array of objects as text, token to check or None, delay).
Batch = tuple[str, str, TokenRef | None, Delay]


def ensure_published(outcome: int) -> None:
    """Raise what a batch that was not published answers: 401 for a revoked token (checked first,
    as before any other statement of the request), 422 for a due time too far ahead, 404 for a
    missing topic."""
    if outcome == REVOKED:
        raise Unauthorized(TOKEN_REVOKED)
    if outcome == TOO_LATE:
        raise ValidationFailed({"query.deliver_at": [DELAY_TOO_LONG]})
    if outcome == NO_TOPIC:
        raise NotFound(TOPIC_NOT_FOUND)


def publish(
    conn: sa.Connection,
    topic_id: str,
    payloads_json: str,
    token: TokenRef | None = None,
    delay: Delay = None,
) -> int:
    """Publish a JSON array of objects (as text) to a topic; returns how many copies were queued.
    With a token, only while it is current (clients.token_is_current); with a delay, claimable
    only from then on."""
    outcomes, copies = publish_many(conn, [(topic_id, payloads_json, token, delay)])
    ensure_published(outcomes[0])
    return copies


def delays_json(delays: Sequence[Delay]) -> str | None:
    """The :delays parameter of the publish statements: None when no batch is delayed."""
    if all(delay is None for delay in delays):
        return None
    return orjson.dumps(delays).decode()


def tokens_json(tokens: Sequence[TokenRef | None]) -> str | None:
    """The :tokens parameter of the publish statements: None when no token is to be checked."""
    if all(token is None for token in tokens):
        return None
    return orjson.dumps(tokens).decode()


def publish_many(conn: sa.Connection, batches: Sequence[Batch], wait: bool = True) -> tuple[list[int], int]:
    """Publish several batches in one statement: each one's outcome (PUBLISHED, NO_TOPIC or
    REVOKED), and how many copies were queued in all. A batch to a missing topic or with a
    revoked token queues nothing; the others are published all the same. Without `wait`, a
    subscription locked against publishes fails the statement at once
    (psycopg.errors.LockNotAvailable)."""
    params = {
        "topic_ids": orjson.dumps([batch[0] for batch in batches]).decode(),
        "payloads": "[" + ",".join(batch[1] for batch in batches) + "]",
        "tokens": tokens_json([batch[2] for batch in batches]),
        "delays": delays_json([batch[3] for batch in batches]),
    }
    found, revoked, copies, _, late = run(conn, PUBLISH if wait else PUBLISH_NOWAIT, params).fetchone()
    found, revoked, late = set(found), set(revoked), set(late)
    outcomes = [
        REVOKED if k in revoked else TOO_LATE if k in late else PUBLISHED if k in found else NO_TOPIC
        for k in range(1, len(batches) + 1)
    ]
    return outcomes, copies


def publish_with_receipts(
    conn: sa.Connection,
    topic_id: str,
    payloads_json: str,
    token: TokenRef | None = None,
    delay: Delay = None,
) -> list[tuple[str, int]]:
    """Publish as publish() does; returns each message's (id, subscriptions that got a copy), in
    request order."""
    params = {
        "topic_ids": orjson.dumps([topic_id]).decode(),
        "payloads": f"[{payloads_json}]",
        "tokens": tokens_json([token]),
        "delays": delays_json([delay]),
    }
    rows = run(conn, PUBLISH_RECEIPTS, params).fetchall()
    if not rows:  # an empty batch: nothing to answer, but the topic must exist and the token hold
        publish(conn, topic_id, payloads_json, token, delay)
    else:
        found, revoked, late = rows[0][0], rows[0][1], rows[0][5]
        ensure_published(REVOKED if revoked else TOO_LATE if late else PUBLISHED if found else NO_TOPIC)
    return [(row[3], row[4]) for row in rows]


def outcome_known(error: Exception) -> bool:
    """Whether a statement that raised this surely committed nothing: anything but a lost
    connection (class 08, or a server shutting down or killing the backend: 57P), after which
    its commit may or may not have happened."""
    if not isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    return error.sqlstate is not None and not error.sqlstate.startswith(("08", "57P"))


# A statement cancelled by statement_timeout (or by an operator's pg_cancel_backend).
QUERY_CANCELED = "57014"


def retry_group_alone(error: Exception) -> bool:
    """Whether the requests of a group statement that raised this run their items alone: when it
    surely committed nothing (outcome_known), unless it was cancelled for taking too long, since
    each would then wait as long again; they answer 503 at once instead (nothing was stored)."""
    return outcome_known(error) and getattr(error, "sqlstate", None) != QUERY_CANCELED


def group_queue_error(error: Exception) -> Exception | None:
    """What the requests queued behind a group statement that raised this answer, instead of
    running statements of their own: when the database did not answer it in time (cancelled by
    the statement timeout, or no answer within the pool's answer bound), a 503 saying that
    nothing was done for them, which is true: they never ran. None otherwise: they run."""
    if getattr(error, "sqlstate", None) == QUERY_CANCELED or isinstance(error, OutcomeUnknown):
        return DatabaseUnavailable(DATABASE_TIMED_OUT)
    return None


# Claims in one consume: each further one dead-letters at least one lapsed lease.
MAX_CLAIMS = 10


def consume(
    conn: sa.Connection,
    subscription_id: str,
    consumer_id: str,
    batch_size: int,
    token: TokenRef | None = None,
) -> list:
    """Lease up to batch_size claimable messages to consumer_id: (id, payload as JSON text,
    delivery_attempts, created_at, lease, state) tuples. With a token, only while it is current."""
    params = {
        "subscription_id": subscription_id,
        "consumer_id": consumer_id,
        "batch_size": batch_size,
        **token_params(token),
    }
    rows = run(conn, CLAIM, params).fetchall()
    if rows and rows[0][5] == REVOKED_STATE:
        raise Unauthorized(TOKEN_REVOKED)
    if rows and rows[0][5] == MISSING:
        raise NotFound(SUBSCRIPTION_NOT_FOUND)
    for _ in range(MAX_CLAIMS - 1):
        if all(row[5] == DELIVERED for row in rows):
            break
        # Lapsed leases out of attempts went to the DLQ and took places in the batch: claim
        # again for those places, so that an empty answer means nothing was claimable.
        rows = [row for row in rows if row[5] == DELIVERED]
        params["batch_size"] = batch_size - len(rows)
        rows += run(conn, CLAIM, params).fetchall()
    else:
        rows = [row for row in rows if row[5] == DELIVERED]
    return rows


# A reference to a delivered message: its id (the current delivery, whichever it is) or a lease
# token's (id, lease) (that delivery only).
MessageRef = tuple[str, int | None]


def lease_array(refs: Sequence[MessageRef]) -> str | None:
    """The leases as one integer[] literal (NULL for plain ids); None when every ref is an id."""
    if all(lease is None for _, lease in refs):
        return None
    return "{" + ",".join("NULL" if lease is None else str(lease) for _, lease in refs) + "}"


def settle(
    conn: sa.Connection,
    statement: sa.TextClause,
    subscription_id: str,
    refs,
    token: TokenRef | None,
    **params,
) -> list[int]:
    """Run ack, nack or extend; returns each ref's outcome (DONE, STALE or NOT_FOUND). With a
    token, only while it is current."""
    params.update(
        subscription_id=subscription_id,
        ids=uuid_array([id for id, _ in refs]),
        leases=lease_array(refs),
        **token_params(token),
    )
    rows = run(conn, statement, params).fetchall()
    if not rows:  # no refs: nothing to settle, but the subscription must exist
        ensure_subscription(conn, subscription_id, token)
    elif not rows[0][2]:
        raise Unauthorized(TOKEN_REVOKED)
    elif not rows[0][1]:
        raise NotFound(SUBSCRIPTION_NOT_FOUND)
    return [outcome for outcome, _, _ in rows]


def ack(
    conn: sa.Connection, subscription_id: str, refs: Sequence[MessageRef], token: TokenRef | None = None
) -> list[int]:
    """Acknowledge current deliveries; anything else named is left alone (STALE, NOT_FOUND)."""
    return settle(conn, ACK, subscription_id, refs, token)


def ack_current(
    conn: sa.Connection, subscription_id: str, ids: Sequence[uuid.UUID | str], token: TokenRef | None = None
) -> int:
    """Acknowledge the current deliveries of these messages; returns how many. Others are ignored."""
    params = {"subscription_id": subscription_id, "ids": uuid_array(ids), **token_params(token)}
    count, known, current = run(conn, ACK_CURRENT, params).fetchone()
    if not current:
        raise Unauthorized(TOKEN_REVOKED)
    if not known:
        raise NotFound(SUBSCRIPTION_NOT_FOUND)
    return count


def nack(
    conn: sa.Connection,
    subscription_id: str,
    refs: Sequence[MessageRef],
    delay_seconds: int | None = None,
    token: TokenRef | None = None,
) -> list[int]:
    """Return current deliveries for a retry after the backoff (or delay_seconds), or to the DLQ
    when their attempts are used up."""
    return settle(conn, NACK, subscription_id, refs, token, delay_seconds=delay_seconds)


def extend(
    conn: sa.Connection,
    subscription_id: str,
    refs: Sequence[MessageRef],
    seconds: int | None = None,
    token: TokenRef | None = None,
) -> list[int]:
    """Move the ack deadline of current deliveries to now + seconds (default: the subscription's)."""
    return settle(conn, EXTEND, subscription_id, refs, token, seconds=seconds)


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


def release_stuck(conn: sa.Connection, lock_timeout_seconds: int | None = None) -> tuple[int, int]:
    """Release deliveries past their ack deadline (or locked longer than the timeout, if given);
    returns (released, dead-lettered)."""
    ordered = conn.execute(
        sa.text("SELECT id FROM subscriptions WHERE ordering_key IS NOT NULL ORDER BY id")
    ).scalars()
    released = dead_lettered = 0
    for subscription_id in [None, *ordered]:
        params = {"lock_timeout": lock_timeout_seconds, "subscription_id": subscription_id}
        row = conn.execute(RELEASE_STUCK, params).one()
        released, dead_lettered = released + row.released, dead_lettered + row.dead_lettered
    return released, dead_lettered


def delete_acked(conn: sa.Connection, older_than_seconds: int) -> int:
    """Forget acked messages older than the retention; returns how many."""
    return int(conn.execute(DELETE_ACKED, {"older_than": older_than_seconds}).scalar())


# A nack with dead_letter=true: to the DLQ at once, whatever attempts are left, instead of a retry
# (NATS' AckTerm): for a message its consumer knows will never succeed. Its attempts are kept.
DEAD_LETTER = settle_statement(f"""UPDATE subscription_messages AS sm
    SET state = {DLQ}, available_at = now(), locked_by = NULL, locked_at = NULL
    FROM requested""")
_DRIVER_SQL[DEAD_LETTER] = driver_sql(DEAD_LETTER)


def dead_letter(
    conn: sa.Connection, subscription_id: str, refs: Sequence[MessageRef], token: TokenRef | None = None
) -> list[int]:
    """Send current deliveries to the DLQ at once, as a nack with no attempts left would."""
    return settle(conn, DEAD_LETTER, subscription_id, refs, token)
