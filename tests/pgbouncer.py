"""A throwaway PgBouncer in transaction pooling mode in front of a test PostgreSQL: Debian's
`pgbouncer` package (which CI installs, .ci/run), configured in a temporary directory, listening on
a free loopback port, trust auth, every database name passed through to the server.

PgBouncer refuses to run as root, so as root it runs as the same system user as the throwaway
clusters (tests/pgcluster.py). Stopped with SIGTERM (then SIGKILL, bounded) by stop().
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.pgcluster import free_port, make_traversable, system_user

PGBOUNCER = os.environ.get("PUBSUB_TEST_PGBOUNCER_BIN") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
START_TIMEOUT = 15  # seconds for it to accept connections
STOP_TIMEOUT = 10

# What the README's "Behind PgBouncer" section asks of a production pgbouncer.ini, and what the
# tests run with: transaction pooling, and the `options` startup parameter (which pubsub sends,
# -c TimeZone=UTC) accepted and ignored; pubsub sets the time zone itself when the server's is
# another (db.set_time_zone), and PgBouncer keeps it per client.
SETTINGS = """\
pool_mode = transaction
ignore_startup_parameters = options
"""


def available() -> bool:
    return os.path.exists(PGBOUNCER)


class PgBouncer:
    """`with PgBouncer(server_url) as bouncer:` runs the block with PgBouncer started in front of
    the server at server_url (host and port; every database and user go through);
    bouncer.url(database_url) is the same database through it."""

    def __init__(self, server_url: str, pool_size: int = 20, settings: str = SETTINGS):
        server = make_url(server_url)
        # The embedded wheel's URLs name a Unix socket directory: ?host=/tmp/...
        self.server_host = server.query.get("host") or server.host or "127.0.0.1"
        self.server_port = int(server.query.get("port") or server.port or 5432)
        self.user = system_user()
        self.dir = Path(tempfile.mkdtemp(prefix="pubsub-pgbouncer-"))
        self.port = free_port()
        self.pool_size = pool_size  # server connections per database and user
        self.logfile = self.dir / "pgbouncer.log"
        self.process: subprocess.Popen | None = None
        users = server.username or "postgres"
        (self.dir / "userlist.txt").write_text(f'"{users}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={self.server_host} port={self.server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'userlist.txt'}\n"
            f"logfile = {self.logfile}\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 1000\n"
            f"{settings}"
        )
        if self.user is not None:
            make_traversable(self.dir)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def url(self, database_url: str) -> str:
        """The database at database_url, through PgBouncer."""
        parsed = make_url(database_url).difference_update_query(["host", "port"])
        parsed = parsed.set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)

    def start(self) -> None:
        user = {}
        if self.user is not None:
            user = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        with open(self.dir / "stdout.log", "ab") as output:
            self.process = subprocess.Popen(
                [PGBOUNCER, str(self.dir / "pgbouncer.ini")],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **user,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer did not listen within {START_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        return "".join(
            path.read_text(errors="replace")[-4000:]
            for path in (self.logfile, self.dir / "stdout.log")
            if path.exists()
        )

    def stop(self) -> None:
        """SIGTERM (immediate shutdown: client and server connections closed), SIGKILL if it
        has not exited within STOP_TIMEOUT."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for signum in (signal.SIGTERM, signal.SIGKILL):
            process.send_signal(signum)
            try:
                process.wait(STOP_TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "PgBouncer":
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, *exc_info) -> None:
        self.cleanup()
