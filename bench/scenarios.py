"""The scenarios: each sets up its topic through the API, runs the load for the window, checks
through the API that nothing was lost or acked twice, deletes its topic and returns a result."""

import http.client
import itertools
import os
import sys
import time
from array import array
from collections.abc import Callable
from urllib.parse import urlsplit

import psutil
import sqlalchemy as sa

from bench import longpoll as lp
from bench.app import AppError, request_json, tree_cpu_seconds
from bench.load import SEQ_BITS, Outcome, Tally, run_load, wait_until_quiet
from pubsub.tables import acked_messages

FANOUT_SUBSCRIPTIONS = 10
# Three filtered subscriptions of the ten; payload countries cycle through load.COUNTRIES.
FANOUT_FILTERS = ({"country": ["BR"]}, {"country": ["US", "DE"]}, {"country": ["JP", "IN", "XX"]})
PREFILL_BATCH = 1000  # the API's largest publish batch
PREFILL_CLIENTS_PER_PROC = 3
HISTORY_SPAN_SECONDS = 1800  # acked history spread over the last half hour (within cleanup's retention)
LONG_POLL_MAX_WAITERS = 2000  # the app's default: long polls that may wait at once in a worker
ROUND_FLOOR = 0.7  # rounds: no round's consume+ack throughput below this share of the first's
# ... unless PostgreSQL's CPU per message stayed within 1/ROUND_FLOOR of the first round's: a
# collapsed plan costs PostgreSQL several times the work per message, while a neighbour's load
# slows a short window without it (the smoke's rounds last 0.2-0.5 s).
ROUND_BOUND = 600.0  # rounds: seconds a round's consume may take (100k at a collapsed 1,200/s: 83 s)
COLD_BOUND = 600.0  # consume_ack_cold: seconds its drain may take
# consume_ack_cold: what may run between the fill and the consume, for A/B runs (--cold-settle).
COLD_SETTLE = {
    "none": (),
    "analyze": ("ANALYZE subscription_messages",),
    "vacuum": ("VACUUM subscription_messages",),
    "vacuum-analyze": ("VACUUM ANALYZE subscription_messages",),
}
# What PostgreSQL says about subscription_messages around a window: did autovacuum or auto-analyze
# run on it (finished in the window, or still at work at its end), and what was left to do; and
# how many sessions the database has seen: new ones in the window are the app's pool overflow
# (a backend forked, and every statement planned afresh, per connection).
TABLE_ACTIVITY = """
SELECT autovacuum_count, autoanalyze_count, n_live_tup, n_dead_tup, n_mod_since_analyze,
       n_ins_since_vacuum, last_autovacuum, last_autoanalyze, now() AS at,
       (SELECT sessions FROM pg_stat_database WHERE datname = current_database()) AS sessions,
       (SELECT count(*) FROM pg_stat_activity
        WHERE backend_type = 'autovacuum worker'
          AND position('subscription_messages' in query) > 0) AS workers
FROM pg_stat_user_tables WHERE relname = 'subscription_messages'
"""
# What issue 14 ran between rounds, less its `DELETE FROM topics`: the round's topic is already
# deleted through the API, and with --database-url that statement would delete everyone's topics.
RESET = (
    "VACUUM ANALYZE subscription_messages",
    "VACUUM ANALYZE subscriptions",
    "VACUUM ANALYZE topics",
    "CHECKPOINT",
)


