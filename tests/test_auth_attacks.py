"""Attacks on authentication (issue 5, scenario 9), with AUTH_ENABLED=true: forged, tampered and
stale tokens never get through, on any endpoint, and change nothing; and no client secret, access
token or AUTH_SECRET_KEY ever reaches the logs, in either format, at debug level, through the test
client, the development server or gunicorn.

test_auth.py already checks these tokens' 401 on GET /topics and on acks with an invalid body;
here every protected endpoint gets them, and every table is compared before and after.
"""

import http.client
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from werkzeug.serving import make_server

from pubsub import topics
from tests.auth_support import (
    ENDPOINTS,
    OTHER_KEY,
    SECRET_KEY,
    assert_unauthorized,
    bearer,
    new_client,
    token_request,
)
from tests.test_auth import b64url, basic, claims_of, resign, with_payload
from tests.test_hostile_input import TABLES, snapshot, table_rows
from tests.test_serve import free_port, output_of, serve_env, serving, wait_until_live

# --- forged and stale tokens ----------------------------------------------------------------------


def issued(auth_app, auth_client, scopes: str = "*") -> tuple[str, str]:
    """A new client with these scopes and a token it was really issued: (client id, token)."""
    client_id, secret = new_client(auth_app, scopes)
    response = token_request(auth_client, client_id, secret)
    assert response.status_code == 201, response.json
    return client_id, response.json["access_token"]


def with_header(token: str, **header) -> str:
    """The token's header replaced, its payload and signature kept."""
    _, payload, signature = token.split(".")
    return f"{b64url(json.dumps(header).encode())}.{payload}.{signature}"


def alg_none(token: str, spelling: str = "none", signature: bool = False) -> str:
    forged = with_header(token, alg=spelling, typ="JWT")
    return forged if signature else forged.rsplit(".", 1)[0] + "."


def revoked_by_update(auth_app, auth_client, client) -> str:
    client_id, token = issued(auth_app, auth_client)
    body = {"name": "test", "scopes": "*", "is_active": True}  # nothing changes but the version
    assert client.put(f"/clients/{client_id}", json=body).json["token_version"] == 2
    assert claims_of(token)["ver"] == 1
    return token


def revoked_by_deletion(auth_app, auth_client, client) -> str:
    client_id, token = issued(auth_app, auth_client)
    assert client.delete(f"/clients/{client_id}").status_code == 204
    return token


# Each makes a token an attacker could hold, claiming the `*` scope.
ATTACKS: dict[str, Callable] = {
    "alg none": lambda app, tc, c: alg_none(issued(app, tc)[1]),
    "alg none, signature kept": lambda app, tc, c: alg_none(issued(app, tc)[1], signature=True),
    "signed with a foreign key": lambda app, tc, c: resign(issued(app, tc)[1], OTHER_KEY),
    "tampered scope, original signature": lambda app, tc, c: with_payload(
        issued(app, tc, "topics:read")[1], scope="*"
    ),
    "older token_version than the client's": revoked_by_update,
    "deleted client": revoked_by_deletion,
}


def unauthorized_problem(response) -> str | None:
    try:
        assert_unauthorized(response)
    except AssertionError as error:
        return str(error).splitlines()[0]
    return None


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS)
def test_forged_and_stale_tokens_are_401_on_every_endpoint_and_change_nothing(
    auth_app, auth_client, client, engine, world, attack
):
    token = attack(auth_app, auth_client, client)
    first = snapshot(engine, client)
    problems = []
    for endpoint in ENDPOINTS:  # every protected endpoint, with a request `*` would allow
        before = table_rows(engine)
        response = endpoint.call(auth_client, world, token)
        if problem := unauthorized_problem(response):
            problems.append(f"{endpoint}: {problem}")
        if changed := [table for table in TABLES if table_rows(engine)[table] != before[table]]:
            problems.append(f"{endpoint}: changed the rows of {changed}")
    assert not problems, "\n".join(problems)
    assert snapshot(engine, client) == first  # with the metrics of both subscriptions


def create_backdoor(auth_client, token: str):
    """Create an admin client: what an attacker with a forged token would try first."""
    return auth_client.post("/clients", json={"name": "backdoor", "scopes": "*"}, headers=bearer(token))


