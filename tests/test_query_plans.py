"""Query plans of the hot path, in two parts.

1. At 100k+ rows with fresh statistics: claim, ack, nack, extend and metrics never read the
   messages table or the ack log sequentially, neither in a custom plan nor in the generic plan
   PostgreSQL may switch to once psycopg prepares a statement server-side (from its 5th execution
   on a connection). A generic plan is made without the parameter values, so it cannot use the
   subscription's statistics and assumes a LIMIT keeps 10% of the rows. The large state is built
   once for the module with INSERT ... SELECT generate_series (through the API it would take
   minutes and stamp every message with the same time), so the module replaces the per-test
   truncation with its own.
2. In every state the statistics can be in when a burst arrives (none yet; only other
   subscriptions; the table analyzed empty; analyzed full, then drained; one subscription of a
   thousand holding most rows; an uncommon one of a thousand): each statement that finds messages
   by id or claims them, run with EXPLAIN ANALYZE, reads no more rows of subscription_messages
   than it touches, and looks ids up with both key columns as index conditions. Each state is a
   database of its own, made from a migrated template and filled through the domain functions.

Statements are prepared with the parameter types psycopg sends and explained in a transaction
that is rolled back.
"""

import datetime as dt
import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from psycopg.adapt import AdaptersMap, PyFormat
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.engine import make_url

from pubsub import create_app, db, messages, operations, subscriptions, topics
from pubsub.tables import AVAILABLE, DELIVERED, DLQ
from tests.conftest import new_database

HOT = "orders-hot"  # its consumers fell behind: most of the table is its backlog
COLD = "orders-billing"  # keeps up: a few percent of each table
QUIET = "audit-alerts"  # almost nothing queued, never acked
OTHERS = ("orders-shipping", "orders-analytics", "audit-archive")

# Blocks of messages; retrying: nacked, due again after a backoff (available_at in the future),
# or, never delivered, published with a delay.
FIELDS = ("subscription_id", "state", "delivery_attempts", "retrying", "count")
MESSAGES = [
    (HOT, AVAILABLE, 0, False, 90_000),
    (HOT, AVAILABLE, 1, True, 5_000),
    (HOT, AVAILABLE, 0, True, 3_000),
    (HOT, DELIVERED, 1, False, 2_000),
    (HOT, DLQ, 5, False, 1_000),
    *[
        block
        for subscription_id in (COLD, *OTHERS)
        for block in (
            (subscription_id, AVAILABLE, 0, False, 8_000),
            (subscription_id, AVAILABLE, 0, True, 200),
            (subscription_id, DELIVERED, 1, False, 500),
            (subscription_id, DLQ, 5, False, 500),
        )
    ],
    (QUIET, AVAILABLE, 0, False, 10),
]
# One row per ack call in the last hour (the default retention of cleanup-acked). Four subscriptions
# ack: a generic plan guesses that one holds a quarter of the log, and only the index that carries
# `count` (migration 0003) then keeps the metrics query off a full read of it; with two or three,
# reading it all is the cheapest plan anyway, index or not, as it is for a custom plan.
ACK_CALLS = {HOT: 120_000, COLD: 20_000, **dict.fromkeys(OTHERS[:2], 20_000)}

FILL_MESSAGES = sa.text(f"""
INSERT INTO subscription_messages
    (id, subscription_id, payload, state, delivery_attempts, available_at, locked_by, locked_at, created_at)
SELECT gen_random_uuid(), subscription_id, jsonb_build_object('order', n, 'kind', 'order.created'),
       state, delivery_attempts,
       CASE WHEN retrying THEN now() + random() * interval '5 minutes'
            WHEN state = {DLQ} THEN created_at + interval '10 minutes'
            ELSE created_at END,
       CASE WHEN state = {DELIVERED} THEN 'worker-' || n % 8 END,
       CASE WHEN state = {DELIVERED} THEN now() - random() * interval '30 seconds' END,
       created_at
FROM (
    SELECT b.*, n, now() - random() * interval '1 hour' AS created_at
    FROM jsonb_to_recordset(CAST(:blocks AS jsonb))
        AS b (subscription_id text, state smallint, delivery_attempts int, retrying bool, count int)
    CROSS JOIN LATERAL generate_series(1, b.count) AS n
) AS m
ORDER BY m.created_at  -- seq follows publish time and the subscriptions interleave, as in real use
""")

FILL_ACKS = sa.text("""
INSERT INTO acked_messages (subscription_id, acked_at, count)
SELECT c.key, now() - random() * interval '1 hour' AS acked_at, 1 + n % 10
FROM jsonb_each_text(CAST(:calls AS jsonb)) AS c
CROSS JOIN LATERAL generate_series(1, c.value::int) AS n
ORDER BY acked_at
""")