class Run:
    """One mode (http or raw) against one running app: the helpers every scenario uses."""

    _names = itertools.count(1)
    _clients = itertools.count(1)

    def __init__(self, app, args, mode: str, token: str | None):
        self.app, self.args, self.mode, self.token = app, args, mode, token
        self.prefix = f"bench{os.getpid()}"
        self.notes: list[str] = []

    # -- the API, for setup and checks (in both modes) --

    def api(self, method: str, path: str, body=None, expect: int = 200):
        status, data = request_json(self.app.url, method, path, body, self.token)
        if status != expect:
            raise AppError(f"{method} {path} answered {status}: {data}")
        return data

    def new_topic(self) -> str:
        topic = f"{self.prefix}-{next(self._names)}"
        self.api("POST", "/topics", {"id": topic}, expect=201)
        return topic

    def new_subscription(self, topic: str, filter: dict | None = None, **fields) -> str:
        subscription = f"{topic}-s{next(self._names)}"
        body = {"id": subscription, "topic_id": topic, "filter": filter, **fields}
        self.api("POST", "/subscriptions", body, expect=201)
        return subscription

    def metrics(self, subscription: str) -> dict:
        return self.api("GET", f"/subscriptions/{subscription}/metrics")

    def drop(self, topic: str) -> None:
        self.api("DELETE", f"/topics/{topic}", expect=204)

    # -- the database, when it can be reached (embedded, or --database-url) --

    def engine(self) -> sa.Engine | None:
        url = self.app.database_url
        return sa.create_engine(url, poolclass=sa.NullPool) if url else None

    def settle(self) -> None:
        """VACUUM ANALYZE, so each window starts with fresh statistics and no earlier scenario's
        dead rows for autovacuum to chew on while we measure."""
        engine = self.engine()
        if engine is None:
            return
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE subscription_messages, acked_messages")
        engine.dispose()

    # -- load --

    def target(self) -> dict:
        if self.mode == "raw":
            return {"mode": "raw", "database_url": self.app.database_url}
        return {"mode": "http", "url": self.app.url, "token": self.token}

    def cpu_meters(self) -> dict[str, Callable]:
        def meter(roots: list[psutil.Process]):
            return (lambda: tree_cpu_seconds(roots)) if roots else (lambda: None)

        return {"app": meter(self.app.app_roots), "postgres": meter(self.app.pg_roots)}

    def publisher(self, topic: str, batch: int, **extra) -> dict:
        spec = {"role": "publish", "index": next(self._clients), "topic": topic, "batch": batch}
        return {**spec, "pad": "x" * self.args.payload_pad, **extra}

    def consumer(self, subscription: str, batch: int, **extra) -> dict:
        return {
            "role": "consume",
            "index": next(self._clients),
            "subscription": subscription,
            "batch": batch,
            **extra,
        }

    def wait_quiet(self) -> None:
        if self.args.wait_quiet:
            waited = wait_until_quiet(self.args.wait_quiet)
            self.notes.append(f"waited {waited:.0f}s for a quiet machine")

    def load(
        self, specs: list[dict], drain: float = 0.0, duration: float | None = None, quiet: bool = True
    ) -> Outcome:
        """Run the load; first wait for a quiet machine (--wait-quiet), unless quiet=False: the
        caller waited already."""
        duration = self.args.duration if duration is None else duration
        if quiet:
            self.wait_quiet()
        return run_load(self.target(), specs, self.args.procs, duration, drain, self.cpu_meters())

    def prefill(
        self, topic: str, count: int, batch: int = PREFILL_BATCH, clients: int | None = None, **extra
    ) -> dict[int, int]:
        """Publish `count` messages in batches of `batch` by `clients` publishers (over HTTP, or
        the raw statement in raw mode); returns messages published by client index, to check
        consumed keys against."""
        if count <= 0:
            return {}
        clients = clients or max(1, self.args.procs * PREFILL_CLIENTS_PER_PROC)
        shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
        specs = [self.publisher(topic, batch, messages=share, **extra) for share in shares if share]
        started = time.monotonic()
        # Bounded: generous for the sizes used here, yet a hung server cannot stall forever.
        outcome = run_load(self.target(), specs, self.args.procs, 600.0, 0.0, {})
        tally = outcome.tally
        if tally.errors or tally.published != count:
            raise AppError(f"prefill published {tally.published} of {count}: {tally.error_samples}")
        self.notes.append(f"prefilled {count} in {time.monotonic() - started:.1f}s")
        return tally.published_by_client


# -- checks --


def check(name: str, ok: bool, detail: str = "") -> dict:
    return {"check": name, "ok": bool(ok), "detail": detail}


def equal(name: str, actual, expected) -> dict:
    return check(
        name,
        actual == expected,
        f"{actual} == {expected}" if actual == expected else f"{actual} != {expected}",
    )


def no_errors(tally: Tally) -> dict:
    return check("no request failed", tally.errors == 0, "; ".join(tally.error_samples))


def keys_check(tally: Tally, published_by_client: dict[int, int]) -> list[dict]:
    """Every consumed message was published, and none was consumed (acked) twice."""
    keys = tally.keys
    unique = len(set(keys))
    mask = (1 << SEQ_BITS) - 1
    unknown = sum(1 for key in keys if (key & mask) >= published_by_client.get(key >> SEQ_BITS, 0))
    return [
        equal("no message consumed twice (unique keys)", len(keys) - unique, 0),
        equal("every consumed message was published", unknown, 0),
    ]


# -- scenarios --


def publish_scenario(run: Run, batch: int) -> tuple[Outcome, int, list[dict], dict]:
    topic = run.new_topic()
    subscription = run.new_subscription(topic)
    run.settle()
    outcome = run.load([run.publisher(topic, batch) for _ in range(run.args.concurrency)])
    t = outcome.tally
    m = run.metrics(subscription)
    checks = [
        no_errors(t),
        equal("available == published", m["available"], t.published),
        equal("delivered == 0", m["delivered"], 0),
    ]
    run.drop(topic)
    return outcome, t.published, checks, {}


def publish_batch(run: Run):
    """C publishers, each posting batches of B messages."""
    return publish_scenario(run, run.args.batch)


def publish_single(run: Run):
    """C publishers, one message per request."""
    return publish_scenario(run, 1)


