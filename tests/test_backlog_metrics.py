"""The backlog gauges on /metrics: each subscription's messages by state and the age of its oldest
unacked one, counted by the process answering the scrape, cached per process, and left out (not
failing the scrape) when the database does not answer. Several workers: the last test."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from pubsub import db, subscriptions
from pubsub.settings import ConfigError
from tests.conftest import ApiHelper
from tests.test_serve import (
    free_port,
    gunicorn_processes,
    output_of,
    request,
    serve_env,
    served_by_worker,
    serving,
    wait_for_exit,
    wait_until_live,
)

STATES = ("available", "delayed", "backoff", "delivered", "dlq", "waiting")
ZEROS = {**dict.fromkeys(STATES, 0), "age": 0}
LONG_BACKOFF = {"backoff_min_seconds": 300, "backoff_max_seconds": 300}  # nacked: in backoff all test long


@pytest.fixture(scope="module")
def app(make_app):
    """The app of `client` and `api` here counts on every scrape: no cache carried between tests."""
    return make_app(METRICS_BACKLOG_CACHE_SECONDS=0)


def parse_backlog(text: str) -> dict[str, dict[str, float]]:
    """{subscription: {state: count, ..., "age": seconds}} from a /metrics page, where each may
    appear once only (not once per worker, with a pid label)."""
    backlog: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pubsub_subscription_messages":
                assert set(s.labels) == {"subscription", "state"}, s
                key = s.labels["state"]
            elif s.name == "pubsub_subscription_oldest_unacked_age_seconds":
                assert set(s.labels) == {"subscription"}, s
                key = "age"
            else:
                continue
            values = backlog.setdefault(s.labels["subscription"], {})
            assert key not in values, f"{s.labels['subscription']} {key} twice"
            values[key] = s.value
    return backlog


def scrape(client, **query) -> str:
    response = client.get("/metrics", query_string=query)
    assert response.status_code == 200
    return response.get_data(as_text=True)


def backlog_of(client) -> dict[str, dict[str, float]]:
    return parse_backlog(scrape(client))


def counts(backlog: dict[str, float]) -> dict[str, float]:
    return {state: backlog[state] for state in STATES}


@pytest.fixture
def statements(app) -> Iterator[list[str]]:
    """The backlog counts (statements that read the messages through SQLAlchemy) the app's
    engine runs from now on; the hot paths run theirs on the driver, unseen here."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if "subscription_messages" in statement:
            seen.append(statement)

    engine = db.get_engine(app)
    sa.event.listen(engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(engine, "before_cursor_execute", record)


def test_each_message_counts_in_exactly_one_state(api, client):
    api.create_topic("orders")
    api.create_subscription("retrying", "orders", max_delivery_attempts=5, **LONG_BACKOFF)
    api.create_subscription("dying", "orders", max_delivery_attempts=1)
    api.publish("orders", [{"n": n} for n in range(6)])
    retrying = api.consume("retrying", batch_size=3)
    api.nack("retrying", [retrying[0]["id"]])  # waits out its backoff
    dying = api.consume("dying", batch_size=2)
    api.nack("dying", [m["id"] for m in dying])  # out of attempts: dead letters

    backlog = backlog_of(client)
    assert counts(backlog["retrying"]) == {
        "available": 3,
        "delayed": 0,
        "backoff": 1,
        "delivered": 2,
        "dlq": 0,
        "waiting": 0,
    }
    assert counts(backlog["dying"]) == {
        "available": 4,
        "delayed": 0,
        "backoff": 0,
        "delivered": 0,
        "dlq": 2,
        "waiting": 0,
    }

    api.ack("retrying", [m["id"] for m in retrying[1:]])  # acked messages leave the backlog
    assert counts(backlog_of(client)["retrying"]) == {
        "available": 3,
        "delayed": 0,
        "backoff": 1,
        "delivered": 0,
        "dlq": 0,
        "waiting": 0,
    }


def test_a_nacked_message_counts_as_available_once_its_backoff_ends(api, client):
    api.create_topic("orders")
    api.create_subscription("sub", "orders", backoff_min_seconds=1, backoff_max_seconds=1)
    api.publish("orders", [{"n": 1}])
    api.nack("sub", [api.consume("sub")[0]["id"]])
    assert counts(backlog_of(client)["sub"]) == {
        "available": 0,
        "delayed": 0,
        "backoff": 1,
        "delivered": 0,
        "dlq": 0,
        "waiting": 0,
    }
    time.sleep(1.2)
    assert counts(backlog_of(client)["sub"]) == {
        "available": 1,
        "delayed": 0,
        "backoff": 0,
        "delivered": 0,
        "dlq": 0,
        "waiting": 0,
    }


def test_a_delivery_past_its_ack_deadline_counts_as_available_before_anything_touches_it(api, client):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    lapsing, kept = api.consume("sub", batch_size=2)
    response = client.post("/subscriptions/sub/extend?seconds=1", json=[lapsing["ack_id"]])
    assert response.status_code == 204, response.json
    time.sleep(1.2)  # no consume and no cleanup-stuck in between: the row is still "delivered"
    assert counts(backlog_of(client)["sub"]) == {
        "available": 1,
        "delayed": 0,
        "backoff": 0,
        "delivered": 1,
        "dlq": 0,
        "waiting": 0,
    }
    assert api.metrics("sub") | {"acked": None} == {
        "subscription_id": "sub",
        "available": 1,
        "delayed": 0,
        "delivered": 1,
        "acked": None,
        "dlq": 0,
        "waiting": 0,
    }
    assert [message["id"] for message in api.consume("sub")] == [lapsing["id"]]  # as it said
    assert counts(backlog_of(client)["sub"]) == {
        "available": 0,
        "delayed": 0,
        "backoff": 0,
        "delivered": 2,
        "dlq": 0,
        "waiting": 0,
    }


def test_oldest_unacked_age_covers_available_and_delivered_messages_only(api, client):
    api.create_topic("orders")
    api.create_subscription("sub", "orders", max_delivery_attempts=1)
    api.publish("orders", [{"n": 1}])
    time.sleep(1.2)
    assert 1.2 <= backlog_of(client)["sub"]["age"] < 10

    first = api.consume("sub")
    assert 1.2 <= backlog_of(client)["sub"]["age"] < 10  # delivered, not yet acked
    api.nack("sub", [first[0]["id"]])
    assert backlog_of(client)["sub"] == {**ZEROS, "dlq": 1}  # a dead letter is not unacked work

    api.publish("orders", [{"n": 2}])
    assert 0 <= backlog_of(client)["sub"]["age"] < 1.2
    api.ack("sub", [api.consume("sub")[0]["id"]])
    assert backlog_of(client)["sub"] == {**ZEROS, "dlq": 1}


def test_subscriptions_without_messages_report_zeros(api, client):
    api.create_topic("orders")
    api.create_topic("audit")
    api.create_subscription("all-orders", "orders")
    api.create_subscription("no-match", "orders", filter={"country": ["XX"]})
    api.create_subscription("quiet", "audit")
    api.publish("orders", [{"country": "BR"}])

    backlog = backlog_of(client)
    assert backlog["all-orders"]["available"] == 1
    assert backlog["no-match"] == ZEROS
    assert backlog["quiet"] == ZEROS


def test_without_subscriptions_the_families_are_empty_and_the_page_valid(client):
    text = scrape(client)
    assert parse_backlog(text) == {}
    assert "# TYPE pubsub_subscription_messages gauge" in text


def test_the_backlog_is_counted_once_per_cache_period(make_app):
    app = make_app(METRICS_BACKLOG_CACHE_SECONDS=2)
    client = app.test_client()
    api = ApiHelper(client)
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    seen: list[str] = []
    sa.event.listen(
        db.get_engine(app),
        "before_cursor_execute",
        lambda *args: seen.append(args[2]) if "subscription_messages" in args[2] else None,
    )

    counting = time.monotonic()  # the count is taken between these two instants
    assert backlog_of(client)["sub"]["available"] == 1
    counted = time.monotonic()
    assert len(seen) == 1
    api.publish("orders", [{"n": 2}])
    seen.clear()
    for _ in range(3):
        assert backlog_of(client)["sub"]["available"] == 1  # the cached count
    assert seen == []
    assert time.monotonic() - counting < 2, "too slow to check the cache within its period"

    time.sleep(max(0.0, counted + 2.1 - time.monotonic()))
    assert backlog_of(client)["sub"]["available"] == 2
    assert len(seen) == 1


def test_a_negative_cache_period_is_refused(make_app):
    with pytest.raises(ConfigError, match="PUBSUB_METRICS_BACKLOG_CACHE_SECONDS must be a number >= 0"):
        make_app(METRICS_BACKLOG_CACHE_SECONDS=-1)


def test_with_no_cache_every_scrape_counts_again(api, client, statements):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    for expected in (0, 1):
        statements.clear()
        assert backlog_of(client)["sub"]["available"] == expected
        assert len(statements) == 1
        api.publish("orders", [{"n": 1}])


def test_backlog_is_one_statement_reading_the_messages_once(api, engine):
    """A guard against per-subscription subqueries: one scan of the messages, no subplan per row."""
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.create_subscription("other", "orders")
    api.publish("orders", [{"n": n} for n in range(3)])
    executed = []

    def record(conn, cursor, statement, parameters, context, executemany):
        executed.append((statement, parameters))

    with engine.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", record)  # this connection only
        rows = subscriptions.count_backlog(conn)
        sa.event.remove(conn, "before_cursor_execute", record)
        assert [row["available"] for row in rows] == [3, 3]
        ((statement, parameters),) = executed
        plan = json.dumps(conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar())
    assert plan.count('"Relation Name": "subscription_messages"') == 1
    assert '"Subplan Name"' not in plan


@pytest.fixture
def app_without_database(make_app):
    """An app whose database refuses connections. Built before the test runs, so that caplog
    still sees the logs (create_app resets the root logger's handlers)."""
    return make_app(
        DATABASE_URL=f"postgresql://pubsub@127.0.0.1:{free_port()}/pubsub", METRICS_BACKLOG_CACHE_SECONDS=0
    )


def test_metrics_are_served_without_the_backlog_when_the_database_is_down(app_without_database, caplog):
    text = scrape(app_without_database.test_client())
    assert "# TYPE http_requests_total counter" in text
    assert "pubsub_subscription" not in text
    assert any("backlog metrics left out" in r.getMessage() for r in caplog.records)


def test_the_backlog_comes_back_when_the_database_answers_again(api, client, engine):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    assert "sub" in backlog_of(client)
    # A real error from the real database: the table is missing for a moment.
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE subscription_messages RENAME TO subscription_messages_away"))
    try:
        text = scrape(client)
        assert "# TYPE http_requests_total counter" in text
        assert parse_backlog(text) == {}
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE subscription_messages_away RENAME TO subscription_messages"))
    assert backlog_of(client)["sub"] == ZEROS


def test_a_scrape_restricted_by_name_gets_only_those_metrics(api, client, statements):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    statements.clear()
    text = scrape(client, **{"name[]": "pubsub_subscription_oldest_unacked_age_seconds"})
    assert parse_backlog(text) == {"sub": {"age": 0}}
    assert "http_requests_total" not in text
    text = scrape(client, **{"name[]": "http_requests_total"})
    assert "http_requests_total" in text
    assert "pubsub_subscription" not in text
    assert len(statements) == 1  # the second scrape did not count the backlog


@pytest.mark.slow
def test_every_worker_reports_the_backlog_once_not_summed(database_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(DATABASE_URL=database_url, API_PORT=str(port), API_NUM_WORKERS="2", API_NUM_THREADS="4")
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        master, _ = gunicorn_processes(process, 2)
        metrics_dir = Path(master.environ()["PROMETHEUS_MULTIPROC_DIR"])

        def call(method: str, path: str, body=None, expected: int = 200):
            status, answer = request(port, method, path, body)
            assert status == expected, (status, answer)
            return answer

        call("POST", "/topics", {"id": "orders"}, 201)
        retrying = {"id": "retrying", "topic_id": "orders", **LONG_BACKOFF}
        call("POST", "/subscriptions", retrying, 201)
        call("POST", "/subscriptions", {"id": "dying", "topic_id": "orders", "max_delivery_attempts": 1}, 201)
        call("POST", "/subscriptions", {"id": "none", "topic_id": "orders", "filter": {"n": [-1]}}, 201)
        call("POST", "/topics/orders/messages", [{"n": n} for n in range(6)], 204)
        delivered = call("GET", "/subscriptions/retrying/messages?consumer_id=c&batch_size=3")["data"]
        call("POST", "/subscriptions/retrying/nacks", [delivered[0]["id"]], 204)
        dead = call("GET", "/subscriptions/dying/messages?consumer_id=c&batch_size=2")["data"]
        call("POST", "/subscriptions/dying/nacks", [m["id"] for m in dead], 204)
        expected = {
            "retrying": {"available": 3, "delayed": 0, "backoff": 1, "delivered": 2, "dlq": 0, "waiting": 0},
            "dying": {"available": 4, "delayed": 0, "backoff": 0, "delivered": 0, "dlq": 2, "waiting": 0},
            "none": {"available": 0, "delayed": 0, "backoff": 0, "delivered": 0, "dlq": 0, "waiting": 0},
        }

        # Scrape until each worker has answered several times (each keeps its own cached count).
        scrapes = 0
        while scrapes < 400:
            backlog = parse_backlog(call("GET", "/metrics"))
            scrapes += 1
            assert {name: counts(values) for name, values in backlog.items()} == expected, scrapes
            assert 0 <= backlog["retrying"]["age"] < 60
            assert backlog["none"]["age"] == 0
            by_worker = served_by_worker(metrics_dir, "/metrics")
            if len(by_worker) == 2 and min(by_worker.values()) >= 3:
                break
        assert len(by_worker) == 2 and min(by_worker.values()) >= 3, f"{by_worker} after {scrapes} scrapes"

        process.terminate()
        assert wait_for_exit(process, log) == 0, output_of(log)