LARGE_TABLES = ("subscription_messages", "acked_messages")
NUMBERED = psycopg_dialect.dialect(paramstyle="numeric_dollar")  # $1, $2...: what PREPARE takes


@dataclass
class Backlog:
    url: str  # libpq form, for plain psycopg connections
    engine: sa.Engine
    delivered_ids: dict[str, list[uuid.UUID]]  # a consumer's batch of each subscription


def libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(autouse=True)
def clean_tables() -> None:
    """Replaces conftest's per-test truncation: every test here reads the one backlog below."""


@pytest.fixture(scope="module")
def backlog(app, database_url: str) -> Backlog:
    engine = db.get_engine(app)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(LARGE_TABLES)}, subscriptions, topics"))
        for topic_id in ("orders", "audit"):
            topics.create_topic(conn, topic_id)
        for subscription_id in (HOT, COLD, QUIET, *OTHERS):
            topic_id = subscription_id.split("-")[0]
            subscriptions.create_subscription(conn, subscription_id, topic_id, None, 5, 5, 300, 60)
        conn.execute(sa.text("SELECT setseed(0.5)"))  # the same timestamps, hence statistics, every run
        blocks = [dict(zip(FIELDS, block, strict=True)) for block in MESSAGES]
        conn.execute(FILL_MESSAGES, {"blocks": json.dumps(blocks)})
        conn.execute(FILL_ACKS, {"calls": json.dumps(ACK_CALLS)})
        rows = conn.execute(
            sa.text("""
                SELECT subscription_id, (array_agg(id))[1:10] FROM subscription_messages
                WHERE state = :delivered GROUP BY subscription_id
            """),
            {"delivered": DELIVERED},
        )
        delivered_ids = {subscription_id: ids for subscription_id, ids in rows}
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("ANALYZE subscriptions, subscription_messages")
        # Insert-only, so autovacuum keeps its visibility map current and index-only scans work.
        # The claim table churns too fast for that, so it is not vacuumed here.
        conn.execute("VACUUM ANALYZE acked_messages")
    return Backlog(libpq_url(database_url), engine, delivered_ids)


@pytest.fixture
def conn(backlog: Backlog) -> Iterator[psycopg.Connection]:
    with psycopg.connect(backlog.url) as conn:
        yield conn
        conn.rollback()  # EXPLAIN without ANALYZE runs nothing; roll back the DML all the same


# With auth on, the statements check the request's token themselves (messages.GATE): planned
# with one, as the plan with none can only be simpler. Its client need not exist for a plan.
TOKEN = messages.token_params((str(uuid.uuid4()), 1))


def claim_statement(backlog: Backlog, subscription_id: str) -> tuple[sa.Executable, dict]:
    params = {"subscription_id": subscription_id, "consumer_id": "worker-1", "batch_size": 10}
    return messages.CLAIM, {**params, **TOKEN}


def settle_params(backlog: Backlog, subscription_id: str, **params) -> dict:
    """Half the ids as plain message ids, half as lease tokens (the first delivery's)."""
    ids = backlog.delivered_ids[subscription_id]
    leases = "{" + ",".join("NULL" if n % 2 else "1" for n in range(len(ids))) + "}"
    ids_array = messages.uuid_array(ids)
    return {"subscription_id": subscription_id, "ids": ids_array, "leases": leases, **TOKEN, **params}


def ack_statement(backlog: Backlog, subscription_id: str) -> tuple[sa.Executable, dict]:
    return messages.ACK, settle_params(backlog, subscription_id)


def ack_current_statement(backlog: Backlog, subscription_id: str) -> tuple[sa.Executable, dict]:
    ids = messages.uuid_array(backlog.delivered_ids[subscription_id])
    return messages.ACK_CURRENT, {"subscription_id": subscription_id, "ids": ids, **TOKEN}


def nack_statement(backlog: Backlog, subscription_id: str) -> tuple[sa.Executable, dict]:
    return messages.NACK, settle_params(backlog, subscription_id, delay_seconds=None)


def extend_statement(backlog: Backlog, subscription_id: str) -> tuple[sa.Executable, dict]:
    return messages.EXTEND, settle_params(backlog, subscription_id, seconds=30)


def metrics_statement(backlog: Backlog, subscription_id: str) -> tuple[sa.Executable, dict]:
    """get_metrics builds its statement inside: run it, and catch the statement and its values."""
    executed = []

    def catch(conn, cursor, statement, parameters, context, executemany) -> None:
        executed.append((context.compiled.statement, parameters))

    with backlog.engine.connect() as connection:
        sa.event.listen(connection, "before_cursor_execute", catch)
        subscriptions.get_metrics(connection, subscription_id)
    assert len(executed) == 1, f"get_metrics ran {len(executed)} statements through SQLAlchemy, not 1"
    [(statement, parameters)] = executed
    return statement, parameters