def consume_scenario(run: Run, available: int, acked_history: int, keys: int | None = None):
    topic = run.new_topic()
    subscription = run.new_subscription(topic, ordering_key="customer" if keys else None)
    if acked_history:
        add_acked_history(run, subscription, acked_history, run.args.backlog_ack_batch or run.args.batch)
    published = run.prefill(topic, available, keys=keys)
    run.settle()
    specs = [
        run.consumer(subscription, run.args.batch, until_empty=True) for _ in range(run.args.concurrency)
    ]
    before = table_activity(run)
    outcome = run.load(specs)
    after = table_activity(run)
    t = outcome.tally
    m = run.metrics(subscription)
    consumed = len(t.keys)
    checks = [
        no_errors(t),
        check("consumed some messages", consumed > 0, str(consumed)),
        *keys_check(t, published),
        equal("delivered == 0 (every claimed message acked)", m["delivered"], 0),
        # Behind an ordering key, what is not consumed yet waits (consume_ack_ordered).
        equal(
            "available + waiting == prefilled - consumed", m["available"] + m["waiting"], available - consumed
        ),
        equal("acked == history + consumed", m["acked"], acked_history + consumed),
    ]
    run.drop(topic)
    extra = {
        **cpu_per_message(outcome, t.consumed),
        **autovacuum_in_window(before, after, raw_clients(run, specs)),
    }
    if consumed == available:
        extra["note"] = f"queue drained after {outcome.elapsed:.1f}s"
    return outcome, t.consumed, checks, extra


def consume_ack(run: Run):
    """A pre-filled subscription; C consumers claim B, ack them, repeat."""
    return consume_scenario(run, run.args.prefill, 0)


def consume_ack_ordered(run: Run):
    """consume_ack on a subscription with an ordering key, the payloads spread over
    --ordering-keys values (issue 16: with 1,000, within 30% of consume_ack)."""
    return consume_scenario(run, run.args.prefill, 0, run.args.ordering_keys)


def consume_ack_cold(run: Run):
    """consume_ack as a deployment drives it (issue 14): the queue filled through the API by
    --cold-publishers publishers in batches of --cold-fill-batch, then drained at once, with no
    VACUUM, no ANALYZE and no pause in between (unless --cold-settle asks for one)."""
    count = run.args.cold_messages
    # Before the fill: the window then holds no earlier scenario's dead rows (the yardstick runs on
    # a fresh database), and its statistics describe none of this subscription's rows.
    run.settle()
    run.wait_quiet()
    topic = run.new_topic()
    subscription = run.new_subscription(topic)
    started = time.monotonic()
    published = run.prefill(topic, count, run.args.cold_fill_batch, run.args.cold_publishers)
    fill_seconds = time.monotonic() - started
    run_statements(run, COLD_SETTLE[run.args.cold_settle])
    before = table_activity(run)
    specs = [
        run.consumer(subscription, run.args.batch, until_empty=True) for _ in range(run.args.concurrency)
    ]
    outcome = run.load(specs, duration=COLD_BOUND, quiet=False)
    after = table_activity(run)
    t = outcome.tally
    m = run.metrics(subscription)
    checks = [
        no_errors(t),
        equal("consumed == published (drained)", len(t.keys), count),
        *keys_check(t, published),
        equal("available == 0", m["available"], 0),
        equal("delivered == 0", m["delivered"], 0),
        equal("acked == published", m["acked"], count),
    ]
    run.drop(topic)
    extra = {
        **cpu_per_message(outcome, t.consumed),
        "fill_msgs_per_s": count / fill_seconds,
        "settle": run.args.cold_settle,
        **autovacuum_in_window(before, after, raw_clients(run, specs)),
    }
    return outcome, t.consumed, checks, extra


def run_statements(run: Run, statements) -> None:
    engine = run.engine() if statements else None
    if engine is None:
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def table_activity(run: Run) -> dict | None:
    """subscription_messages in pg_stat_user_tables (TABLE_ACTIVITY); None without the database."""
    engine = run.engine()
    if engine is None:
        return None
    with engine.connect() as conn:
        row = conn.exec_driver_sql(TABLE_ACTIVITY).mappings().one()
    engine.dispose()
    return dict(row)


def autovacuum_in_window(before: dict | None, after: dict | None, own_sessions: int = 0) -> dict:
    """What autovacuum did to subscription_messages between two table_activity() readings, and
    the database's new sessions other than the load generator's own (raw mode's clients)."""
    if before is None or after is None:
        return {}
    return {
        "autovacuums": after["autovacuum_count"] - before["autovacuum_count"],
        "autoanalyzes": after["autoanalyze_count"] - before["autoanalyze_count"],
        "autovacuum_workers_at_start": before["workers"],
        "autovacuum_workers_at_end": after["workers"],
        "dead_rows_at_end": after["n_dead_tup"],
        # Less the one that took the second reading.
        "new_sessions": after["sessions"] - before["sessions"] - 1 - own_sessions,
    }


def raw_clients(run: Run, specs: list[dict]) -> int:
    """Database sessions the load generator itself opens for a window (one per raw client)."""
    return len(specs) if run.mode == "raw" else 0