@pytest.mark.parametrize("signature", [False, True], ids=["no signature", "signature kept"])
@pytest.mark.parametrize("spelling", ["none", "None", "NONE", "nOnE", ""])
def test_alg_none_in_any_spelling_is_401_and_changes_nothing(
    auth_app, auth_client, client, engine, spelling, signature
):
    forged = alg_none(issued(auth_app, auth_client)[1], spelling, signature)
    before = snapshot(engine, client)
    assert_unauthorized(create_backdoor(auth_client, forged))
    assert snapshot(engine, client) == before


@pytest.mark.parametrize(
    "key",
    [OTHER_KEY, SECRET_KEY[:-1], SECRET_KEY + "0", SECRET_KEY.upper(), SECRET_KEY.encode().hex()],
    ids=["another key", "the key less a byte", "the key and a byte", "the key upper-cased", "the key as hex"],
)
def test_tokens_signed_with_any_other_key_are_401_and_change_nothing(
    auth_app, auth_client, client, engine, key
):
    forged = resign(issued(auth_app, auth_client)[1], key)
    before = snapshot(engine, client)
    assert_unauthorized(create_backdoor(auth_client, forged))
    assert snapshot(engine, client) == before


def reencoded(token: str, **changes) -> str:
    """The payload re-serialized (compact, keys sorted) with some claims changed; the header and
    signature kept."""
    header, _, signature = token.split(".")
    claims = {**claims_of(token), **changes}
    return (
        f"{header}.{b64url(json.dumps(claims, separators=(',', ':'), sort_keys=True).encode())}.{signature}"
    )


TAMPERINGS = {
    "scope *": lambda token, admin_id: with_payload(token, scope="*"),
    "scope widened": lambda token, admin_id: with_payload(token, scope="topics:read clients:create"),
    "scope *, re-encoded compactly": lambda token, admin_id: reencoded(token, scope="*"),
    "another client's subject": lambda token, admin_id: with_payload(token, sub=admin_id),
    "same claims, re-encoded": lambda token, admin_id: reencoded(token),
    "payload with base64 padding": lambda token, admin_id: "{}.{}==.{}".format(*token.split(".")),
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS)
def test_tampered_claims_under_the_original_signature_are_401_and_change_nothing(
    auth_app, auth_client, client, engine, tamper
):
    admin_id, _ = issued(auth_app, auth_client, "*")
    _, weak = issued(auth_app, auth_client, "topics:read")
    forged = tamper(weak, admin_id)
    assert forged != weak
    before = snapshot(engine, client)
    assert_unauthorized(create_backdoor(auth_client, forged))
    assert snapshot(engine, client) == before
    # The control: the untampered token is genuine, and only lacks the scope.
    assert create_backdoor(auth_client, weak).status_code == 403


def test_a_stale_token_stays_refused_after_the_new_version_is_issued(auth_app, auth_client, client, engine):
    # The old token's text was verified (and remembered) before the update: that must not help it.
    client_id, secret = new_client(auth_app, "*")
    old = token_request(auth_client, client_id, secret).json["access_token"]
    assert auth_client.get("/topics", headers=bearer(old)).status_code == 200
    body = {"name": "t", "scopes": "*", "is_active": True}
    assert client.put(f"/clients/{client_id}", json=body).status_code == 200
    new = token_request(auth_client, client_id, secret).json["access_token"]
    assert auth_client.get("/topics", headers=bearer(new)).status_code == 200
    before = snapshot(engine, client)
    assert_unauthorized(create_backdoor(auth_client, old))
    assert snapshot(engine, client) == before


# --- secrets never reach the logs -----------------------------------------------------------------


@pytest.fixture
def restore_logging():
    """Debug logging and SQL echo install handlers on shared loggers: put them back afterwards."""
    names = (None, "sqlalchemy.engine.Engine", "werkzeug")
    saved = [(logger, logger.handlers[:], logger.level) for logger in map(logging.getLogger, names)]
    yield
    for logger, handlers, level in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def secret_forms(secrets: list[str]) -> set[str]:
    """Each secret, and the parts of it a log line might carry instead: a token's payload and
    signature, the base64 of HTTP Basic credentials."""
    forms = set()
    for secret in secrets:
        forms.add(secret)
        if secret.count(".") == 2:  # a JWT: its payload and signature (the header is no secret)
            forms.update(secret.split(".")[1:])
    return {form for form in forms if form}


