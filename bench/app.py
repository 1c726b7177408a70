"""The system under test: the app that the bench starts on an embedded PostgreSQL of its own, or
one already running at --url; and the CPU its processes and PostgreSQL's use."""

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import psutil

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")
UPGRADE_TIMEOUT = 120  # seconds; the first run of the embedded PostgreSQL includes initdb
START_TIMEOUT = 90
STOP_TIMEOUT = 30  # above gunicorn's graceful_timeout (20 s)
# Settings the bench decides for the app it starts; every other PUBSUB_* variable passes through.
OWN_SETTINGS = ("INSTANCE_PATH", "DATABASE_URL", "API_HOST", "API_PORT", "API_NUM_WORKERS", "API_NUM_THREADS")


class AppError(RuntimeError):
    """The app under test could not be started, reached or stopped."""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_json(base_url: str, method: str, path: str, body=None, token: str | None = None, timeout=30):
    """One request on a fresh connection: (status, decoded JSON or None)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=None if body is None else orjson.dumps(body), headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return response.status, data.decode(errors="replace")


def fetch_token(base_url: str, client_id: str, client_secret: str) -> str:
    status, body = request_json(
        base_url, "POST", "/oauth/token", {"client_id": client_id, "client_secret": client_secret}
    )
    if status not in (200, 201) or not isinstance(body, dict) or "access_token" not in body:
        raise AppError(f"POST /oauth/token answered {status}: {str(body)[:300]}")
    return body["access_token"]


def tree_processes(roots: list[psutil.Process]) -> list[psutil.Process]:
    """These processes and their live descendants, each once."""
    seen: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            seen.setdefault(process.pid, process)
    return list(seen.values())


def tree_cpu_seconds(roots: list[psutil.Process]) -> float:
    """CPU seconds used so far by these processes, their live descendants, and the descendants
    they already reaped (children_user/system): differences of two readings are exact even when
    processes come and go in between, as PostgreSQL backends and overflow connections do."""
    total = 0.0
    for process in tree_processes(roots):
        try:
            t = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def processes_of(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            raise AppError(f"no process {pid}") from None
    return found


def listening_processes(port: int) -> list[psutil.Process]:
    """The top-most process listening on a TCP port (gunicorn's master: its workers share its
    socket, and the system names any one of them); empty when it cannot be seen."""
    try:
        pids = {
            c.pid
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        }
    except psutil.AccessDenied:
        return []
    roots = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            while (parent := process.parent()) is not None and listens(parent, port):
                process = parent
            roots[process.pid] = process
        except psutil.NoSuchProcess:
            pass
    return list(roots.values())


def listens(process: psutil.Process, port: int) -> bool:
    try:
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp")
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def postmaster_of(database_url: str) -> psutil.Process | None:
    """The postmaster serving this URL, as the parent of our own backend; None if not local."""
    import psycopg

    try:
        with psycopg.connect(conninfo(database_url), connect_timeout=5) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        return psutil.Process(psutil.Process(pid).ppid())
    except (psycopg.Error, psutil.Error):
        return None


def conninfo(database_url: str) -> str:
    """A libpq URL (psycopg.connect does not take SQLAlchemy's +psycopg)."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def sqlalchemy_url(database_url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    return database_url


class ExternalApp:
    """An app someone else runs at --url; CPU from --app-pids/--pg-pids or found when possible."""

    def __init__(self, url, database_url=None, app_pids=None, pg_pids=None, client=None):
        self.url = url.rstrip("/")
        self.database_url = sqlalchemy_url(database_url) if database_url else None
        self.client = client  # (client_id, client_secret) for --auth
        self.notes: list[str] = []
        port = urlsplit(self.url).port or 80
        self.app_roots = processes_of(app_pids) if app_pids else listening_processes(port)
        if not self.app_roots:
            self.notes.append(f"app CPU not measured: no process found listening on port {port} (--app-pids)")
        if pg_pids:
            self.pg_roots = processes_of(pg_pids)
        else:
            postmaster = postmaster_of(database_url) if database_url else None
            self.pg_roots = [postmaster] if postmaster else []
        if not self.pg_roots:
            self.notes.append("PostgreSQL CPU not measured: give --pg-pids or a local --database-url")

    def start(self) -> None:
        status, _ = request_json(self.url, "GET", "/liveness")
        if status != 200:
            raise AppError(f"{self.url}/liveness answered {status}")

    def stop(self) -> None:
        pass

    def exited(self) -> str | None:
        return None

    def token(self) -> str | None:
        return fetch_token(self.url, *self.client) if self.client else None

    def describe(self) -> dict:
        return {"url": self.url, "external": True, "auth": self.client is not None}


class LocalApp:
    """`flask db upgrade`, then `flask pubsub serve` on a free loopback port, with an embedded
    PostgreSQL under a temporary instance folder; stopped with SIGTERM to serve, which stops
    gunicorn and then that PostgreSQL."""

    def __init__(
        self,
        workers: int,
        threads: int,
        auth: bool = False,
        keep: bool = False,
        preload: tuple[str, ...] = (),
    ):
        self.workers, self.threads, self.auth, self.keep = workers, threads, auth, keep
        self.preload = preload  # shared_preload_libraries for the embedded PostgreSQL
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.instance = Path(tempfile.mkdtemp(prefix="pubsub-bench-"))
        self.log_path = self.instance / "serve.log"
        self.process: subprocess.Popen | None = None
        self.postmaster: psutil.Process | None = None
        self.database_url: str | None = None
        self.client: tuple[str, str] | None = None
        self.notes: list[str] = []
        self.env = self.app_env()

    def app_env(self) -> dict[str, str]:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("FLASK_", "PROMETHEUS_"))
            and name.removeprefix("PUBSUB_") not in OWN_SETTINGS
        }
        env.update(
            PUBSUB_INSTANCE_PATH=str(self.instance),
            PUBSUB_API_HOST="127.0.0.1",
            PUBSUB_API_PORT=str(self.port),
            PUBSUB_API_NUM_WORKERS=str(self.workers),
            PUBSUB_API_NUM_THREADS=str(self.threads),
        )
        if self.auth:
            env.update(PUBSUB_AUTH_ENABLED="true", PUBSUB_AUTH_SECRET_KEY=os.urandom(32).hex())
        return env

    def flask(self, *args: str, timeout: float) -> str:
        """Run a flask command to completion; its stdout, or AppError with its output."""
        try:
            done = subprocess.run(
                [FLASK, *args],
                cwd=PROJECT_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise AppError(f"flask {' '.join(args)} took over {timeout}s") from None
        if done.returncode != 0:
            raise AppError(f"flask {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        self.flask("db", "upgrade", timeout=UPGRADE_TIMEOUT)
        if self.preload:
            # The upgrade made (and stopped) the cluster; serve starts it again with these.
            with (self.instance / "pgdata" / "postgresql.conf").open("a") as conf:
                conf.write(f"\nshared_preload_libraries = '{','.join(self.preload)}'\n")
            self.notes.append(f"embedded PostgreSQL with shared_preload_libraries = {','.join(self.preload)}")
        if self.auth:
            self.client = create_client(self.flask("pubsub", "create-client", "bench", "*", timeout=60))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [FLASK, "pubsub", "serve"],
                cwd=PROJECT_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_until_live()
        self.postmaster, self.database_url = read_postmaster(self.instance / "pgdata")
        self.wait_for_workers()

    def wait_until_live(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AppError(f"serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if request_json(self.url, "GET", "/liveness", timeout=2)[0] == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        raise AppError(f"serve did not answer /liveness within {START_TIMEOUT}s:\n{self.log()}")

    def wait_for_workers(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            masters = psutil.Process(self.process.pid).children()
            if masters and len(masters[0].children()) >= self.workers:
                return
            time.sleep(0.05)

    def exited(self) -> str | None:
        """What became of serve, if it is no longer running (for a failed scenario's error)."""
        if self.process is None or self.process.poll() is None:
            return None
        return f"serve exited with {self.process.returncode}; its log ends:\n{self.log()[-1500:]}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    @property
    def app_roots(self) -> list[psutil.Process]:
        return [psutil.Process(self.process.pid)] if self.process else []

    @property
    def pg_roots(self) -> list[psutil.Process]:
        return [self.postmaster] if self.postmaster else []

    def token(self) -> str | None:
        return fetch_token(self.url, *self.client) if self.client else None

    def describe(self) -> dict:
        return {
            "url": self.url,
            "external": False,
            "workers": self.workers,
            "threads": self.threads,
            "auth": self.auth,
            **({"preload": list(self.preload)} if self.preload else {}),
        }

    def stop(self) -> None:
        """SIGTERM to serve and wait; whatever is left after the bound is killed, PostgreSQL too."""
        if self.process is not None and self.process.poll() is None:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.notes.append("serve did not stop in time: killed")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
            for orphan in descendants:
                if orphan.is_running():
                    orphan.kill()
        if self.postmaster is not None and self.postmaster.is_running():
            # serve stops it at exit; if serve was killed, it is stopped here (fast shutdown).
            try:
                self.postmaster.wait(timeout=STOP_TIMEOUT)
            except psutil.TimeoutExpired:
                self.postmaster.send_signal(signal.SIGINT)
                try:
                    self.postmaster.wait(timeout=STOP_TIMEOUT)
                except psutil.TimeoutExpired:
                    self.postmaster.kill()
        if not self.keep:
            shutil.rmtree(self.instance, ignore_errors=True)


def create_client(output: str) -> tuple[str, str]:
    """client_id=... and client_secret=... from `flask pubsub create-client`'s output."""
    found = dict(re.findall(r"\b(client_id|client_secret)\s*[=:]\s*(\S+)", output))
    if set(found) != {"client_id", "client_secret"}:
        raise AppError(f"create-client printed no client_id=/client_secret=:\n{output}")
    return found["client_id"], found["client_secret"]


def read_postmaster(pgdata: Path) -> tuple[psutil.Process, str]:
    """The embedded server's postmaster and a URL to it, from its postmaster.pid (without joining
    the server as the wheel's get_server would: that would keep it running after serve stops)."""
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    pid, port, socket_dir = int(lines[0]), lines[3].strip(), lines[4].strip()
    url = f"postgresql+psycopg://postgres@/postgres?host={socket_dir}&port={port}"
    return psutil.Process(pid), url
