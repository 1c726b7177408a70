"""Pooled connections: the socket check that replaces pre-ping's round trip, and autocommit
(which the hot path switches on) never leaking into a transaction."""

import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from pubsub import db, topics


def libpq_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


def pooled_backend_pid(app) -> int:
    with db.get_engine(app).connect() as conn:
        return conn.connection.driver_connection.info.backend_pid


def terminate_backend(database_url: str, pid: int) -> None:
    """Close one server process, as a restart or an idle timeout would, and wait until it is gone."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0]
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
            assert time.monotonic() < deadline, "the backend did not exit"
            time.sleep(0.05)


def one_connection_app(make_app, **settings):
    app = make_app(DATABASE_POOL_SIZE=1, DATABASE_MAX_OVERFLOW=0, **settings)
    client = app.test_client()
    assert client.post("/topics", json={"id": "orders"}).status_code == 201
    return app, client


def test_a_connection_the_server_closed_is_replaced_without_a_failed_request(make_app, database_url):
    app, client = one_connection_app(make_app)
    pid = pooled_backend_pid(app)
    terminate_backend(database_url, pid)
    assert client.post("/topics/orders/messages", json=[{"n": 1}]).status_code == 204
    assert pooled_backend_pid(app) != pid


def test_without_the_check_that_request_fails_with_a_503(make_app, database_url):
    # The check of the check: the same closed connection, handed out unchecked.
    app, client = one_connection_app(make_app, DATABASE_POOL_PRE_PING=False)
    terminate_backend(database_url, pooled_backend_pid(app))
    response = client.post("/topics/orders/messages", json=[{"n": 1}])
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    # The broken connection was not kept: the next request gets a new one.
    assert client.post("/topics/orders/messages", json=[{"n": 1}]).status_code == 204


def test_a_connection_goes_back_to_the_pool_out_of_autocommit(make_app):
    app, client = one_connection_app(make_app)
    assert client.post("/topics/orders/messages", json=[{"n": 1}]).status_code == 204  # autocommit
    with app.app_context():
        with pytest.raises(RuntimeError):
            with db.begin() as conn:  # the same, only pooled connection
                assert conn.connection.driver_connection.autocommit is False
                topics.create_topic(conn, "rolled-back")
                raise RuntimeError
    assert client.get("/topics/rolled-back").status_code == 404
