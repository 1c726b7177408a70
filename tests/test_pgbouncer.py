"""Behind PgBouncer in transaction pooling mode (issue 17, point 2; README "Behind PgBouncer"):
Debian's pgbouncer (1.18: no prepared statements in that mode) in front of the test database,
started by the module (tests/pgbouncer.py). With DATABASE_PREPARED_STATEMENTS=false and
DATABASE_LISTEN_URL straight to PostgreSQL, every statement works through it, long polls are
woken by NOTIFY, and timestamps stay in UTC though PgBouncer ignores the `options` startup
parameter. CI's third run (.ci/run) runs a part of the suite through such a PgBouncer too.
"""

import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from alembic.script import ScriptDirectory
from flask import Flask
from flask_migrate import upgrade
from sqlalchemy.engine import make_url

from pubsub import create_app, db
from tests.conftest import new_database
from tests.pgbouncer import PgBouncer, available

WORKERS = 6  # client threads, each with its own pooled connection at times
ROUNDS = 8  # each statement runs more often than psycopg's prepare threshold (5) per connection


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(False)


@pytest.fixture(scope="module")
def bouncer(server_url) -> Iterator[PgBouncer]:
    assert available(), "pgbouncer is not installed (apt-get install pgbouncer; CI installs it)"
    with PgBouncer(server_url, pool_size=4) as bouncer:
        yield bouncer


@pytest.fixture
def bounced_app(bouncer, database_url) -> Iterator[Callable[..., Flask]]:
    """Apps on the test database through PgBouncer, with the README's settings; disposed at the end."""
    apps = []

    def make(**overrides) -> Flask:
        settings = {
            "DATABASE_URL": bouncer.url(database_url),
            "DATABASE_LISTEN_URL": database_url,
            "DATABASE_PREPARED_STATEMENTS": False,
            "TESTING": True,
            "DATABASE_POOL_SIZE": WORKERS,
            **overrides,
        }
        app = create_app(settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        db.dispose(app)


def run_threads(target: Callable[[int], None], count: int = WORKERS) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            target(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


def publish_consume_ack(app: Flask) -> list[str]:
    """WORKERS threads publish, consume and ack ROUNDS times each on a subscription of their own,
    through the app's pool: every answer that is not the expected 2xx, as text."""
    client = app.test_client()
    assert client.post("/topics", json={"id": "orders"}).status_code == 201
    for i in range(WORKERS):
        response = client.post(
            "/subscriptions", json={"id": f"sub-{i}", "topic_id": "orders", "filter": {"n": [i]}}
        )
        assert response.status_code == 201, response.json
    failures: list[str] = []

    def work(index: int) -> None:
        mine = app.test_client()
        for round in range(ROUNDS):
            answers = [mine.post("/topics/orders/messages", json=[{"n": index, "round": round}])]
            consumed = mine.get(f"/subscriptions/sub-{index}/messages", query_string={"consumer_id": "w"})
            answers.append(consumed)
            if consumed.status_code == 200:
                ids = [m["id"] for m in consumed.json["data"]]
                if len(ids) != 1:
                    failures.append(f"sub-{index} round {round}: consumed {consumed.json}")
                answers.append(mine.post(f"/subscriptions/sub-{index}/acks", json=ids))
            failures.extend(f"{r.status_code} {r.json}" for r in answers if r.status_code >= 300)

    assert not run_threads(work)
    return failures


def test_every_statement_works_through_pgbouncer_in_transaction_mode(bounced_app):
    app = bounced_app()
    assert publish_consume_ack(app) == []
    metrics = [app.test_client().get(f"/subscriptions/sub-{i}/metrics").json for i in range(WORKERS)]
    assert [(m["available"], m["delivered"], m["acked"]) for m in metrics] == [(0, 0, ROUNDS)] * WORKERS


def test_prepared_statements_break_through_pgbouncer_in_transaction_mode(bounced_app):
    """Why the setting exists: left on, psycopg's prepared statements meet other connections'
    (or miss their own) on PgBouncer's shared server connections."""
    failures = publish_consume_ack(bounced_app(DATABASE_PREPARED_STATEMENTS=True, TESTING=False))
    assert any(failure.startswith("500") for failure in failures), failures


def test_a_long_poll_is_woken_by_notify_through_its_direct_listen_connection(bounced_app):
    """The LISTEN connection goes to DATABASE_LISTEN_URL; the publish's NOTIFY goes through
    PgBouncer. With re-checks 20 s apart, an answer within 2 s is the notification's."""
    app = bounced_app(LONG_POLL_RECHECK_SECONDS=20)
    client = app.test_client()
    assert client.post("/topics", json={"id": "orders"}).status_code == 201
    assert client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"}).status_code == 201
    answered: list = []

    def wait() -> None:
        query = {"consumer_id": "w", "wait_seconds": 10}
        response = app.test_client().get("/subscriptions/sub/messages", query_string=query)
        answered.append((time.monotonic(), response.status_code, response.json["data"]))

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(1.0)  # parked, its subscription marked for notifications
    assert not answered
    published = time.monotonic()
    assert client.post("/topics/orders/messages", json=[{"n": 1}]).status_code == 204
    waiter.join(15)
    [(at, status, data)] = answered
    assert status == 200 and [m["payload"] for m in data] == [{"n": 1}]
    assert at - published < 2.0


@pytest.fixture
def sao_paulo_database(server_url) -> Iterator[str]:
    """An empty database whose sessions start in another time zone than UTC."""
    with new_database(server_url, migrate=False) as url:
        with psycopg.connect(libpq(server_url), autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE \"{make_url(url).database}\" SET TimeZone = 'America/Sao_Paulo'")
        yield url


def test_connections_through_pgbouncer_are_in_utc_though_it_ignores_the_options_parameter(
    bouncer, sao_paulo_database
):
    # PgBouncer accepts `options` only to drop it: a session there starts in the database's zone.
    with psycopg.connect(libpq(bouncer.url(sao_paulo_database)), options="-c TimeZone=UTC") as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == ("America/Sao_Paulo",)
    app = create_app({"DATABASE_URL": bouncer.url(sao_paulo_database), "DATABASE_PREPARED_STATEMENTS": False})
    try:
        engine = db.get_engine(app)
        # Several transactions open at once, each on its own server connection (as many as the
        # PgBouncer's pool), then again: it sets the zone on whichever server connection it lends.
        for _ in range(2):
            held = [engine.connect() for _ in range(bouncer.pool_size)]
            try:
                zones = {c.exec_driver_sql("SHOW TimeZone").scalar() for c in held}
                assert zones == {"UTC"}
            finally:
                for conn in held:
                    conn.close()
    finally:
        db.dispose(app)


def test_migrations_run_through_pgbouncer(bouncer, server_url):
    """`flask db upgrade`'s code path: each migration is a transaction, nothing needs a session."""
    with new_database(server_url, migrate=False) as url:
        app = create_app({"DATABASE_URL": bouncer.url(url), "DATABASE_PREPARED_STATEMENTS": False})
        try:
            with app.app_context():
                upgrade()
                head = ScriptDirectory.from_config(
                    app.extensions["migrate"].migrate.get_config()
                ).get_current_head()
                with db.connect() as conn:
                    assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head
        finally:
            db.dispose(app)
