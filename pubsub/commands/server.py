"""`flask pubsub serve`: gunicorn (gthread) with the API_* settings."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import click
from flask import current_app
from flask.cli import with_appcontext

from pubsub import db

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        "wsgi:app",
    ]


@click.command("serve")
@with_appcontext
def serve() -> None:
    """Serve the API with gunicorn; with no DATABASE_URL, on the embedded PostgreSQL."""
    app = current_app._get_current_object()
    env = dict(os.environ)
    if not app.config["DATABASE_URL"]:
        # Started here, in the parent, so every worker shares it and it stops after them.
        env["PUBSUB_DATABASE_URL"] = db.database_url(app)
    metrics_dir = tempfile.mkdtemp(prefix="pubsub-metrics-")
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    child = subprocess.Popen(gunicorn_command(app.config), env=env, cwd=PROJECT_ROOT)

    def forward(signum, frame):
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        status = child.wait()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    # The embedded PostgreSQL, if we started one, is stopped at exit once gunicorn is gone.
    sys.exit(status)
