"""Plans made while the claim table was small are not kept once it has grown: it is analyzed then.

psycopg prepares a statement server-side at its 5th run on a connection, and PostgreSQL then keeps
its generic plan, made at the table's size of that moment, until something invalidates it (an
ANALYZE or VACUUM of the table). Made while the table held a few rows, that plan reads it
sequentially: the cheapest way into a table of one page. Then a burst arrives, and until
autovacuum comes by (a minute or more) every claim and ack on that connection read the whole table:
with a new subscription's 10,000 messages, a claim of 100 read 60,156 rows, an ack of 20 ids 20,052
(tests/test_query_plans.py, "A generic plan made while the table was tiny"). No way of writing the
statements avoids it: on a table of one page, reading it whole is the cheapest plan of each of
them, whatever indexes it could use. Planning them at each run instead cost PostgreSQL a fifth more
CPU per message in `bench consume_ack` (the claim's plan alone takes about a millisecond).

So a statement trigger on the publish's INSERT compares the table's size with the size the planner
last saw (pg_class.relpages, which ANALYZE and VACUUM set): past twice that (and past 16 pages), the
publish analyzes the table, which invalidates every session's plans that read it; each is made anew
at its next run, at the table's size then, with statistics that know the burst's subscription. A
plan is thus not used on a table more than twice the size it was made for. The check costs a
publish statement a look at the file's size, and a read of pg_class once a second per session
(one-message publishes, 8 alternating blocks of 1,000 each: 633 us a statement with the trigger,
604 without, on a busy 2-core machine). The ANALYZE (a sample of 30,000 rows) happens once per
doubling that autovacuum did not see first, in the publish that crossed it. Only one publish at a
time analyzes: the others, and any while autovacuum holds the table, skip it (NOWAIT).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 04:00:00
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

FUNCTIONS = """
-- The size past which a publish analyzes the table: twice what the planner last saw, in bytes,
-- kept per session for a second (pubsub.replan_above, pubsub.replan_checked) so that a publish
-- reads pg_class at most once a second: the check costs it a look at the file's size.
CREATE FUNCTION pubsub_replan_on_growth() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    size bigint := pg_relation_size(TG_RELID);
    above bigint := coalesce(nullif(current_setting('pubsub.replan_above', true), ''), '-1')::bigint;
    checked double precision :=
        coalesce(nullif(current_setting('pubsub.replan_checked', true), ''), '0')::double precision;
BEGIN
    IF size <= above AND extract(epoch FROM now()) < checked + 1 THEN
        RETURN NULL;
    END IF;
    SELECT 2 * current_setting('block_size')::bigint * greatest(relpages, 8) INTO above
    FROM pg_class WHERE oid = TG_RELID;
    IF size > above THEN
        BEGIN
            LOCK TABLE subscription_messages IN SHARE UPDATE EXCLUSIVE MODE NOWAIT;
        EXCEPTION WHEN lock_not_available THEN
            RETURN NULL;  -- another publish is analyzing it, or autovacuum is at it
        END;
        ANALYZE subscription_messages;
        above := 2 * greatest(size, 8 * current_setting('block_size')::bigint);
    END IF;
    PERFORM set_config('pubsub.replan_above', above::text, false),
            set_config('pubsub.replan_checked', extract(epoch FROM now())::text, false);
    RETURN NULL;
END $$;

CREATE TRIGGER replan_on_growth AFTER INSERT ON subscription_messages
FOR EACH STATEMENT EXECUTE FUNCTION pubsub_replan_on_growth();
"""


def upgrade():
    op.execute(FUNCTIONS)


def downgrade():
    op.execute("DROP TRIGGER replan_on_growth ON subscription_messages")
    op.execute("DROP FUNCTION pubsub_replan_on_growth()")