HOT_PATH: dict[str, Callable[[Backlog, str], tuple[sa.Executable, dict]]] = {
    "claim": claim_statement,
    "ack": ack_statement,
    "ack_current": ack_current_statement,
    "nack": nack_statement,
    "extend": extend_statement,
    "metrics": metrics_statement,
}


def driver_type(adapters: AdaptersMap, value) -> str:
    """The type psycopg sends a parameter as; a str goes as unknown, for the server to infer."""
    if value is None:
        return "unknown"
    oid = adapters.get_dumper(type(value), PyFormat.AUTO)(type(value)).upgrade(value, PyFormat.AUTO).oid
    if not oid:
        return "unknown"
    info = adapters.types[oid]
    return info.regtype + ("[]" if oid == info.array_oid else "")


def explain_prepared(
    conn: psycopg.Connection, statement: sa.Executable, params: dict, plan_cache_mode: str, analyze=False
) -> tuple[dict, str]:
    """The plan of the statement prepared as psycopg prepares it: (JSON tree, text). With
    `analyze`, the statement runs (the caller rolls back) and the tree holds the rows read."""
    compiled = statement.compile(dialect=NUMBERED)
    values = [params[name] for name in compiled.positiontup]
    types = ", ".join(driver_type(conn.adapters, value) for value in values)
    conn.execute("SELECT set_config('plan_cache_mode', %s, true)", [plan_cache_mode])
    conn.execute(f"PREPARE hot_path ({types}) AS {compiled.string}")
    execute = sql.SQL("EXECUTE hot_path ({})").format(sql.SQL(", ").join(map(sql.Literal, values)))
    options = sql.SQL("(ANALYZE, FORMAT JSON)" if analyze else "(FORMAT JSON)")
    [[tree]] = conn.execute(sql.SQL("EXPLAIN {} ").format(options) + execute).fetchone()
    text = ""
    if not analyze:  # a second EXPLAIN ANALYZE would run the statement twice
        text = "\n".join(line for (line,) in conn.execute(sql.SQL("EXPLAIN ") + execute))
    conn.execute("DEALLOCATE hot_path")
    return tree["Plan"], text


def sequential_scans(node: dict) -> list[str]:
    """The large tables that a plan node or any node below it reads with a (parallel) Seq Scan."""
    found = []
    if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in LARGE_TABLES:
        found.append(node["Relation Name"])
    for child in node.get("Plans", ()):
        found.extend(sequential_scans(child))
    return found


def check_plan(
    conn: psycopg.Connection, backlog: Backlog, name: str, subscription_id: str, plan_cache_mode: str
) -> None:
    statement, params = HOT_PATH[name](backlog, subscription_id)
    plan, text = explain_prepared(conn, statement, params, plan_cache_mode)
    scanned = sequential_scans(plan)
    assert not scanned, (
        f"{name} for {subscription_id!r} ({plan_cache_mode}) reads {', '.join(sorted(set(scanned)))} "
        f"with a sequential scan:\n{text}"
    )


# HOT is left out of the custom metrics: it holds most of both tables, and counting most of a
# table is cheapest as a sequential scan (an index-only scan is costed higher): not a regression.
CUSTOM_CASES = [
    ("claim", HOT),
    ("claim", COLD),
    ("claim", QUIET),
    ("ack", HOT),
    ("ack", COLD),
    ("nack", HOT),
    ("nack", COLD),
    ("metrics", COLD),
    ("metrics", QUIET),
]


@pytest.mark.parametrize(("name", "subscription_id"), CUSTOM_CASES, ids=[f"{n}-{s}" for n, s in CUSTOM_CASES])
def test_custom_plans_of_the_hot_path_use_indexes_at_100k_rows(conn, backlog, name, subscription_id):
    check_plan(conn, backlog, name, subscription_id, "force_custom_plan")


@pytest.mark.parametrize("name", HOT_PATH)
def test_generic_plans_of_the_hot_path_use_indexes_at_100k_rows(conn, backlog, name):
    # A generic plan does not depend on the values, so one subscription stands for all.
    check_plan(conn, backlog, name, HOT, "force_generic_plan")


def message_reads(node: dict) -> list[str]:
    """How a plan reads subscription_messages, read by read: the index's name (with "range" when
    its condition names the subscription), or the node type."""
    found = []
    read = None
    if node.get("Relation Name") == "subscription_messages" and node["Node Type"] != "Bitmap Heap Scan":
        read = node.get("Index Name") or node["Node Type"]
    elif node["Node Type"] == "Bitmap Index Scan" and node["Index Name"].startswith("ix_subscription"):
        read = node["Index Name"]
    if read is not None:
        found.append(f"{read} range" if "subscription_id =" in node.get("Index Cond", "") else read)
    for child in node.get("Plans", ()):
        found.extend(message_reads(child))
    return found


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("subscription_id", [COLD, QUIET])
def test_every_count_of_the_metrics_reads_the_claim_index(conn, backlog, subscription_id, plan_cache_mode):
    # available, delayed, delivered, dlq: each count a range of the claim index, delayed included
    # (its delivery_attempts = 0 is a filter on the few rows due later, not a reason to scan).
    statement, params = metrics_statement(backlog, subscription_id)
    plan, text = explain_prepared(conn, statement, params, plan_cache_mode)
    reads = message_reads(plan)
    assert len(reads) >= 5 and set(reads) == {"ix_subscription_messages_claim range"}, text