def cpu_per_message(outcome: Outcome, messages: int) -> dict:
    """The app's and PostgreSQL's CPU per message in µs (when measured)."""
    app, pg = (per_message_us(outcome.cpu.get(name), messages) for name in ("app", "postgres"))
    pairs = (("app_us_per_msg", app), ("pg_us_per_msg", pg))
    return {key: value for key, value in pairs if value is not None}


def backlog(run: Run):
    """consume_ack on a subscription that already acked many messages (its acked_messages log)."""
    if run.app.database_url is None:
        raise SkipScenario("needs the database (--database-url) to write the acked history")
    return consume_scenario(run, run.args.backlog_available, run.args.backlog_acked)


def add_acked_history(run: Run, subscription: str, acked: int, batch: int) -> None:
    """What the app leaves in acked_messages after acking `acked` messages in batches of `batch`:
    one row per ack statement (see pubsub/tables.py), spread over the last half hour."""
    rows, remainder = divmod(acked, batch)
    engine = run.engine()
    with engine.begin() as conn:
        for count, n in ((batch, rows), (remainder, 1 if remainder else 0)):
            if not n:
                continue
            step = sa.func.generate_series(1, n).column_valued("step")
            age = sa.func.make_interval(0, 0, 0, 0, 0, 0, step * (HISTORY_SPAN_SECONDS / n))
            history = sa.select(sa.literal(subscription, sa.Text), sa.func.now() - age, sa.literal(count))
            conn.execute(
                acked_messages.insert().from_select(["subscription_id", "acked_at", "count"], history)
            )
    engine.dispose()
    run.notes.append(f"acked history: {acked} messages as {rows + bool(remainder)} rows")


def rounds(run: Run):
    """Publish, consume+ack until empty, reset the statistics; --rounds times, each round on a new
    topic and subscription. Fails if a round's consume+ack falls below ROUND_FLOOR of the first's."""
    if run.app.database_url is None:
        raise SkipScenario("needs the database (--database-url) to reset it between rounds")
    count = run.args.round_messages
    outcomes, rates, checks, published = [], [], [], {}
    pg_cost, others = [], []  # PostgreSQL's CPU per message: a collapsed plan shows there first
    for number in range(1, run.args.rounds + 1):
        # Before the publish, not between it and the consume: autovacuum would have time to
        # ANALYZE the new rows, and the round would no longer start on stale statistics.
        run.wait_quiet()
        topic = run.new_topic()
        subscription = run.new_subscription(topic)
        published |= run.prefill(topic, count, run.args.batch)
        if number == 1:
            # The baseline: statistics that describe this subscription, as in consume_ack, not
            # whatever the scenarios before this one left. The later rounds get no ANALYZE here:
            # their statistics describe only the earlier rounds' subscriptions (issue 14).
            run.settle()
        specs = [
            run.consumer(subscription, run.args.batch, until_empty=True) for _ in range(run.args.concurrency)
        ]
        outcome = run.load(specs, duration=ROUND_BOUND, quiet=False)
        m = run.metrics(subscription)
        checks += [
            equal(f"round {number}: consumed == published", len(outcome.tally.keys), count),
            equal(f"round {number}: available == 0", m["available"], 0),
            equal(f"round {number}: delivered == 0", m["delivered"], 0),
            equal(f"round {number}: acked == published", m["acked"], count),
        ]
        run.drop(topic)
        reset_statistics(run)
        outcomes.append(outcome)
        rates.append(outcome.tally.consumed / outcome.elapsed)
        pg_cost.append(per_message_us(outcome.cpu["postgres"], outcome.tally.consumed))
        others.append(other_cores(outcome))
        ratio = rates[-1] / rates[0] if rates[0] else 0.0
        if number > 1:
            checks.append(round_check(number, rates, pg_cost))
        print(
            f"[bench]   rounds {run.mode}: round {number}: consume+ack {rates[-1]:,.0f} msgs/s "
            f"({outcome.elapsed:.1f}s), {ratio:.2f} of round 1; PostgreSQL {pg_cost[-1] or 0:.0f} µs/msg, "
            f"other processes {others[-1] or 0:.2f} cores",
            file=sys.stderr,
            flush=True,
        )
    outcome = merged(outcomes)
    # Client indexes never repeat, so the keys of every round can be checked together.
    checks = [no_errors(outcome.tally), *keys_check(outcome.tally, published), *checks]
    extra = {
        "round_msgs_per_s": [round(rate) for rate in rates],
        "round_ratio_to_first": [round(rate / rates[0], 2) if rates[0] else 0.0 for rate in rates],
        "round_pg_us_per_msg": [None if cost is None else round(cost) for cost in pg_cost],
        "round_other_cores": [None if other is None else round(other, 2) for other in others],
    }
    return outcome, outcome.tally.consumed, checks, extra


