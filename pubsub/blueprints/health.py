"""Liveness and readiness probes."""

import logging
import threading

import sqlalchemy as sa
from flask import Flask, current_app
from flask.views import MethodView

from pubsub import db
from pubsub.blueprints import Blueprint
from pubsub.errors import DatabaseUnavailable
from pubsub.schemas import ErrorSchema, StatusSchema

log = logging.getLogger(__name__)
blp = Blueprint("health", __name__, description="Health probes")

# /readiness answers within this many seconds whatever the database does: a probe that has not
# finished by then counts as a failure (503), under the 1 s-5 s that probes usually wait.
READINESS_TIMEOUT_SECONDS = 2.0
# Ready means able to serve: the messages table can be read (not locked away, e.g. by a
# migration's ACCESS EXCLUSIVE lock), and a transaction that writes WAL commits, which on a
# standby fails and on a primary waiting for a synchronous standby that is gone never ends. A
# transactional logical message is the smallest such write that any role may make, with no table
# of its own: a few dozen bytes of WAL per probe (logical decoding sees it under this prefix).
# Merely taking a transaction id would not do: a commit that wrote no other WAL does not wait
# for the standby.
READINESS_PROBE = sa.text(
    "SELECT pg_logical_emit_message(true, 'pubsub-readiness', ''),"
    " EXISTS (SELECT FROM subscription_messages LIMIT 0)"
)


@blp.route("/liveness")
class Liveness(MethodView):
    @blp.response(200, StatusSchema)
    def get(self):
        """The process is up (does not touch the database)."""
        return {"status": "alive"}


@blp.route("/readiness")
class Readiness(MethodView):
    @blp.response(200, StatusSchema)
    @blp.alt_response(
        503,
        schema=ErrorSchema,
        description="Database unreachable, or not answering within 2 s",
        headers={"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    )
    def get(self):
        """The database answers and commits; 503 while it does not, within 2 s."""
        if not readiness_probe(current_app._get_current_object()).passes():  # type: ignore[attr-defined]
            # The API's own 503 (errors.handle_database_unavailable), without its warning: a
            # probe asks every few seconds, and its 503 already says it.
            raise DatabaseUnavailable()
        return {"status": "ready"}


class ProbeRun:
    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class ReadinessProbe:
    """Probes of the database, one at a time per process, each in a thread of its own: a request
    waits for the probe at most READINESS_TIMEOUT_SECONDS; a probe stuck in the database runs on
    until its statement times out (DATABASE_STATEMENT_TIMEOUT_SECONDS), or its commit or the
    server's answer outlives the pool's answer bound (db.BoundedConnection), and the requests that
    arrive meanwhile wait for that same probe, so a hung database costs one thread and one
    connection, however often it is probed."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.running: ProbeRun | None = None

    def passes(self) -> bool:
        with self.lock:
            run = self.running
            if run is None:
                run = self.running = ProbeRun()
                threading.Thread(target=self.probe, args=(run,), name="pubsub-readiness", daemon=True).start()
        return run.done.wait(READINESS_TIMEOUT_SECONDS) and run.ok

    def probe(self, run: ProbeRun) -> None:
        try:
            with self.app.app_context(), db.begin() as conn:
                conn.execute(READINESS_PROBE)
            run.ok = True
        except Exception as error:  # whatever failed, the answer is 503
            log.debug("readiness probe failed: %s", error)
        finally:
            with self.lock:
                self.running = None
            run.done.set()


_probe_lock = threading.Lock()


def readiness_probe(app: Flask) -> ReadinessProbe:
    probe = app.extensions.get("pubsub_readiness")
    if probe is None:
        with _probe_lock:
            probe = app.extensions.setdefault("pubsub_readiness", ReadinessProbe(app))
    return probe
