"""The migrations build exactly tables.py, and can be undone and redone."""

import contextlib

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade

from pubsub import create_app, db
from pubsub.tables import metadata
from tests.conftest import new_database


def schema_differences(engine: sa.Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)


def test_migrated_database_matches_tables_py(app):
    assert schema_differences(db.get_engine(app)) == []


@pytest.fixture
def make_scratch_app(server_url):
    """An app on a new, empty database (no migrations run), with some settings changed."""
    apps = []
    with contextlib.ExitStack() as databases:

        def make(**overrides):
            url = databases.enter_context(new_database(server_url, migrate=False))
            apps.append(create_app({"DATABASE_URL": url, **overrides}))
            return apps[-1]

        yield make
        for app in apps:
            db.dispose(app)


@pytest.fixture
def scratch_app(make_scratch_app):
    return make_scratch_app()


def table_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade(scratch_app):
    engine = db.get_engine(scratch_app)
    with scratch_app.app_context():
        upgrade()
        assert table_names(engine) == set(metadata.tables)
        downgrade(revision="base")
        assert table_names(engine) == set()
        upgrade()
    assert schema_differences(engine) == []
    client = scratch_app.test_client()
    assert client.post("/topics", json={"id": "after-redo"}).status_code == 201


def test_0004_gives_deliveries_a_deadline_and_its_downgrade_splits_shared_ids(make_scratch_app):
    """Existing subscriptions get the lock timeout as their ack deadline and existing deliveries
    a deadline; undone, copies that share a message id get ids of their own again. Rows at 0003
    are written in SQL: the domain functions speak the newest schema."""
    app = make_scratch_app(CLEANUP_STUCK_MESSAGES_LOCK_TIMEOUT_SECONDS=120)
    engine = db.get_engine(app)
    with app.app_context():
        upgrade(revision="0003")
        with engine.begin() as conn:
            conn.execute(
                sa.text("""
                INSERT INTO topics (id) VALUES ('orders');
                INSERT INTO subscriptions (id, topic_id, max_delivery_attempts, backoff_min_seconds,
                                           backoff_max_seconds)
                VALUES ('a', 'orders', 5, 1, 2), ('b', 'orders', 5, 1, 2);
                INSERT INTO subscription_messages (id, subscription_id, payload, state, locked_at)
                VALUES (gen_random_uuid(), 'a', '{}', 1, now() - interval '10 seconds');
            """)
            )
        upgrade(revision="0004")
        with engine.begin() as conn:
            deadlines = conn.execute(sa.text("SELECT DISTINCT ack_deadline_seconds FROM subscriptions"))
            assert deadlines.scalars().all() == [120]
            lapse = conn.execute(
                sa.text("SELECT available_at - locked_at FROM subscription_messages WHERE state = 1")
            ).scalar_one()
            assert lapse.total_seconds() == 120
            # Two messages published at 0004, each copied to both subscriptions under one id.
            conn.execute(
                sa.text("""
                INSERT INTO subscription_messages (id, subscription_id, payload)
                SELECT m.id, s.id, '{}' FROM (VALUES (gen_random_uuid()), (gen_random_uuid())) AS m (id),
                     (VALUES ('a'), ('b')) AS s (id)
            """)
            )
        downgrade(revision="0003")
        with engine.begin() as conn:
            ids = conn.execute(sa.text("SELECT id FROM subscription_messages")).scalars().all()
        assert len(ids) == len(set(ids)) == 5