def round_check(number: int, rates: list[float], pg_cost: list[float | None]) -> dict:
    """The last round's consume+ack against round 1's: below ROUND_FLOOR, it fails if PostgreSQL
    spent more than 1/ROUND_FLOOR of round 1's CPU per message on it, or if that is unknown."""
    ratio = rates[-1] / rates[0] if rates[0] else 0.0
    detail = f"{rates[-1]:,.0f} / {rates[0]:,.0f} msgs/s = {ratio:.2f}"
    cost_ratio = None
    if pg_cost[0] and pg_cost[-1] is not None:
        cost_ratio = pg_cost[-1] / pg_cost[0]
        detail += f"; PostgreSQL {pg_cost[-1]:.0f} / {pg_cost[0]:.0f} µs/msg = {cost_ratio:.2f}"
    cheap = cost_ratio is not None and cost_ratio <= 1 / ROUND_FLOOR
    return check(
        f"round {number}: consume+ack >= {ROUND_FLOOR:.0%} of round 1's, "
        f"or PostgreSQL's CPU per message <= {1 / ROUND_FLOOR:.2f}x round 1's",
        ratio >= ROUND_FLOOR or cheap,
        detail,
    )


def reset_statistics(run: Run) -> None:
    """Issue 14's reset between rounds (RESET): VACUUM ANALYZE the tables, now without the round's
    rows, so the next round's statistics describe only the subscriptions before it."""
    engine = run.engine()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in RESET:
            conn.exec_driver_sql(statement)
    engine.dispose()


def per_message_us(cpu_seconds: float | None, messages: int) -> float | None:
    return None if cpu_seconds is None or not messages else cpu_seconds / messages * 1e6


def other_cores(outcome: Outcome) -> float | None:
    """Cores that processes outside the run used in the window: above 0.25 a round's figure is
    suspect (a neighbour's load), whatever the plan."""
    cpu = outcome.cpu
    if any(cpu.get(name) is None for name in ("machine", "loadgen", "app", "postgres")):
        return None
    return max(0.0, cpu["machine"] - cpu["loadgen"] - cpu["app"] - cpu["postgres"]) / outcome.elapsed


def merged(outcomes: list[Outcome]) -> Outcome:
    """Several windows as one: their tallies and CPU summed, their lengths added up."""
    tally = Tally()
    for outcome in outcomes:
        tally.merge(outcome.tally)
    cpu = {
        name: None if any(o.cpu[name] is None for o in outcomes) else sum(o.cpu[name] for o in outcomes)
        for name in outcomes[0].cpu
    }
    return Outcome(tally=tally, elapsed=sum(o.elapsed for o in outcomes), cpu=cpu)


def fanout(run: Run):
    """10 subscriptions of one topic, 3 of them filtered; C publishers post batches of B."""
    topic = run.new_topic()
    filters = [None] * (FANOUT_SUBSCRIPTIONS - len(FANOUT_FILTERS)) + list(FANOUT_FILTERS)
    subscriptions = [(run.new_subscription(topic, f), f) for f in filters]
    run.settle()
    outcome = run.load([run.publisher(topic, run.args.batch) for _ in range(run.args.concurrency)])
    t = outcome.tally
    checks = [no_errors(t)]
    copies = 0
    for subscription, f in subscriptions:
        expected = t.published if f is None else sum(t.countries[c] for c in f["country"])
        copies += expected
        m = run.metrics(subscription)
        checks.append(
            equal(f"{subscription} available == expected ({f or 'no filter'})", m["available"], expected)
        )
    run.drop(topic)
    return outcome, t.published, checks, {"copies_per_s": copies / outcome.elapsed}