def test_plan_check_catches_a_claim_without_its_index(conn, backlog):
    # The check of the check: the same claim, with its index dropped, fails it.
    conn.execute("SET LOCAL lock_timeout = '5s'")
    conn.execute("DROP INDEX ix_subscription_messages_claim")  # rolled back by the conn fixture
    with pytest.raises(AssertionError, match="reads subscription_messages with a sequential scan"):
        check_plan(conn, backlog, "claim", HOT, "force_custom_plan")


# --- 2. Every state of the statistics -----------------------------------------------------------

TARGET = "burst"  # the subscription whose consumers the statements serve
BATCH = 100  # ids per statement, as a consumer's batch
CONSUMERS = 8  # each holds a batch: the subscription has 800 deliveries out
BURST = 100_000  # what arrives for TARGET in the states where it arrives after an ANALYZE
PUBLISH_CHUNK = 10_000
VERSIONS = 3  # of a dead letter here: published, claimed, nacked


@dataclass
class PlanState:
    engine: sa.Engine
    url: str
    delivered: list[str]  # delivered ids of TARGET, CONSUMERS batches
    dead: list[str]  # dead-lettered ids of TARGET


def create_subscriptions(engine: sa.Engine, *names: str) -> None:
    """A topic of each name with one subscription of the same name."""
    with engine.begin() as conn:
        for name in names:
            topics.create_topic(conn, name)
            subscriptions.create_subscription(conn, name, name, None, 1, 5, 300, 60)


def publish(engine: sa.Engine, topic_id: str, count: int) -> None:
    for start in range(0, count, PUBLISH_CHUNK):
        payloads = json.dumps([{"n": n} for n in range(start, min(count, start + PUBLISH_CHUNK))])
        with engine.begin() as conn:
            messages.publish(conn, topic_id, payloads)


