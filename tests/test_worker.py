"""pubsub.worker: gthread serving a kept-alive connection's next request in the thread that
answered the last one, on a real gunicorn with one worker and two threads.

What must not change from gthread: more connections than threads are all served promptly,
pipelined requests are answered in order, closed connections free their thread, and the worker
stops promptly while its threads wait on idle connections.
"""

import http.client
import json
import re
import signal
import socket
import time

import pytest

from tests.test_serve import (
    QUICK_STOP,
    free_port,
    output_of,
    serve_env,
    serving,
    wait_for_exit,
    wait_until_live,
)

pytestmark = pytest.mark.slow

# A thread waits up to worker.LINGER_SECONDS (1 s) on an idle connection; a request that had to
# wait for it would take about that long. Served at once, it takes milliseconds.
PROMPT = 0.5


@pytest.fixture
def server(database_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(DATABASE_URL=database_url, API_PORT=str(port), API_NUM_WORKERS="1", API_NUM_THREADS="2")
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        yield port, process, log


def get(conn: http.client.HTTPConnection, path: str = "/liveness") -> tuple[int, float]:
    """A request on a kept-alive connection: its status and how long it took."""
    started = time.monotonic()
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response.status, time.monotonic() - started


def test_the_worker_is_gthread_serving_kept_alive_connections_in_their_thread(server):
    port, _, log = server
    assert "Using worker: pubsub.worker.ThreadWorker" in output_of(log)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        json = {"Content-Type": "application/json"}
        conn.request("POST", "/topics", body='{"id": "orders"}', headers=json)
        assert conn.getresponse().read()
        for n in range(50):
            conn.request("POST", "/topics/orders/messages", body=f'[{{"n": {n}}}]', headers=json)
            response = conn.getresponse()
            assert (response.status, response.read()) == (204, b"")
        status, _ = get(conn, "/topics/orders")
        assert status == 200
    finally:
        conn.close()


def test_more_connections_than_threads_are_all_served_promptly(server):
    port = server[0]
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(4)]
    try:
        # Each of the two threads now waits for its connection's next request...
        for conn in conns[:2]:
            assert get(conn)[0] == 200
        # ...and stops waiting when more connections than threads arrive.
        for conn in conns[2:]:
            status, took = get(conn)
            assert status == 200
            assert took < PROMPT
        for _ in range(3):
            for conn in conns:
                status, took = get(conn)
                assert status == 200
                assert took < PROMPT
    finally:
        for conn in conns:
            conn.close()


def test_pipelined_requests_are_all_answered_in_order(server):
    port = server[0]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET /liveness HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /readiness HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 ") == data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.index(b'"alive"') < data.index(b'"ready"') < data.rindex(b'"alive"')


def test_closed_connections_free_their_threads(server):
    port = server[0]
    for _ in range(10):  # five times as many connections as threads, one after the other
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        status, took = get(conn)
        conn.close()
        assert status == 200
        assert took < PROMPT
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /liveness HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.shutdown(socket.SHUT_WR)  # half-closed while its thread waits
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        status, took = get(conn)
        assert (status, took < PROMPT) == (200, True)
    finally:
        conn.close()


def test_the_worker_stops_promptly_while_its_threads_wait_on_idle_connections(server):
    port, process, log = server
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
    try:
        for conn in conns:
            assert get(conn)[0] == 200
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert wait_for_exit(process, log) == 0, output_of(log)
        assert time.monotonic() - started < QUICK_STOP
    finally:
        for conn in conns:
            conn.close()


# --- requests gunicorn refuses before the app sees them ------------------------------------------

# gunicorn's default limits: a request line of 4094 bytes, 100 header fields, 8190 bytes a field.
HEADERS_OVER_LIMIT = b"".join(b"X-Field-%d: 1\r\n" % n for n in range(101))


@pytest.fixture(scope="module")
def refusing_server(database_url, tmp_path_factory):
    """One server for every refused request (each on its own connection)."""
    port, log = free_port(), tmp_path_factory.mktemp("refusing") / "serve.log"
    env = serve_env(DATABASE_URL=database_url, API_PORT=str(port), API_NUM_WORKERS="1", API_NUM_THREADS="2")
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        yield port, log


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, id="malformed request line"),
        pytest.param(b"GET /liveness HTTP/9.9\r\nHost: x\r\n\r\n", 400, id="unknown HTTP version"),
        pytest.param(
            b"GET /" + b"a" * 4100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, id="request line over the limit"
        ),
        pytest.param(
            b"GET /liveness HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8200 + b"\r\n\r\n",
            431,
            id="header over the limit",
        ),
        pytest.param(
            b"GET /liveness HTTP/1.1\r\n" + HEADERS_OVER_LIMIT + b"\r\n", 431, id="too many headers"
        ),
        pytest.param(
            b"GET /liveness HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", 400, id="invalid header name"
        ),
        pytest.param(
            b"GET /liveness HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n", 400, id="NUL in a header"
        ),
    ],
)
def test_requests_gunicorn_refuses_are_answered_in_json(refusing_server, raw, status):
    port, log = refusing_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
    assert response.status == status, body
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Connection") == "close"
    assert re.fullmatch(r"[0-9a-f]{32}", response.getheader("X-Request-ID"))
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and detail
    # The worker carries on, and says why it refused, with the id the client got.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        assert get(conn)[0] == 200
    finally:
        conn.close()
    assert f"(X-Request-ID {response.getheader('X-Request-ID')})" in output_of(log)
    assert "Traceback" not in output_of(log)
