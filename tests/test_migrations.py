"""The migrations build exactly tables.py, and can be undone and redone."""

import uuid

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy.engine import make_url

from pubsub import create_app, db
from pubsub.tables import metadata
from tests.conftest import admin_conninfo


def schema_differences(engine: sa.Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)


def test_migrated_database_matches_tables_py(app):
    assert schema_differences(db.get_engine(app)) == []


@pytest.fixture
def scratch_app(server_url):
    name = f"pubsub_scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_conninfo(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(db.psycopg_url(server_url)).set(database=name).render_as_string(hide_password=False)
    app = create_app({"DATABASE_URL": url})
    yield app
    db.dispose(app)
    with psycopg.connect(admin_conninfo(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