def analyze(engine: sa.Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE subscription_messages"))
        # In a transaction that rolls back, ANALYZE would leave no statistics behind.
        analyzed = "SELECT reltuples >= 0 FROM pg_class WHERE relname = 'subscription_messages'"
        assert conn.execute(sa.text(analyzed)).scalar()


def drain(engine: sa.Engine, subscription_id: str) -> None:
    with engine.begin() as conn:
        while rows := messages.consume(conn, subscription_id, "drainer", 10_000):
            messages.ack_current(conn, subscription_id, [row[0] for row in rows])


def no_statistics_yet(engine: sa.Engine) -> None:
    """A new database: nothing analyzed when the burst comes."""
    create_subscriptions(engine, TARGET)
    publish(engine, TARGET, BURST)


def statistics_of_other_subscriptions(engine: sa.Engine) -> None:
    """Earlier subscriptions were analyzed, then deleted; the new one is not in the statistics."""
    create_subscriptions(engine, "earlier-1", "earlier-2", "earlier-3", TARGET)
    for name in ("earlier-1", "earlier-2", "earlier-3"):
        publish(engine, name, BURST)
    analyze(engine)
    with engine.begin() as conn:
        for name in ("earlier-1", "earlier-2", "earlier-3"):
            topics.delete_topic(conn, name)
    publish(engine, TARGET, BURST)


def analyzed_empty_then_filled(engine: sa.Engine) -> None:
    create_subscriptions(engine, TARGET)
    analyze(engine)
    publish(engine, TARGET, BURST)


def analyzed_full_then_drained(engine: sa.Engine) -> None:
    create_subscriptions(engine, TARGET)
    publish(engine, TARGET, BURST)
    analyze(engine)
    drain(engine, TARGET)
    publish(engine, TARGET, 2_000)


THOUSAND = [f"other-{n:03}" for n in range(999)]


def one_of_a_thousand_holds_most(engine: sa.Engine) -> None:
    create_subscriptions(engine, *THOUSAND, TARGET)
    for name in THOUSAND:
        publish(engine, name, 20)
    publish(engine, TARGET, BURST)
    analyze(engine)


def an_uncommon_one_of_a_thousand_bursts(engine: sa.Engine) -> None:
    create_subscriptions(engine, *THOUSAND, TARGET)
    for name in THOUSAND:
        publish(engine, name, 100)
    analyze(engine)
    publish(engine, TARGET, BURST)


STATES: dict[str, Callable[[sa.Engine], None]] = {
    "no_statistics_yet": no_statistics_yet,
    "statistics_of_other_subscriptions": statistics_of_other_subscriptions,
    "analyzed_empty_then_filled": analyzed_empty_then_filled,
    "analyzed_full_then_drained": analyzed_full_then_drained,
    "one_of_a_thousand_holds_most": one_of_a_thousand_holds_most,
    "an_uncommon_one_of_a_thousand_bursts": an_uncommon_one_of_a_thousand_bursts,
}


LEADING_COLUMNS = """
SELECT index.relname, attribute.attname
FROM pg_index
JOIN pg_class AS index ON index.oid = pg_index.indexrelid
JOIN pg_attribute AS attribute ON attribute.attrelid = pg_index.indrelid
                              AND attribute.attnum = pg_index.indkey[0]
WHERE pg_index.indrelid = 'subscription_messages'::regclass
"""


def test_only_the_claim_index_leads_with_the_subscription(template):
    """When the statistics estimate a subscription at one row (a new one, the table analyzed with
    no live rows), every index led by subscription_id costs about the same for a claim, and the
    B-trees' heights decide: an index with anything but (state, available_at, seq) after it reads
    the whole backlog and sorts it. The states below cannot pin the heights, so this checks that
    no such index exists (migration 0006)."""
    with psycopg.connect(libpq_url(template)) as conn:
        leading = dict(conn.execute(LEADING_COLUMNS).fetchall())
    led_by_subscription = sorted(name for name, column in leading.items() if column == "subscription_id")
    assert led_by_subscription == ["ix_subscription_messages_claim"], leading


@pytest.fixture(scope="module")
def template(server_url: str) -> Iterator[str]:
    """A migrated database with nothing in it, for each state to start from."""
    with new_database(server_url) as url:
        yield url


@contextmanager
def unvacuumed(server_url: str, template: str, *alter: str) -> Iterator[tuple[str, sa.Engine]]:
    """A new database's URL and an app's engine on it, with autovacuum off for the messages table
    (so that nothing corrects the statistics behind a test's back), after these further ALTERs."""
    with new_database(server_url, template) as url:
        app = create_app({"DATABASE_URL": url})
        engine = db.get_engine(app)
        try:
            with engine.begin() as conn:
                for change in ("SET (autovacuum_enabled = off)", *alter):
                    conn.execute(sa.text(f"ALTER TABLE subscription_messages {change}"))
            yield url, engine
        finally:
            db.dispose(app)


@pytest.fixture(scope="module", params=STATES)
def plan_state(request, server_url: str, template: str) -> Iterator[PlanState]:
    """A database in the state, with TARGET's consumers holding batches and a few dead letters.
    Autovacuum is off for the table, and so is the analysis of a publish that doubles it
    (migration 0009), so that nothing corrects the statistics behind our back."""
    with unvacuumed(server_url, template, "DISABLE TRIGGER replan_on_growth") as (url, engine):
        STATES[request.param](engine)
        with engine.begin() as conn:  # one attempt each: a nack dead-letters
            batches = [messages.consume(conn, TARGET, f"c{n}", BATCH) for n in range(CONSUMERS + 1)]
            dead = [row[0] for row in batches.pop()]
            messages.nack(conn, TARGET, [(id, None) for id in dead])
        yield PlanState(engine, libpq_url(url), [row[0] for batch in batches for row in batch], dead)


# Run with EXPLAIN ANALYZE: no token (auth off), so that the statements do their work.
NO_TOKEN = messages.token_params(None)


def by_id(state: PlanState, ids: list[str], **params) -> dict:
    return {"subscription_id": TARGET, "ids": messages.uuid_array(ids), "leases": None, **NO_TOKEN, **params}


FUTURE = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)  # `before` that every message matches


def chunk(state: int, **params) -> dict:
    """The parameters of an operator's first chunk of BATCH messages of TARGET in a state."""
    after_at, after_seq = operations.FIRST_KEY
    return {
        "subscription_id": TARGET,
        "state": state,
        "after_at": after_at,
        "after_seq": after_seq,
        "chunk": BATCH,
        **params,
    }


