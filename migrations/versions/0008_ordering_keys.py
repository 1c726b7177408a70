"""Ordering keys: a subscription may name a payload field whose value orders its messages.

Messages with the same key value are delivered one at a time, in publish order. The first of a
key (its head) is available as usual; those behind it wait in state 3 (WAITING), which no claim
reads: the claim index's ranges are states 0 and 1, so a busy key costs a claim nothing. When the
head leaves the queue (acked, dead-lettered, purged), the next one becomes available.

Triggers keep that rule on every path that adds a message to a key or removes its head (publish,
redrive, ack, nack, claims of lapsed leases, cleanup-stuck, purges, deletes), so that no
statement can forget it. They serialize on advisory locks held to commit, and read with a fresh
snapshot after taking them (PL/pgSQL functions are volatile: each of their queries sees what
committed before it started). So a publish either sees the head that an ack is removing still
there and its message waits, and the ack, which waited for the publish's commit, then sees that
message and promotes it; or it sees the head gone and its message is the new head.

The locks: each key of an ordered subscription has one, taken with the subscription's lock in
shared mode (publishes and acks: other keys go on in parallel); the rare paths (dead-lettering,
redrive, deletes) take the subscription's lock exclusively, which excludes every key's holder.
Every statement takes them subscription by subscription in id order, each one's keys in key
order, before it needs them (the publish, the ack's statement trigger) or one subscription at a
time (the row triggers, cleanup-stuck), so two statements cannot deadlock on them.

The triggers' queries are planned once per session and their plans kept (PL/pgSQL), so a plan
made while the table was small would read it whole at every row later, until an ANALYZE. With
sequential scans off for them (a function-level setting), each reads its key's entries of the
ordering index, whatever the table's size or statistics were at planning time. The promotion
also has sorts off: the claim index could give a key's waiting messages too, by reading all of
the subscription's and sorting them by seq; the ordering index gives them in seq order, and with
sorts off it is always the cheaper way.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 01:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLE = "subscription_messages"

FUNCTIONS = """
-- A whole ordered subscription, exclusively: for the rare paths (dead-lettering, redrive,
-- deletes), which then need no key locks. Shared: beside key locks (pubsub_lock_keys).
CREATE FUNCTION pubsub_lock_ordering(subscription_id text, nowait boolean DEFAULT false,
                                     shared boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    lock bigint := hashtextextended('pubsub ordering ' || subscription_id, 0);
    taken boolean;
BEGIN
    IF NOT nowait AND shared THEN
        PERFORM pg_advisory_xact_lock_shared(lock);
    ELSIF NOT nowait THEN
        PERFORM pg_advisory_xact_lock(lock);
    ELSE
        taken := CASE WHEN shared THEN pg_try_advisory_xact_lock_shared(lock)
                      ELSE pg_try_advisory_xact_lock(lock) END;
        IF NOT taken THEN
            RAISE EXCEPTION 'the ordering lock of subscription % is held', subscription_id
                USING ERRCODE = 'lock_not_available';
        END IF;
    END IF;
END $$;

-- Some keys of an ordered subscription (publishes, acks): the subscription's lock shared, then
-- each key's exclusively, in key order, so that acks and publishes of other keys go on. Over 128
-- keys, the subscription's lock exclusively instead: PostgreSQL's lock table holds about 64 locks
-- per connection on average.
CREATE FUNCTION pubsub_lock_keys(subscription_id text, keys uuid[], nowait boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pubsub_lock_ordering(subscription_id, nowait, shared => cardinality(keys) <= 128);
    IF cardinality(keys) <= 128 THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(subscription_id || ' ' || k::text, 0))
        FROM unnest(keys) AS k ORDER BY k;
    END IF;
END $$;

-- A keyed message enters the queue: published (its keys locked), or redriven from the DLQ (the
-- subscription locked). It waits if its key has a message pending already.
CREATE FUNCTION pubsub_ordering_enter() RETURNS trigger
LANGUAGE plpgsql SET enable_seqscan = off AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pubsub_lock_keys(NEW.subscription_id, ARRAY[NEW.ordering_key]);
    ELSE
        PERFORM pubsub_lock_ordering(NEW.subscription_id);
    END IF;
    IF EXISTS (
        SELECT FROM subscription_messages
        WHERE ordering_key = NEW.ordering_key AND subscription_id = NEW.subscription_id
          AND state IN (0, 1, 3)
    ) THEN
        NEW.state := 3;
    END IF;
    RETURN NEW;
END $$;

-- The heads of these keys left the queue (the caller holds their locks): the next message of
-- each, in publish order, becomes available, and long-poll consumers waiting on the subscription
-- are woken as by a publish. FOR UPDATE skips a message that a purge deleted meanwhile (purges
-- delete waiting messages without the ordering locks) and takes the next. The update goes by the
-- locked rows' ctids: by id, the planner could choose to read the subscription's whole range of
-- the claim index and join it.
CREATE FUNCTION pubsub_ordering_next(subscription text, keys uuid[]) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off SET enable_sort = off AS $$
DECLARE
    tids tid[];
    promoted bigint;
BEGIN
    SELECT array_agg(next.tid) INTO tids FROM (
        SELECT (
            SELECT w.ctid FROM subscription_messages AS w
            WHERE w.ordering_key = k.key AND w.subscription_id = subscription AND w.state = 3
            ORDER BY w.seq LIMIT 1 FOR UPDATE
        ) AS tid
        FROM unnest(keys) AS k (key)
    ) AS next
    WHERE next.tid IS NOT NULL;
    IF tids IS NULL THEN
        RETURN;
    END IF;
    UPDATE subscription_messages SET state = 0 WHERE ctid = ANY(tids);
    GET DIAGNOSTICS promoted = ROW_COUNT;
    PERFORM pg_notify('pubsub', concat_ws(' ', s.id, promoted, pg_current_xact_id()))
    FROM subscriptions AS s WHERE s.id = subscription AND s.notify_until > now();
END $$;

-- A head dead-lettered (by a nack, a claim or cleanup-stuck): row by row, a rare path.
CREATE FUNCTION pubsub_ordering_leave() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pubsub_lock_ordering(OLD.subscription_id);
    PERFORM pubsub_ordering_next(OLD.subscription_id, ARRAY[OLD.ordering_key]);
    RETURN NULL;
END $$;

-- Heads deleted (acks, purges, deletes): once per statement, the hot path of acks, each
-- subscription's keys at once, subscriptions in id order. An ack of unordered messages finds no
-- key in `gone` and does nothing else.
CREATE FUNCTION pubsub_ordering_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    heads record;
BEGIN
    FOR heads IN
        SELECT subscription_id, array_agg(DISTINCT ordering_key) AS keys FROM gone
        WHERE ordering_key IS NOT NULL AND state IN (0, 1)
        GROUP BY subscription_id ORDER BY subscription_id
    LOOP
        PERFORM pubsub_lock_keys(heads.subscription_id, heads.keys);
        PERFORM pubsub_ordering_next(heads.subscription_id, heads.keys);
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER ordering_enter BEFORE INSERT ON subscription_messages
FOR EACH ROW WHEN (NEW.ordering_key IS NOT NULL) EXECUTE FUNCTION pubsub_ordering_enter();

CREATE TRIGGER ordering_reenter BEFORE UPDATE OF state ON subscription_messages
FOR EACH ROW WHEN (NEW.ordering_key IS NOT NULL AND OLD.state = 2 AND NEW.state = 0)
EXECUTE FUNCTION pubsub_ordering_enter();

CREATE TRIGGER ordering_deleted AFTER DELETE ON subscription_messages
REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION pubsub_ordering_deleted();

CREATE TRIGGER ordering_leave_update AFTER UPDATE OF state ON subscription_messages
FOR EACH ROW WHEN (OLD.ordering_key IS NOT NULL AND OLD.state IN (0, 1) AND NEW.state NOT IN (0, 1))
EXECUTE FUNCTION pubsub_ordering_leave();
"""


def upgrade():
    op.add_column("subscriptions", sa.Column("ordering_key", sa.Text(), nullable=True))
    op.add_column(TABLE, sa.Column("ordering_key", postgresql.UUID(), nullable=True))
    op.drop_constraint(op.f("ck_subscription_messages_state"), TABLE, type_="check")
    op.create_check_constraint(op.f("ck_subscription_messages_state"), TABLE, "state IN (0, 1, 2, 3)")
    op.create_index(
        "ix_subscription_messages_ordering",
        TABLE,
        ["ordering_key", "subscription_id", "state", "seq"],
        postgresql_where=sa.text("ordering_key IS NOT NULL"),
    )
    op.execute(FUNCTIONS)


def downgrade():
    for trigger in ("ordering_enter", "ordering_reenter", "ordering_deleted", "ordering_leave_update"):
        op.execute(f"DROP TRIGGER {trigger} ON {TABLE}")
    op.execute(
        "DROP FUNCTION pubsub_ordering_enter(), pubsub_ordering_leave(), pubsub_ordering_deleted(),"
        " pubsub_ordering_next(text, uuid[]), pubsub_lock_keys(text, uuid[], boolean),"
        " pubsub_lock_ordering(text, boolean, boolean)"
    )
    op.drop_index("ix_subscription_messages_ordering", table_name=TABLE)
    # What waited behind a key is simply available: without keys there is no order to keep.
    op.execute(f"UPDATE {TABLE} SET state = 0 WHERE state = 3")
    op.drop_constraint(op.f("ck_subscription_messages_state"), TABLE, type_="check")
    op.create_check_constraint(op.f("ck_subscription_messages_state"), TABLE, "state IN (0, 1, 2)")
    op.drop_column(TABLE, "ordering_key")
    op.drop_column("subscriptions", "ordering_key")