def assert_no_secret_in(logs: str, secrets: list[str]) -> None:
    leaked = sorted(form for form in secret_forms(secrets) if form in logs)
    assert not leaked, f"leaked into the logs: {leaked}"


class Traffic:
    """Every way a secret travels through the API, against a server (test client or HTTP)."""

    def __init__(self, send: Callable, make_client: Callable[[str], tuple[str, str]]):
        self.send = send  # (method, path, body bytes | None, headers) -> (status, parsed body)
        self.make_client = make_client
        self.secrets: list[str] = [SECRET_KEY]

    def json_call(self, method: str, path: str, body=None, headers=None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})} if data else headers or {}
        return self.send(method, path, data, all_headers)

    def token(self, status: int, method: str, path: str, body=None, headers=None) -> str | None:
        got, answer = self.json_call(method, path, body, headers)
        assert got == status, (method, path, got, answer)
        if status == 201 and isinstance(answer, dict) and "access_token" in answer:
            self.secrets.append(answer["access_token"])
            return answer["access_token"]
        return None

    def run(self) -> None:
        admin_id, admin_secret = self.make_client("*")
        self.secrets.append(admin_secret)
        admin = self.token(
            201, "POST", "/oauth/token", {"client_id": admin_id, "client_secret": admin_secret}
        )

        # A client made through the API: its secret comes back in a response body.
        status, created = self.json_call("POST", "/clients", {"name": "svc", "scopes": "*"}, bearer(admin))
        assert status == 201, created
        svc_id, svc_secret = created["id"], created["secret"]
        self.secrets += [svc_secret, basic(svc_id, svc_secret).split(" ", 1)[1]]

        # Token exchanges: JSON, an OAuth2 form, HTTP Basic.
        svc = self.token(201, "POST", "/oauth/token", {"client_id": svc_id, "client_secret": svc_secret})
        form = f"grant_type=client_credentials&client_id={svc_id}&client_secret={svc_secret}".encode()
        status, answer = self.send(
            "POST", "/oauth/token", form, {"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert status == 201, answer
        self.secrets.append(answer["access_token"])
        basic_form = b"grant_type=client_credentials"
        status, answer = self.send(
            "POST",
            "/oauth/token",
            basic_form,
            {"Content-Type": "application/x-www-form-urlencoded", "Authorization": basic(svc_id, svc_secret)},
        )
        assert status == 201, answer
        self.secrets.append(answer["access_token"])

        # Failed logins: the attempted secrets are secrets too.
        wrong = "wrong-secret-" + svc_secret[::-1]
        self.secrets += [wrong, basic(svc_id, wrong).split(" ", 1)[1]]
        self.token(401, "POST", "/oauth/token", {"client_id": svc_id, "client_secret": wrong})
        self.token(401, "POST", "/oauth/token", {"client_id": admin_id, "client_secret": svc_secret})
        self.token(401, "POST", "/oauth/token", {"client_id": svc_secret, "client_secret": svc_secret})
        status, _ = self.send(
            "POST",
            "/oauth/token",
            f"grant_type=client_credentials&client_id={svc_id}&client_secret={wrong}".encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 401
        status, _ = self.send(
            "POST",
            "/oauth/token",
            basic_form,
            {"Content-Type": "application/x-www-form-urlencoded", "Authorization": basic(svc_id, wrong)},
        )
        assert status == 401
        status, _ = self.send("POST", "/oauth/token", b"{", {"Content-Type": "application/json"})
        assert status == 400

        # Authenticated requests through the whole message cycle.
        auth = bearer(svc)
        assert self.json_call("POST", "/topics", {"id": "orders"}, auth)[0] == 201
        assert self.json_call("POST", "/subscriptions", {"id": "sub", "topic_id": "orders"}, auth)[0] == 201
        assert self.json_call("POST", "/topics/orders/messages", [{"n": 1}], auth)[0] == 204
        status, consumed = self.json_call("GET", "/subscriptions/sub/messages?consumer_id=c", None, auth)
        assert status == 200
        assert self.json_call("POST", "/subscriptions/sub/acks", [consumed["data"][0]["id"]], auth)[0] == 204
        assert self.json_call("GET", "/topics/missing", None, auth)[0] == 404
        assert self.json_call("POST", "/topics", {"id": "bad id"}, auth)[0] == 422

        # Refused tokens: tampered, foreign, unsigned, expired, and finally revoked.
        for forged in (
            with_payload(svc, scope="*"),
            resign(svc, OTHER_KEY),
            alg_none(svc),
            resign(svc, exp=int(time.time()) - 60),
            svc[:-3],
        ):
            self.secrets.append(forged)
            assert self.json_call("GET", "/topics", None, bearer(forged))[0] == 401
        body = {"name": "svc", "scopes": "*", "is_active": True}
        assert self.json_call("PUT", f"/clients/{svc_id}", body, bearer(admin))[0] == 200
        assert self.json_call("GET", "/topics", None, auth)[0] == 401
        assert self.json_call("DELETE", f"/clients/{svc_id}", None, bearer(admin))[0] == 204
        assert self.json_call("POST", "/topics", {"id": "late"}, auth)[0] == 401


def in_process_send(test_client) -> Callable:
    def send(method, path, data, headers):
        response = test_client.open(path, method=method, data=data, headers=headers)
        return response.status_code, response.json if response.is_json else response.get_data(as_text=True)

    return send


def http_send(port: int) -> Callable:
    def send(method, path, data, headers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json and text else text

    return send


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_the_logs(make_app, capsys, restore_logging, monkeypatch, log_format):
    app = make_app(
        AUTH_ENABLED=True,
        AUTH_SECRET_KEY=SECRET_KEY,
        LOG_LEVEL="debug",
        LOG_FORMAT=log_format,
        DATABASE_ECHO=True,
    )
    traffic = Traffic(in_process_send(app.test_client()), lambda scopes: new_client(app, scopes))
    traffic.run()

    # An unexpected error in an authenticated request: its traceback is logged.
    _, token = issued(app, app.test_client())
    traffic.secrets.append(token)

    def explode(conn, topic_id):
        raise RuntimeError("boom")

    monkeypatch.setattr(topics, "get_topic", explode)
    assert app.test_client().get("/topics/orders", headers=bearer(token)).status_code == 500

    captured = capsys.readouterr()
    logs = captured.out + captured.err
    # The capture works: debug lines, SQL echo and the traceback are all in it.
    assert "INSERT INTO clients" in logs and "unhandled error" in logs and "RuntimeError: boom" in logs
    assert logging.getLogger().level == logging.DEBUG
    if log_format == "json":  # stdout has SQLAlchemy's own echo handler; stderr is the app's
        events = [json.loads(line) for line in captured.err.splitlines() if line.strip()]
        assert {"info", "error"} <= {event["level"] for event in events}
    assert_no_secret_in(logs, traffic.secrets)


@contextmanager
def development_server(app) -> Iterator[int]:
    """The app under Werkzeug's development server (what `flask run` serves), which logs a line
    per request; its port."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_no_secret_reaches_the_development_servers_request_log(make_app, capsys, restore_logging):
    # Made in the test, not in a fixture: its log handler writes to the stream capsys reads now.
    app = make_app(AUTH_ENABLED=True, AUTH_SECRET_KEY=SECRET_KEY, LOG_LEVEL="debug")
    with development_server(app) as port:
        traffic = Traffic(http_send(port), lambda scopes: new_client(app, scopes))
        traffic.run()
    captured = capsys.readouterr()
    logs = captured.out + captured.err
    assert "POST /oauth/token HTTP/1.1" in logs and "GET /topics HTTP/1.1" in logs
    assert_no_secret_in(logs, traffic.secrets)


@pytest.mark.slow
def test_no_secret_reaches_gunicorn_logs_at_debug_level(auth_app, database_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(
        DATABASE_URL=database_url,
        API_PORT=str(port),
        API_NUM_WORKERS="1",
        API_NUM_THREADS="2",
        AUTH_ENABLED="true",
        AUTH_SECRET_KEY=SECRET_KEY,
        LOG_LEVEL="debug",
        LOG_FORMAT="json",
        DATABASE_ECHO="true",
    )
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        traffic = Traffic(http_send(port), lambda scopes: new_client(auth_app, scopes))
        traffic.run()
    logs = output_of(log)
    # gunicorn logs each request's method and path at debug level; SQL echo is on too.
    assert "POST /oauth/token" in logs and "INSERT INTO topics" in logs
    assert_no_secret_in(logs, traffic.secrets)