def mixed_scenario(run: Run, wait: int, poll: float):
    """Publishers (paced by --rate) and consumers at once; end-to-end latency from publish to
    claim, from the timestamp in each payload; the queue is drained after the window. Consumers
    long-poll (`wait` seconds) or, with wait 0, sleep `poll` seconds after an empty claim."""
    topic = run.new_topic()
    subscription = run.new_subscription(topic)
    run.settle()
    publishers = max(1, run.args.concurrency // 2)
    consumers = max(1, run.args.concurrency - publishers)
    capacity = waiting_capacity(run) if wait else None
    rate = run.args.rate / publishers if run.args.rate else None
    specs = [run.publisher(topic, run.args.mixed_batch, rate=rate) for _ in range(publishers)]
    specs += [
        run.consumer(subscription, run.args.batch, drain=True, e2e=True, wait=wait, poll=poll)
        for _ in range(consumers)
    ]
    outcome = run.load(specs, drain=run.args.drain_timeout)
    t = outcome.tally
    m = run.metrics(subscription)
    checks = [
        no_errors(t),
        equal("consumed == published (window + drain)", len(t.keys), t.published),
        *keys_check(t, t.published_by_client),
        equal("available == 0", m["available"], 0),
        equal("delivered == 0", m["delivered"], 0),
        equal("acked == published", m["acked"], t.published),
    ]
    if capacity is not None and consumers <= capacity:
        checks.append(equal("long-poll claims waited (early empty answers)", t.early_empty, 0))
    run.drop(topic)
    extra = {
        "consumers": f"long-poll {wait} s" if wait else f"poll {poll * 1000:g} ms",
        "published_per_s": t.published / outcome.elapsed,
        "drained_after_window": t.drained,
        "claims_per_s": t.claims / outcome.elapsed,
        "empty_claims_per_s": t.empty_claims / outcome.elapsed,
    }
    if wait:
        extra["early_empty_claims"] = t.early_empty
    if capacity is not None and consumers > capacity:
        extra["note"] = (
            f"{consumers} long-poll consumers, but a worker lets at most {capacity} wait: "
            "early empty answers expected, not checked"
        )
    return outcome, t.consumed, checks, extra


def mixed(run: Run):
    """mixed_scenario with long-poll consumers (--wait-seconds); HTTP only."""
    if run.mode == "raw":
        raise SkipScenario("long-poll is an HTTP feature; mixed_poll runs raw")
    return mixed_scenario(run, run.args.wait_seconds, 0.0)


def mixed_poll(run: Run):
    """mixed_scenario with consumers that sleep --poll-ms after an empty claim."""
    return mixed_scenario(run, 0, run.args.poll_ms / 1000)


def waiting_capacity(run: Run) -> int | None:
    """How many claims one worker lets wait (LONG_POLL_MAX_WAITERS; before issue 15, threads - 2);
    it answers the others at once, and early_empty_claims counts those. gunicorn does not spread
    keep-alive connections evenly over its workers, so only a consumer count within one worker's
    share is sure to wait. None with --url: the app's settings are not known."""
    if getattr(run.app, "threads", None) is None:
        return None
    return max(1, int(os.environ.get("PUBSUB_LONG_POLL_MAX_WAITERS", LONG_POLL_MAX_WAITERS)))


def warm_up(run: Run, seconds: float) -> None:
    """Publish and consume for a moment, unmeasured: gunicorn workers open their connection
    pools and PostgreSQL loads the catalog, so the first scenario does not pay for it."""
    topic = run.new_topic()
    subscription = run.new_subscription(topic)
    specs = [run.publisher(topic, run.args.batch) for _ in range(run.args.concurrency)]
    specs += [run.consumer(subscription, run.args.batch, drain=True) for _ in range(run.args.concurrency)]
    outcome = run.load(specs, drain=run.args.drain_timeout, duration=seconds)
    if outcome.tally.errors:
        raise AppError(f"warm-up requests failed: {outcome.tally.error_samples}")
    run.drop(topic)


# -- longpoll (issue 15) --

# The server's Prometheus counter of claim statements; until the app has it, pg_stat_statements
# counts the claim statement (CLAIM_STATEMENT_MARK is a piece of its text), when preloaded.
CLAIM_METRIC = "pubsub_claims_total"
# How many long polls wait in the server (a gauge summed over its workers), read at the end of
# the idle phase: it should be n.
WAITING_METRIC = "pubsub_long_poll_waiting"
CLAIM_STATEMENT_MARK = "picked AS MATERIALIZED"
# The response header (and its value) by which the server says it declined to wait; with None, a
# declined poll is one answered empty before half its wait (as the yardstick counts it).
DECLINED_HEADER: str | None = "Pubsub-Long-Poll"
DECLINED_VALUE = "declined"
# Issue 15's targets, checked in a full run (--targets auto) or always (--targets on).
TARGET_E2E_P50_MS = 20.0
TARGET_E2E_P99_MS = 100.0
TARGET_CLAIMS_PER_MESSAGE = 2.0
TARGET_IDLE_CPU_PERCENT = 5.0


def app_counts_claims() -> bool:
    """Whether this checkout's app defines CLAIM_METRIC (then pg_stat_statements is not needed)."""
    import prometheus_client

    import pubsub.messages  # noqa: F401  (wherever the app defines the counter, it is imported by now)
    import pubsub.observability  # noqa: F401

    names = getattr(prometheus_client.REGISTRY, "_names_to_collectors", {})
    return CLAIM_METRIC in names or CLAIM_METRIC.removesuffix("_total") in names


def metric_value(url: str, name: str, token: str | None = None) -> float | None:
    """The sum of a metric's samples on the app's /metrics (None if it has none)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if response.status != 200:
        return None
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
    ]
    return sum(values) if values else None


class ClaimCounter:
    """Claim statements run by the app so far: its Prometheus counter, else pg_stat_statements
    (when the database has it preloaded), else unknown (read() returns None)."""

    def __init__(self, run: Run):
        self.run, self.source, self.conn = run, None, None
        if metric_value(run.app.url, CLAIM_METRIC, os.environ.get("PUBSUB_METRICS_BEARER_TOKEN")) is not None:
            self.source = "metric"
            return
        engine = run.engine()
        if engine is None:
            return
        try:
            self.conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self.conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self.source = "pg_stat_statements"
            self.read()
        except sa.exc.DBAPIError:  # not preloaded (shared_preload_libraries), or not installed
            self.close()
            self.source = None

    def read(self) -> float | None:
        if self.source == "metric":
            return metric_value(self.run.app.url, CLAIM_METRIC, os.environ.get("PUBSUB_METRICS_BEARER_TOKEN"))
        if self.source == "pg_stat_statements":
            row = self.conn.exec_driver_sql(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE %(mark)s",
                {"mark": f"%{CLAIM_STATEMENT_MARK}%"},
            ).one()
            return float(row[0])
        return None

    def close(self) -> None:
        if self.conn is not None:
            engine = self.conn.engine
            self.conn.close()
            engine.dispose()
            self.conn = None


def longpoll(run: Run):
    """-n consumers long-poll --subscriptions subscriptions (each of its own topic) while one
    publisher sends --publish-rate single-message publishes a second (issue 15); an idle phase
    first (consumers waiting, nothing published) for the server's CPU and memory with waiters."""
    if run.mode == "raw":
        raise SkipScenario("long-poll is an HTTP feature")
    args = run.args
    topics = [run.new_topic() for _ in range(args.subscriptions)]
    subscriptions = [run.new_subscription(topic) for topic in topics]
    run.settle()
    run.wait_quiet()
    counter = ClaimCounter(run)
    plan = lp.Plan(
        url=run.app.url,
        token=run.token,
        topics=topics,
        subscriptions=subscriptions,
        consumers=args.consumers,
        batch=args.longpoll_batch,
        wait=args.longpoll_wait,
        rate=args.publish_rate,
        publishers=args.publishers,
        duration=args.longpoll_duration,
        idle=args.idle_seconds,
        settle=args.settle_seconds,
        drain=args.drain_timeout,
        pause=args.declined_pause,
        declined_header=DECLINED_HEADER,
        declined_value=DECLINED_VALUE,
        procs=args.procs,
        pad="x" * args.payload_pad,
    )
    try:
        result = lp.run_longpoll(
            plan,
            run.cpu_meters(),
            lambda: lp.tree_rss(run.app.app_roots),
            counter.read,
            lambda: metric_value(run.app.url, WAITING_METRIC, os.environ.get("PUBSUB_METRICS_BEARER_TOKEN")),
            lambda text: print(f"[bench]   {text}", file=sys.stderr, flush=True),
        )
    finally:
        counter.close()
    r = result.report
    keys = list(r.keys)
    published = result.published
    checks = [
        check(
            "no request failed",
            r.errors + result.publish_errors == 0,
            "; ".join(r.error_samples + result.publish_error_samples),
        ),
        check("published some messages", published > 0, str(published)),
        equal("no message received twice (unique keys)", len(keys) - len(set(keys)), 0),
        equal("published messages never received (keys)", len(set(result.published_keys) - set(keys)), 0),
        equal("received messages never published (keys)", len(set(keys) - set(result.published_keys)), 0),
    ]
    wrong = []
    try:  # the figures are worth keeping even when the app is gone by now
        for subscription, count in zip(subscriptions, result.published_by_subscription, strict=True):
            m = run.metrics(subscription)
            if (m["available"], m["delivered"], m["acked"]) != (0, 0, count):
                wrong.append(f"{subscription}: available {m['available']}, delivered {m['delivered']}, "
                             f"acked {m['acked']} of {count}")  # fmt: skip
        for topic in topics:
            run.drop(topic)
    except (OSError, http.client.HTTPException, AppError) as error:
        exited = run.app.exited()
        wrong.append(
            f"the API failed after the load: {type(error).__name__}: {error}"
            + (f"; {exited}" if exited else "")
        )
    checks.append(check("each subscription: available = delivered = 0, acked = published", not wrong,
                        "; ".join(wrong[:3])))  # fmt: skip

    extra = longpoll_figures(result, plan, counter.source)
    # Early empty answers count too: a server that declines without saying so must not pass.
    declined = sum(
        extra[f"{kind}_{phase}"] for kind in ("declined", "early") for phase in ("idle", "publish")
    )
    targets = args.targets == "on" or (args.targets == "auto" and not args.smoke)
    if targets or DECLINED_HEADER:
        checks.append(equal("declined or early empty consumes (idle + publish phases)", declined, 0))
    if targets:
        e2e = extra["e2e_ms"]
        checks += [
            below("e2e p50 ms", e2e["p50"], TARGET_E2E_P50_MS),
            below("e2e p99 ms", e2e["p99"], TARGET_E2E_P99_MS),
            below("claim statements per message", extra["claims_per_msg"], TARGET_CLAIMS_PER_MESSAGE),
            below(
                "server CPU % while idle with waiters", extra["server_cpu_pct_idle"], TARGET_IDLE_CPU_PERCENT
            ),
        ]
    elif DECLINED_HEADER is None:
        run.notes.append("longpoll: targets not checked (--targets), nor declined = 0 (no declined header)")
    tally = Tally(
        published=published,
        consumed=len(keys),
        requests=extra["consume_requests_publish"] + published + len(r.ack_latency),
        claims=extra["consume_requests_publish"],
        errors=r.errors + result.publish_errors,
        error_samples=(r.error_samples + result.publish_error_samples)[:5],
        latency={"publish": result.publish_latency, "ack": r.ack_latency},
        e2e=array("d", r.e2e),
    )
    outcome = Outcome(tally=tally, elapsed=result.publish.elapsed, cpu=result.publish.cpu)
    return outcome, published, checks, extra


def below(name: str, value: float | None, limit: float) -> dict:
    if value is None:
        return check(f"{name} < {limit:g}", False, "not measured")
    return check(f"{name} < {limit:g}", value < limit, f"{value:.2f}")


def longpoll_figures(result: "lp.Result", plan: "lp.Plan", claim_source: str | None) -> dict:
    """The JSON line's extra for longpoll: per phase, from the answers stamped within it."""
    r = result.report
    idle, publish = result.idle, result.publish

    def answers(phase: "lp.Phase") -> tuple[int, int, int]:
        within = [
            kind for at, kind in zip(r.answer_at, r.answer_kind, strict=True) if phase.start <= at < phase.end
        ]
        return len(within), within.count(lp.DECLINED), within.count(lp.EARLY)

    requests_idle, declined_idle, early_idle = answers(idle)
    requests_publish, declined_publish, early_publish = answers(publish)
    e2e = sorted(r.e2e)

    def pick(q: float) -> float | None:
        return round(e2e[min(len(e2e) - 1, int(q * len(e2e)))] * 1000, 1) if e2e else None

    def pct(phase: "lp.Phase", name: str) -> float | None:
        seconds = phase.cpu.get(name)
        return None if seconds is None else round(100 * seconds / phase.elapsed, 1)

    mib = 1024 * 1024
    rss_idle, rss_waiting = result.rss_idle, result.rss_waiting
    known_rss = rss_idle is not None and rss_waiting is not None
    return {
        "consumers": plan.consumers,
        "subscriptions": len(plan.subscriptions),
        "wait_seconds": plan.wait,
        "rate": plan.rate,
        "published": result.published,
        "published_per_s": round(result.published / publish.elapsed, 1),
        "received": len(r.keys),
        "e2e_ms": {"p50": pick(0.5), "p99": pick(0.99), "max": round(e2e[-1] * 1000, 1) if e2e else None},
        "declined_per_s": round(declined_publish / publish.elapsed, 1),
        "declined_per_s_idle": round(declined_idle / idle.elapsed, 1),
        "declined_by": (
            f"header {plan.declined_header}: {plan.declined_value}"
            if plan.declined_header
            else "early empty (< wait/2)"
        ),
        # Empty before half the wait yet not declined by the header (0 without a header: declined).
        "early_empty_per_s": round(early_publish / publish.elapsed, 1),
        "early_empty_per_s_idle": round(early_idle / idle.elapsed, 1),
        "consume_requests_per_s": round(requests_publish / publish.elapsed, 1),
        "consume_requests_per_s_idle": round(requests_idle / idle.elapsed, 1),
        "claims_per_msg": (
            round(publish.claims / result.published, 2)
            if publish.claims is not None and result.published
            else None
        ),
        "claims_per_s_idle": None if idle.claims is None else round(idle.claims / idle.elapsed, 1),
        "claims_counted_by": claim_source,
        "server_cpu_pct_publish": pct(publish, "app"),
        "server_cpu_pct_idle": pct(idle, "app"),
        "pg_cpu_pct_publish": pct(publish, "postgres"),
        "pg_cpu_pct_idle": pct(idle, "postgres"),
        "loadgen_cpu_pct_publish": pct(publish, "loadgen"),
        "loadgen_cpu_pct_idle": pct(idle, "loadgen"),
        "server_rss_mib_idle": round(rss_idle / mib, 1) if rss_idle is not None else None,
        "server_rss_mib_waiting": round(rss_waiting / mib, 1) if rss_waiting is not None else None,
        "server_rss_kib_per_waiter": round((rss_waiting - rss_idle) / 1024 / plan.consumers, 1)
        if known_rss
        else None,
        "server_waiting_at_idle_end": result.waiting,
        "consumers_answered": r.connected,
        "drained_in_s": round(result.drained_in, 2),
        # Kept for the checks and the table; not figures of their own.
        "declined_idle": declined_idle,
        "declined_publish": declined_publish,
        "early_idle": early_idle,
        "early_publish": early_publish,
        "consume_requests_publish": requests_publish,
    }


class SkipScenario(Exception):
    pass


SCENARIOS = {
    "publish_batch": publish_batch,
    "publish_single": publish_single,
    "consume_ack": consume_ack,
    "consume_ack_ordered": consume_ack_ordered,
    "consume_ack_cold": consume_ack_cold,
    "fanout": fanout,
    "mixed": mixed,
    "mixed_poll": mixed_poll,
    "backlog": backlog,
    "rounds": rounds,
    # Last: on a server that holds a thread per waiter, its waits outlive the scenario (up to
    # --longpoll-wait seconds after the consumers hang up) and would take threads from the next.
    "longpoll": longpoll,
}