# name: (statement, parameters, whether it looks messages up by id)
LOOKUPS: dict[str, Callable[[PlanState], tuple[sa.TextClause, dict, bool]]] = {
    "claim": lambda s: (
        messages.CLAIM,
        {"subscription_id": TARGET, "consumer_id": "c", "batch_size": BATCH, **NO_TOKEN},
        True,
    ),
    "ack": lambda s: (messages.ACK, by_id(s, s.delivered[:BATCH]), True),
    "ack_current": lambda s: (messages.ACK_CURRENT, by_id(s, s.delivered[:BATCH]), True),
    "nack": lambda s: (messages.NACK, by_id(s, s.delivered[:BATCH], delay_seconds=None), True),
    "extend": lambda s: (messages.EXTEND, by_id(s, s.delivered[:BATCH], seconds=None), True),
    "reprocess": lambda s: (messages.REPROCESS, by_id(s, s.dead), True),
    "list_dlq": lambda s: (
        messages.LIST_DLQ,
        {"subscription_id": TARGET, "offset": 0, "limit": BATCH},
        False,
    ),
    "dead_letter": lambda s: (messages.DEAD_LETTER, by_id(s, s.delivered[:BATCH]), True),
    # The operators' chunks (pubsub.operations), a chunk of BATCH each, from the start of a range.
    "purge_available": lambda s: (operations.PURGE_BACKLOG, chunk(AVAILABLE, before=None), True),
    "purge_delivered": lambda s: (operations.PURGE_BACKLOG, chunk(DELIVERED, before=None), True),
    "purge_before": lambda s: (operations.PURGE_BACKLOG, chunk(AVAILABLE, before=FUTURE), True),
    "purge_dlq": lambda s: (operations.PURGE_DLQ, chunk(DLQ), True),
    "purge_dlq_ids": lambda s: (operations.PURGE_DLQ_IDS, by_id(s, s.dead), True),
    "redrive": lambda s: (operations.REDRIVE, chunk(DLQ), True),
}


def scans(node: dict, table: str) -> Iterator[dict]:
    """The nodes of a plan that read `table` or one of its indexes (a Bitmap Index Scan names
    only its index)."""
    index = node.get("Index Name", "")
    if node.get("Relation Name") == table or index == f"pk_{table}" or index.startswith(f"ix_{table}_"):
        yield node
    for child in node.get("Plans", ()):
        yield from scans(child, table)


def rows_read(node: dict) -> float:
    """Rows a scan node read: those it returned and those its filters removed, over every loop."""
    removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
    return (node["Actual Rows"] + removed) * node["Actual Loops"]


def describe(node: dict) -> str:
    return (
        f"{node['Node Type']} {node.get('Index Name', '')} cond={node.get('Index Cond')} "
        f"filter={node.get('Filter')} estimated={node['Plan Rows']} read={rows_read(node):.0f}"
    )


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("name", LOOKUPS)
def test_statements_read_only_the_rows_they_touch_whatever_the_statistics(plan_state, name, plan_cache_mode):
    statement, params, by_key = LOOKUPS[name](plan_state)
    with psycopg.connect(plan_state.url) as conn:
        plan, _ = explain_prepared(conn, statement, params, plan_cache_mode, analyze=True)
        conn.rollback()
    nodes = list(scans(plan, "subscription_messages"))
    report = "\n".join(map(describe, nodes))
    # A lookup reads its batch: up to VERSIONS index entries a row, as nothing vacuums here. A walk
    # of the subscription's range reads BURST rows, or its CONSUMERS * BATCH deliveries.
    most = max(map(rows_read, nodes))
    assert most <= VERSIONS * BATCH, f"{name} ({plan_cache_mode}) reads too much:\n{report}"
    if by_key:
        lookups = [
            node
            for node in nodes
            if node.get("Index Name") == "pk_subscription_messages"
            and "subscription_id = " in (cond := node.get("Index Cond", ""))
            and " id = " in f" {cond.replace('(', ' ')}"
        ]
        assert lookups, f"{name} ({plan_cache_mode}) looks no id up by its key:\n{report}"


# --- cleanup-acked at 1M log rows ---------------------------------------------------------------

ACK_LOG_ROWS = 1_000_000
EXPIRED_ACK_ROWS = 1_000  # older than the retention: what one cleanup-acked run deletes

FILL_ACK_LOG = sa.text("""
INSERT INTO acked_messages (subscription_id, acked_at, count)
SELECT 'sub-' || n % 50, now() - CASE WHEN n <= :expired THEN interval '2 hours'
                                      ELSE random() * interval '50 minutes' END, 1 + n % 10
FROM generate_series(1, :rows) AS n
""")


@pytest.mark.parametrize("analyzed", [True, False], ids=["analyzed", "never_analyzed"])
def test_cleanup_acked_reads_only_what_it_deletes_at_1m_log_rows(server_url, template, analyzed):
    with new_database(server_url, template) as url, psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("ALTER TABLE acked_messages SET (autovacuum_enabled = off)")
        params = {"expired": EXPIRED_ACK_ROWS, "rows": ACK_LOG_ROWS}
        conn.execute(FILL_ACK_LOG.compile(dialect=psycopg_dialect.dialect()).string, params)
        if analyzed:
            conn.execute("ANALYZE acked_messages")
        with conn.transaction(force_rollback=True):  # as cleanup-acked runs it: once, a custom plan
            plan, _ = explain_prepared(
                conn, messages.DELETE_ACKED, {"older_than": 3600}, "force_custom_plan", analyze=True
            )
    nodes = list(scans(plan, "acked_messages"))
    report = "\n".join(map(describe, nodes))
    assert any(node.get("Index Name") == "ix_acked_messages_acked_at" for node in nodes), report
    assert max(map(rows_read, nodes)) == EXPIRED_ACK_ROWS, report


