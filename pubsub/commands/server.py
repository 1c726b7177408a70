"""`flask pubsub serve`: gunicorn (gthread) with the API_* settings."""

import os
import signal
import subprocess
import sys
import tempfile

import click
from flask import current_app
from flask.cli import with_appcontext

from pubsub import db, observability

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Stop (TERM, INT, QUIT) and reload (HUP) signals go to gunicorn, which acts on them as it documents.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def gunicorn_command(config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        "python:pubsub.gunicorn_config",
        "--bind",
        f"{config['API_HOST']}:{config['API_PORT']}",
        "--workers",
        str(config["API_NUM_WORKERS"]),
        "--threads",
        str(config["API_NUM_THREADS"]),
        # Every waiting long-poll consumer holds a connection, beside gunicorn's default 1000
        # for the others (pubsub.worker).
        "--worker-connections",
        str(1000 + config["API_NUM_THREADS"] + config["LONG_POLL_MAX_WAITERS"]),
        "wsgi:app",
    ]


def run_gunicorn(command: list[str], env: dict[str, str]) -> int:
    """Run gunicorn until it exits, passing stop signals on; its exit status as a shell gives it."""
    child = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT)
    # Kept after gunicorn exits: a second Ctrl-C must not interrupt stopping the database at exit.
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda signum, frame: child.send_signal(signum))
    status = child.wait()
    return 128 - status if status < 0 else status


@click.command("serve")
@with_appcontext
def serve() -> None:
    """Serve the API with gunicorn; with no DATABASE_URL, on the embedded PostgreSQL."""
    app = current_app._get_current_object()
    observability.warn_if_metrics_open(app.config)  # here: once, not once per worker
    env = dict(os.environ)
    if not app.config["DATABASE_URL"]:
        # Started here, in the parent, so every worker shares it and it stops after them (at exit).
        env["PUBSUB_DATABASE_URL"] = db.database_url(app)
    # Settings that may come from instance/config.py, for gunicorn's own log lines.
    env["PUBSUB_LOG_LEVEL"] = app.config["LOG_LEVEL"]
    env["PUBSUB_LOG_FORMAT"] = app.config["LOG_FORMAT"]
    env["PUBSUB_LONG_POLL_MAX_WAITERS"] = str(app.config["LONG_POLL_MAX_WAITERS"])  # for the workers' pool
    # Each worker writes its samples there and /metrics sums them; fresh each run, so no stale counts.
    with tempfile.TemporaryDirectory(prefix="pubsub-metrics-") as metrics_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        status = run_gunicorn(gunicorn_command(app.config), env)
    sys.exit(status)