# --- The operators' chunks walk on from the last one -------------------------------------------

PURGE_CHUNK = 100
PURGE_CHUNKS_DONE = 50


def buffers(node: dict) -> int:
    return node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0)


def purge_chunk_after(key: tuple) -> dict:
    return {**chunk(AVAILABLE, before=None), "chunk": PURGE_CHUNK, "after_at": key[0], "after_seq": key[1]}


def test_a_purge_chunk_starts_after_the_last_one_not_over_the_rows_deleted_before_it(server_url, template):
    """Each chunk of a purge begins at the last key of the chunk before it: the index entries of
    the rows already deleted (dead until a vacuum) are never walked again, so the 500th chunk of a
    million-row purge costs what the first did. The same chunk from the start of the range walks
    them all."""
    with unvacuumed(server_url, template) as (url, engine):
        create_subscriptions(engine, TARGET)
        publish(engine, TARGET, PURGE_CHUNK * (PURGE_CHUNKS_DONE + 10))
        after = operations.FIRST_KEY
        with engine.connect() as conn:
            for _ in range(PURGE_CHUNKS_DONE):  # each committed on its own, as the purge runs them
                row = conn.execute(operations.PURGE_BACKLOG, purge_chunk_after(after)).one()
                conn.commit()
                after = (row.available_at, row.seq)
        with psycopg.connect(libpq_url(url)) as conn:
            costs = {}
            for start, key in (("from the last key", after), ("from the start", operations.FIRST_KEY)):
                params = purge_chunk_after(key)
                compiled = operations.PURGE_BACKLOG.compile(dialect=NUMBERED)
                values = [params[name] for name in compiled.positiontup]
                types = ", ".join(driver_type(conn.adapters, value) for value in values)
                conn.execute(f"PREPARE chunk ({types}) AS {compiled.string}")
                execute = sql.SQL("EXECUTE chunk ({})").format(sql.SQL(", ").join(map(sql.Literal, values)))
                [[tree]] = conn.execute(
                    sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + execute
                ).fetchone()
                conn.execute("DEALLOCATE chunk")
                conn.rollback()
                walks = [
                    node
                    for node in scans(tree["Plan"], "subscription_messages")
                    if node.get("Index Name") == "ix_subscription_messages_claim"
                ]
                costs[start] = sum(map(buffers, walks))
    assert costs["from the start"] > 3 * costs["from the last key"], costs


# --- 3. A generic plan made while the table was tiny, used when it is large ----------------------

# psycopg prepares a statement on a connection at its 5th run; PostgreSQL then plans it for its
# values five times more, and from then on keeps a generic plan if that costs about as much. On a
# tiny table every plan is cheap, so a generic plan may be kept, and it stays cached on the pooled
# connection while the table grows, until something invalidates it. It must still look the ids up
# by their key when a new subscription has 10,000 messages.
TINY = "tiny"  # the subscription the connection's plans are cached on, a few messages at a time
NEW = "new"  # created afterwards on the same topic, when the burst arrives
TINY_ROUNDS = 12  # each statement runs at least this often on the tiny table: 5 to prepare, 5 custom
LARGE_BURST = 10_000
SETTLED = 20  # ids per ack, nack or extend


def index_reads(conn: sa.Connection) -> dict[str, int]:
    """Rows read so far in this transaction from subscription_messages sequentially, and entries
    read from each of its indexes (the backend's counters not yet reported)."""
    driver = conn.connection.driver_connection
    [seq_tup_read] = driver.execute(
        "SELECT seq_tup_read FROM pg_stat_xact_user_tables WHERE relname = 'subscription_messages'"
    ).fetchone()
    indexes = driver.execute(
        "SELECT indexrelid::regclass::text, pg_stat_get_xact_tuples_returned(indexrelid) FROM pg_index"
        " WHERE indrelid = 'subscription_messages'::regclass"
    ).fetchall()
    return {"seq_tup_read": seq_tup_read, **dict(indexes)}


def reads_on(conn: sa.Connection, action: Callable[[sa.Connection], object]) -> tuple[object, dict[str, int]]:
    """What `action(conn)` returns, and what it read, in a transaction of its own."""
    with conn.begin():
        before = index_reads(conn)
        result = action(conn)
        after = index_reads(conn)
    return result, {name: after[name] - before[name] for name in after}


def refs_of(rows) -> list[tuple[str, None]]:
    return [(row[0], None) for row in rows]


def tiny_round(conn: sa.Connection, engine: sa.Engine) -> None:
    """A consumer's round on the tiny table: claim, extend, nack, claim again, ack (both forms)."""
    publish(engine, TINY, 4)
    with conn.begin():
        rows = messages.consume(conn, TINY, "c", BATCH)
        messages.extend(conn, TINY, refs_of(rows), 30)
        messages.nack(conn, TINY, refs_of(rows), 0)
        rows = messages.consume(conn, TINY, "c", BATCH)
        messages.ack(conn, TINY, refs_of(rows[:2]))
        messages.ack_current(conn, TINY, [row[0] for row in rows[2:]])


CACHED = {
    "claim": messages.CLAIM,
    "extend": messages.EXTEND,
    "ack": messages.ACK,
    "ack_current": messages.ACK_CURRENT,
    "nack": messages.NACK,
}


def server_text(statement: sa.TextClause) -> str:
    """The statement as psycopg prepares it: each %(name)s turned into $n, in order of first use."""
    numbers: dict[str, str] = {}
    return re.sub(
        r"%\((\w+)\)s",
        lambda match: numbers.setdefault(match[1], f"${len(numbers) + 1}"),
        messages.driver_sql(statement),
    )


def plans_cached(conn: sa.Connection) -> dict[str, tuple[int, int]]:
    """(generic plans, custom plans) of each hot statement prepared on this connection."""
    rows = conn.connection.driver_connection.execute(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
    ).fetchall()
    by_text = {statement: (generic, custom) for statement, generic, custom in rows}
    return {name: by_text.get(server_text(statement), (0, 0)) for name, statement in CACHED.items()}


@pytest.mark.parametrize("analyzed", [True, False], ids=["analyzed_tiny", "never_analyzed"])
def test_a_plan_cached_on_a_tiny_table_is_not_used_when_it_is_large(server_url, template, analyzed):
    """The table analyzed with a few rows, as autovacuum does early on (or never analyzed); a
    pooled connection runs a consumer's rounds on it (claim, extend, nack, ack) until it keeps
    generic plans; then a new subscription gets 10,000 messages, and the same connection claims
    and settles a batch of them. Autovacuum is off: it would analyze the table a minute later."""
    with unvacuumed(server_url, template) as (url, engine):
        create_subscriptions(engine, TINY)
        publish(engine, TINY, 4)
        if analyzed:
            analyze(engine)
        with engine.connect() as conn:  # one pooled connection throughout, as a worker's
            for _ in range(TINY_ROUNDS):
                tiny_round(conn, engine)
            with conn.begin():
                cached = plans_cached(conn)
            with engine.begin() as other:
                subscriptions.create_subscription(other, NEW, TINY, None, 5, 5, 300, 60)
            publish(engine, TINY, LARGE_BURST)
            reads = {}
            claimed, reads["claim"] = reads_on(conn, lambda c: messages.consume(c, NEW, "c", BATCH))
            refs = refs_of(claimed)
            _, reads["extend"] = reads_on(conn, lambda c: messages.extend(c, NEW, refs[:SETTLED], 30))
            _, reads["ack"] = reads_on(conn, lambda c: messages.ack(c, NEW, refs[:SETTLED]))
            ids = [id for id, _ in refs[SETTLED : 2 * SETTLED]]
            _, reads["ack_current"] = reads_on(conn, lambda c: messages.ack_current(c, NEW, ids))
            nacked = refs[2 * SETTLED : 3 * SETTLED]
            _, reads["nack"] = reads_on(conn, lambda c: messages.nack(c, NEW, nacked))
            with conn.begin():
                cached_after = plans_cached(conn)
    report = f"(generic, custom) plans before the burst {cached}, after {cached_after}; reads {reads}"
    # Before the burst, the connection had switched to generic plans: every statement's on the
    # analyzed table; never analyzed (planned as 10 pages at least), the claim's.
    assert all(generic > 0 for generic, _ in (cached.values() if analyzed else [cached["claim"]])), report
    assert len(claimed) == BATCH, report
    # A claim reads the claim index's entries of its batch (and of the empty range of expired
    # leases) and each message once by key; ack, nack and extend read their ids by key, and only
    # by key: nothing like the 10,000 copies of either subscription.
    for name, touched in {"claim": BATCH, **dict.fromkeys(CACHED.keys() - {"claim"}, SETTLED)}.items():
        assert reads[name]["seq_tup_read"] == 0, f"{name}: {report}"
        assert reads[name]["ix_subscription_messages_claim"] <= (BATCH + 10 if name == "claim" else 0), (
            f"{name}: {report}"
        )
        assert reads[name]["pk_subscription_messages"] <= 2 * touched + 10, f"{name}: {report}"
