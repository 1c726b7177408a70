"""Authentication (SPEC §4): tokens, what makes one invalid, revocation, the token endpoint,
the settings and commands around them, and the OpenAPI document.

The scope matrix is in test_auth_scopes.py and the clients CRUD in test_auth_clients.py; the
fixtures they share are in auth_support.py (loaded by conftest). Objects are arranged through the domain
functions or the auth-off app (`client`, `api`), which shares the database with the auth-on app.
"""

import base64
import json
import logging
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jwt
import pytest

from pubsub.settings import ConfigError
from tests.auth_support import (
    ENDPOINTS,
    EXPIRE_MINUTES,
    OTHER_KEY,
    SECRET_KEY,
    assert_unauthorized,
    bearer,
    new_client,
    token_request,
)
from tests.test_hostile_input import table_rows
from tests.test_serve import serve_env, serve_refused

# The shared fixtures.

PROJECT_ROOT = Path(__file__).resolve().parent.parent
UUID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def resign(token: str, key: str = SECRET_KEY, algorithm: str = "HS256", **changes) -> str:
    """The token's claims with some changed, signed again (with the real key unless told)."""
    return jwt.encode({**claims_of(token), **changes}, key, algorithm=algorithm)


def with_payload(token: str, **changes) -> str:
    """The payload edited, the header and signature kept: what a tamperer can do without the key."""
    header, _, signature = token.split(".")
    payload = b64url(json.dumps({**claims_of(token), **changes}).encode())
    return f"{header}.{payload}.{signature}"


def resign_without(token: str, *names: str, **changes) -> str:
    claims = {name: value for name, value in claims_of(token).items() if name not in names}
    return jwt.encode({**claims, **changes}, SECRET_KEY, algorithm="HS256")


def unsigned(token: str) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{token.split('.')[1]}."


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- auth off (the default) ---------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_auth_is_off_by_default_and_every_endpoint_answers_without_a_token(app, client, world, endpoint):
    assert app.config["AUTH_ENABLED"] is False
    response = endpoint.call(client, world)
    assert response.status_code == endpoint.status, response.get_data(as_text=True)


def test_auth_off_ignores_any_authorization_header(client, api):
    api.create_topic("orders")
    for header in ("Bearer garbage", "Basic Zm9vOmJhcg==", "Token x"):
        response = client.get("/topics/orders", headers={"Authorization": header})
        assert response.status_code == 200, (header, response.json)


def test_token_endpoint_without_a_signing_key_answers_400_with_a_detail(app, client):
    assert app.config["AUTH_SECRET_KEY"] is None
    client_id, secret = new_client(app, "*")
    response = token_request(client, client_id, secret)
    assert response.status_code == 400
    assert list(response.json) == ["detail"]
    assert "AUTH_SECRET_KEY" in response.json["detail"]


def test_auth_off_with_a_key_issues_tokens_that_no_endpoint_needs(make_app):
    app = make_app(AUTH_SECRET_KEY=SECRET_KEY)
    client = app.test_client()
    client_id, secret = new_client(app, "topics:read")
    response = token_request(client, client_id, secret)
    assert response.status_code == 201, response.json
    assert client.post("/topics", json={"id": "orders"}).status_code == 201


# --- which endpoints need a token ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/liveness", "/readiness", "/metrics", "/docs", "/redoc", "/openapi.json"])
def test_open_endpoints_need_no_token(auth_client, path):
    response = auth_client.get(path)
    assert response.status_code == 200


def test_token_endpoint_needs_no_token(auth_app, auth_client):
    client_id, secret = new_client(auth_app, "topics:read")
    assert token_request(auth_client, client_id, secret).status_code == 201


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_every_protected_endpoint_without_a_token_is_401(auth_client, endpoint):
    # Ids that exist or not, bodies valid or not: the token is checked first.
    response = endpoint.call(auth_client, client_id=str(uuid.uuid4()))
    assert_unauthorized(response)
    assert response.json["detail"] == "missing bearer token"


def test_no_token_is_401_before_the_body_is_looked_at(auth_client):
    for method, path, body in [
        ("POST", "/topics", {"id": "bad id!"}),
        ("POST", "/topics/orders/messages", "not an array"),
        ("POST", "/subscriptions/sub/acks", ["not a uuid"]),
        ("GET", "/clients/not-a-uuid", None),
    ]:
        assert_unauthorized(auth_client.open(path, method=method, json=body))
    assert_unauthorized(auth_client.post("/topics", data="{malformed", content_type="application/json"))


# --- invalid tokens ------------------------------------------------------------------------------

BAD_AUTHORIZATION = {
    "empty header": lambda token: "",
    "scheme only": lambda token: "Bearer",
    "scheme and spaces": lambda token: "Bearer   ",
    "another scheme": lambda token: f"Token {token}",
    "basic credentials": lambda token: basic("client", "secret"),
    "token without scheme": lambda token: token,
    "two tokens": lambda token: f"Bearer {token} {token}",
    "garbage": lambda token: "Bearer not-a-jwt",
    "three garbage segments": lambda token: "Bearer a.b.c",
    "not base64": lambda token: "Bearer ###.$$$.%%%",
    "non-ascii": lambda token: "Bearer \u00e9\u00e8.\u00e0.\u00fc",
    "truncated signature": lambda token: f"Bearer {token[:-6]}",
    "no signature": lambda token: f"Bearer {token.rsplit('.', 1)[0]}.",
    "alg none": lambda token: f"Bearer {unsigned(token)}",
    "signed with another key": lambda token: f"Bearer {resign(token, OTHER_KEY)}",
    "HS512 with the real key": lambda token: f"Bearer {resign(token, algorithm='HS512')}",
    "tampered scope": lambda token: f"Bearer {with_payload(token, scope='*')}",
    "tampered version": lambda token: f"Bearer {with_payload(token, ver=claims_of(token)['ver'] + 1)}",
    "tampered expiry": lambda token: f"Bearer {with_payload(token, exp=claims_of(token)['exp'] + 3600)}",
    "expired": lambda token: f"Bearer {resign(token, exp=int(time.time()) - 60)}",
    "not yet valid": lambda token: f"Bearer {resign(token, nbf=int(time.time()) + 600)}",
    "refresh token": lambda token: f"Bearer {resign(token, type='refresh')}",
    "unknown client": lambda token: f"Bearer {resign(token, sub=str(uuid.uuid4()))}",
    "subject not a uuid": lambda token: f"Bearer {resign(token, sub='admin')}",
    "version not a number": lambda token: f"Bearer {resign(token, ver='1')}",
    "no version": lambda token: f"Bearer {resign_without(token, 'ver')}",
    "no version, unknown client": lambda token: (
        f"Bearer {resign_without(token, 'ver', sub=str(uuid.uuid4()))}"
    ),
    "no subject": lambda token: f"Bearer {resign_without(token, 'sub')}",
    "no expiry": lambda token: f"Bearer {resign_without(token, 'exp')}",
}


@pytest.mark.parametrize("kind", BAD_AUTHORIZATION)
def test_invalid_tokens_are_401_never_422_or_500(auth_client, token_for, kind):
    headers = {"Authorization": BAD_AUTHORIZATION[kind](token_for("*"))}
    assert_unauthorized(auth_client.get("/topics", headers=headers))
    # Checked before the body: an invalid one is still a 401, not a 422.
    acks = auth_client.post("/subscriptions/missing/acks", json=["not a uuid"], headers=headers)
    assert_unauthorized(acks)


def test_the_untampered_token_works(auth_client, token_for):
    # The control for the cases above: the same token, as issued, is accepted.
    token = token_for("*")
    assert auth_client.get("/topics", headers=bearer(token)).status_code == 200


def test_an_expired_token_says_so(auth_client, token_for):
    token = resign(token_for("*"), exp=int(time.time()) - 1)
    response = auth_client.get("/topics", headers=bearer(token))
    assert_unauthorized(response)
    assert response.json["detail"] == "token has expired"


def test_a_token_of_an_app_with_another_key_is_401(make_app, auth_client):
    other = make_app(AUTH_ENABLED=True, AUTH_SECRET_KEY=OTHER_KEY)
    client_id, secret = new_client(other, "*")  # the same database: only the key differs
    token = token_request(other.test_client(), client_id, secret).json["access_token"]
    assert other.test_client().get("/topics", headers=bearer(token)).status_code == 200
    assert_unauthorized(auth_client.get("/topics", headers=bearer(token)))


def test_the_configured_algorithm_signs_and_only_it_verifies(make_app):
    app = make_app(AUTH_ENABLED=True, AUTH_SECRET_KEY=SECRET_KEY, AUTH_ALGORITHM="HS512")
    client = app.test_client()
    client_id, secret = new_client(app, "*")
    token = token_request(client, client_id, secret).json["access_token"]
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    assert client.get("/topics", headers=bearer(token)).status_code == 200
    assert_unauthorized(client.get("/topics", headers=bearer(resign(token, algorithm="HS256"))))


# --- revocation ----------------------------------------------------------------------------------


def test_update_revokes_earlier_tokens_at_once_and_new_tokens_work(auth_app, auth_client, client):
    client_id, secret = new_client(auth_app, "topics:read")
    old = token_request(auth_client, client_id, secret).json["access_token"]
    assert auth_client.get("/topics", headers=bearer(old)).status_code == 200

    body = {"name": "reader", "scopes": "topics:read topics:create", "is_active": True}
    assert client.put(f"/clients/{client_id}", json=body).status_code == 200

    response = auth_client.get("/topics", headers=bearer(old))
    assert_unauthorized(response)
    assert response.json["detail"] == "token has been revoked"
    new = token_request(auth_client, client_id, secret)
    assert new.json["scope"] == "topics:read topics:create"
    assert auth_client.get("/topics", headers=bearer(new.json["access_token"])).status_code == 200
    created = auth_client.post("/topics", json={"id": "orders"}, headers=bearer(new.json["access_token"]))
    assert created.status_code == 201


def test_an_update_that_changes_nothing_still_revokes(auth_app, auth_client, client):
    client_id, secret = new_client(auth_app, "topics:read", name="reader")
    token = token_request(auth_client, client_id, secret).json["access_token"]
    body = {"name": "reader", "scopes": "topics:read", "is_active": True}
    assert client.put(f"/clients/{client_id}", json=body).status_code == 200
    assert_unauthorized(auth_client.get("/topics", headers=bearer(token)))


def test_deactivation_revokes_tokens_and_refuses_new_ones(auth_app, auth_client, client):
    client_id, secret = new_client(auth_app, "topics:read")
    token = token_request(auth_client, client_id, secret).json["access_token"]
    body = {"name": "reader", "scopes": "topics:read", "is_active": False}
    assert client.put(f"/clients/{client_id}", json=body).status_code == 200
    assert_unauthorized(auth_client.get("/topics", headers=bearer(token)))
    assert token_request(auth_client, client_id, secret).status_code == 401

    body["is_active"] = True
    assert client.put(f"/clients/{client_id}", json=body).status_code == 200
    assert_unauthorized(auth_client.get("/topics", headers=bearer(token)))  # still the old version
    again = token_request(auth_client, client_id, secret).json["access_token"]
    assert auth_client.get("/topics", headers=bearer(again)).status_code == 200


def test_deletion_revokes_tokens_and_refuses_new_ones(auth_app, auth_client, client):
    client_id, secret = new_client(auth_app, "topics:read")
    token = token_request(auth_client, client_id, secret).json["access_token"]
    assert client.delete(f"/clients/{client_id}").status_code == 204
    assert_unauthorized(auth_client.get("/topics", headers=bearer(token)))
    assert token_request(auth_client, client_id, secret).status_code == 401


def test_revocation_through_the_protected_api_itself(auth_client, token_for):
    admin = bearer(token_for("*"))
    created = auth_client.post("/clients", json={"name": "svc", "scopes": "topics:read"}, headers=admin)
    assert created.status_code == 201
    client_id, secret = created.json["id"], created.json["secret"]
    token = bearer(token_request(auth_client, client_id, secret).json["access_token"])
    assert auth_client.get("/topics", headers=token).status_code == 200
    body = {"name": "svc", "scopes": "topics:read", "is_active": False}
    assert auth_client.put(f"/clients/{client_id}", json=body, headers=admin).status_code == 200
    assert_unauthorized(auth_client.get("/topics", headers=token))


def test_a_client_that_revokes_itself_loses_its_token(auth_app, auth_client):
    client_id, secret = new_client(auth_app, "clients:update topics:read")
    token = bearer(token_request(auth_client, client_id, secret).json["access_token"])
    body = {"name": "self", "scopes": "clients:update topics:read", "is_active": True}
    assert auth_client.put(f"/clients/{client_id}", json=body, headers=token).status_code == 200
    assert_unauthorized(auth_client.get("/topics", headers=token))


def test_revoking_one_client_leaves_other_clients_tokens_alone(auth_app, auth_client, client):
    first_id, first_secret = new_client(auth_app, "topics:read")
    second_id, second_secret = new_client(auth_app, "topics:read")
    first = bearer(token_request(auth_client, first_id, first_secret).json["access_token"])
    second = bearer(token_request(auth_client, second_id, second_secret).json["access_token"])
    assert client.delete(f"/clients/{first_id}").status_code == 204
    assert_unauthorized(auth_client.get("/topics", headers=first))
    assert auth_client.get("/topics", headers=second).status_code == 200


def test_two_tokens_of_one_client_both_work_until_an_update(auth_app, auth_client, client):
    client_id, secret = new_client(auth_app, "topics:read")
    tokens = [bearer(token_request(auth_client, client_id, secret).json["access_token"]) for _ in range(2)]
    for token in tokens:
        assert auth_client.get("/topics", headers=token).status_code == 200
    body = {"name": "reader", "scopes": "topics:read", "is_active": True}
    assert client.put(f"/clients/{client_id}", json=body).status_code == 200
    for token in tokens:
        assert_unauthorized(auth_client.get("/topics", headers=token))


# The consumer's requests check revocation in their own statement (messages.GATE): each kind of
# each of them, after each kind of revocation. (method, path, body, query, headers), for the
# message the consumer holds.
PREFER = {"Prefer": "return=representation"}
SUB = "/subscriptions/sub"
CONSUMER_REQUESTS = {
    "consume": lambda m: ("GET", f"{SUB}/messages", None, {"consumer_id": "c"}, {}),
    "long-poll consume": lambda m: (
        "GET",
        f"{SUB}/messages",
        None,
        {"consumer_id": "c", "wait_seconds": 1},
        {},
    ),
    "ack": lambda m: ("POST", f"{SUB}/acks", [m["id"]], {}, {}),
    "ack by ack_id": lambda m: ("POST", f"{SUB}/acks", [m["ack_id"]], {}, {}),
    "ack with outcomes": lambda m: ("POST", f"{SUB}/acks", [m["id"]], {}, PREFER),
    "ack of nothing": lambda m: ("POST", f"{SUB}/acks", [], {}, {}),
    "nack": lambda m: ("POST", f"{SUB}/nacks", [m["id"]], {}, {}),
    "nack of nothing": lambda m: ("POST", f"{SUB}/nacks", [], {}, {}),
    "extend": lambda m: ("POST", f"{SUB}/extend", [m["ack_id"]], {"seconds": 600}, {}),
}
CONSUMER = {"name": "c", "scopes": "subscriptions:consume:sub"}
REVOKE = {
    "deleted": lambda client, client_id: client.delete(f"/clients/{client_id}"),
    "deactivated": lambda client, client_id: client.put(
        f"/clients/{client_id}", json={**CONSUMER, "is_active": False}
    ),
    "updated": lambda client, client_id: client.put(
        f"/clients/{client_id}", json={**CONSUMER, "is_active": True}
    ),
}


@pytest.mark.parametrize("revoke", REVOKE.values(), ids=REVOKE)
@pytest.mark.parametrize("request_of", CONSUMER_REQUESTS.values(), ids=CONSUMER_REQUESTS)
def test_a_consumer_whose_token_is_revoked_is_refused_at_its_next_request_and_changes_nothing(
    auth_app, auth_client, client, api, engine, request_of, revoke
):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    client_id, secret = new_client(auth_app, CONSUMER["scopes"])
    token = bearer(token_request(auth_client, client_id, secret).json["access_token"])
    consumed = auth_client.get(f"{SUB}/messages?consumer_id=c&batch_size=1", headers=token)
    assert consumed.status_code == 200, consumed.json
    assert revoke(client, client_id).status_code in (200, 204)
    before = table_rows(engine)
    method, path, body, query, headers = request_of(consumed.json["data"][0])
    response = auth_client.open(
        path, method=method, json=body, query_string=query, headers={**token, **headers}
    )
    assert_unauthorized(response)
    assert response.json["detail"] == "token has been revoked"
    assert table_rows(engine) == before  # nothing claimed, acked, nacked or extended


# --- POST /oauth/token ---------------------------------------------------------------------------


def test_token_from_json_credentials(auth_app, auth_client):
    client_id, secret = new_client(auth_app, "topics:publish:orders  subscriptions:read")
    response = token_request(auth_client, client_id, secret)
    assert response.status_code == 201
    body = response.json
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == EXPIRE_MINUTES * 60
    assert body["scope"] == "topics:publish:orders subscriptions:read"

    claims = jwt.decode(body["access_token"], SECRET_KEY, algorithms=["HS256"])
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    assert claims["sub"] == client_id
    assert claims["scope"] == body["scope"]
    assert claims["ver"] == 1
    assert claims["exp"] - claims["iat"] == EXPIRE_MINUTES * 60
    assert abs(claims["iat"] - time.time()) < 60


def test_token_from_an_oauth2_form(auth_app, auth_client):
    client_id, secret = new_client(auth_app, "topics:read")
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    response = auth_client.post("/oauth/token", data=form)
    assert response.status_code == 201, response.json
    assert response.json["token_type"] == "Bearer"
    assert auth_client.get("/topics", headers=bearer(response.json["access_token"])).status_code == 200


def test_token_from_http_basic_credentials_as_swagger_ui_sends_them(auth_app, auth_client):
    client_id, secret = new_client(auth_app, "topics:read")
    response = auth_client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": basic(client_id, secret)},
    )
    assert response.status_code == 201, response.json
    assert auth_client.get("/topics", headers=bearer(response.json["access_token"])).status_code == 200


def test_a_new_token_carries_the_current_token_version(auth_app, auth_client, client):
    client_id, secret = new_client(auth_app, "topics:read")
    for _ in range(2):
        body = {"name": "reader", "scopes": "topics:read", "is_active": True}
        assert client.put(f"/clients/{client_id}", json=body).status_code == 200
    token = token_request(auth_client, client_id, secret).json["access_token"]
    assert claims_of(token)["ver"] == 3


def test_every_bad_credential_gets_the_same_401(auth_app, auth_client):
    client_id, secret = new_client(auth_app, "*")
    inactive_id, inactive_secret = new_client(auth_app, "*", is_active=False)
    attempts = {
        "wrong secret": {"json": {"client_id": client_id, "client_secret": "0" * 64}},
        "empty secret": {"json": {"client_id": client_id, "client_secret": ""}},
        "another client's secret": {"json": {"client_id": inactive_id, "client_secret": secret}},
        "unknown client": {"json": {"client_id": str(uuid.uuid4()), "client_secret": secret}},
        "client id not a uuid": {"json": {"client_id": "admin", "client_secret": secret}},
        "inactive client": {"json": {"client_id": inactive_id, "client_secret": inactive_secret}},
        "wrong secret in a form": {
            "data": {"grant_type": "client_credentials", "client_id": client_id, "client_secret": "x"}
        },
        "wrong secret in basic": {"headers": {"Authorization": basic(client_id, "x")}},
        "basic not base64": {"headers": {"Authorization": "Basic %%%"}},
        "basic not utf-8": {"headers": {"Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()}},
    }
    answers = {}
    for name, request in attempts.items():
        response = auth_client.post("/oauth/token", **request)
        answers[name] = (
            response.status_code,
            response.get_data(as_text=True),
            response.headers["WWW-Authenticate"],
        )
    assert len(set(answers.values())) == 1, answers  # byte for byte: nothing tells the cases apart
    status, text, challenge = answers["wrong secret"]
    assert (status, json.loads(text), challenge) == (401, {"detail": "invalid client credentials"}, "Bearer")
    assert token_request(auth_client, client_id, secret).status_code == 201  # the control


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"json": {}},
        {"json": {"client_id": "00000000-0000-0000-0000-000000000000"}},
        {"json": {"client_secret": "x"}},
        {"json": {"client_id": 1, "client_secret": "x"}},
        {"json": {"client_id": "x", "client_secret": None}},
        {"json": ["client_id", "client_secret"]},
        {"data": {"grant_type": "client_credentials", "client_id": "x"}},
        {"data": {"grant_type": "client_credentials"}},
    ],
    ids=["empty", "no secret", "no id", "id not a string", "secret null", "array", "form no secret", "form"],
)
def test_token_request_with_missing_fields_is_422(auth_client, request_kwargs):
    response = auth_client.post("/oauth/token", **request_kwargs)
    assert response.status_code == 422, response.json
    assert response.json["detail"]


def test_token_request_with_malformed_json_is_400(auth_client):
    response = auth_client.post("/oauth/token", data="{", content_type="application/json")
    assert response.status_code == 400
    assert response.json["detail"]


@pytest.mark.parametrize("channel", ["json", "form", "basic"])
@pytest.mark.parametrize("grant_type", ["password", "authorization_code", ""])
def test_grant_types_other_than_client_credentials_are_refused(auth_app, auth_client, channel, grant_type):
    client_id, secret = new_client(auth_app, "*")
    fields = {"grant_type": grant_type, "client_id": client_id, "client_secret": secret}
    if channel == "json":
        response = auth_client.post("/oauth/token", json=fields)
    elif channel == "form":
        response = auth_client.post("/oauth/token", data=fields)
    else:
        response = auth_client.post(
            "/oauth/token",
            data={"grant_type": grant_type},
            headers={"Authorization": basic(client_id, secret)},
        )
    assert 400 <= response.status_code < 500 and response.status_code != 401, response.json
    assert "grant_type" in response.json["detail"]


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", [None, "", "k" * 31, "é" * 15], ids=["unset", "empty", "31 bytes", "15 two-byte chars"]
)
def test_auth_on_without_a_long_enough_key_refuses_to_start(make_app, key):
    with pytest.raises(ConfigError, match="PUBSUB_AUTH_SECRET_KEY") as raised:
        make_app(AUTH_ENABLED=True, AUTH_SECRET_KEY=key)
    message = str(raised.value)
    assert "\n" not in message
    if key:
        assert key not in message


@pytest.mark.parametrize(("algorithm", "min_bytes"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_the_key_must_be_as_long_as_the_algorithms_hash(make_app, algorithm, min_bytes):
    # RFC 7518 §3.2; PyJWT warns about every shorter key. (HS512 with 64 bytes works: see above.)
    with pytest.raises(ConfigError, match=f"PUBSUB_AUTH_SECRET_KEY must be set, at least {min_bytes} bytes"):
        make_app(AUTH_ENABLED=True, AUTH_ALGORITHM=algorithm, AUTH_SECRET_KEY="k" * (min_bytes - 1))


def test_a_32_byte_key_is_enough_for_hs256(make_app):
    app = make_app(AUTH_ENABLED=True, AUTH_SECRET_KEY="k" * 32)
    client_id, secret = new_client(app, "topics:read")
    token = token_request(app.test_client(), client_id, secret).json["access_token"]
    assert app.test_client().get("/topics", headers=bearer(token)).status_code == 200


def test_auth_settings_come_from_the_environment(make_app, monkeypatch):
    monkeypatch.setenv("PUBSUB_AUTH_ENABLED", "true")
    with pytest.raises(ConfigError, match="PUBSUB_AUTH_SECRET_KEY"):
        make_app()
    monkeypatch.setenv("PUBSUB_AUTH_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("PUBSUB_AUTH_ACCESS_TOKEN_EXPIRE_MINUTES", "7")
    app = make_app()
    client_id, secret = new_client(app, "*")
    response = token_request(app.test_client(), client_id, secret)
    assert response.json["expires_in"] == 7 * 60
    assert_unauthorized(app.test_client().get("/topics"))


@pytest.mark.parametrize("key", [None, "short-key-that-must-not-leak"], ids=["no key", "short key"])
def test_serve_with_auth_on_and_no_usable_key_exits_with_one_line(database_url, tmp_path, key):
    settings = {"AUTH_ENABLED": "true", "DATABASE_URL": database_url, "INSTANCE_PATH": str(tmp_path)}
    if key:
        settings["AUTH_SECRET_KEY"] = key
    result = serve_refused(**settings)
    assert "PUBSUB_AUTH_SECRET_KEY" in result.stderr
    if key:
        assert key not in result.stderr + result.stdout


# --- commands ------------------------------------------------------------------------------------


def test_generate_secret_key_prints_one_line_of_64_hex_characters(runner):
    first = runner.invoke(args=["pubsub", "generate-secret-key"])
    second = runner.invoke(args=["pubsub", "generate-secret-key"])
    assert first.exit_code == 0, first.output
    assert re.fullmatch(r"new_secret=[0-9a-f]{64}\n", first.output)
    assert first.output != second.output


def test_a_generated_key_is_accepted_by_auth(runner, make_app):
    key = runner.invoke(args=["pubsub", "generate-secret-key"]).output.strip().removeprefix("new_secret=")
    assert make_app(AUTH_ENABLED=True, AUTH_SECRET_KEY=key).config["AUTH_ENABLED"] is True


def parse_credentials(output: str) -> tuple[str, str]:
    lines = output.splitlines()
    assert len(lines) == 2, output
    assert lines[0].startswith("client_id=") and lines[1].startswith("client_secret=")
    client_id = lines[0].removeprefix("client_id=")
    secret = lines[1].removeprefix("client_secret=")
    assert UUID_PATTERN.match(client_id)
    assert re.fullmatch(r"[0-9a-f]{64}", secret)
    return client_id, secret


def test_create_client_prints_credentials_that_get_a_token(runner, auth_client, client):
    result = runner.invoke(args=["pubsub", "create-client", "Admin", "*"])
    assert result.exit_code == 0, result.output
    client_id, secret = parse_credentials(result.output)
    response = token_request(auth_client, client_id, secret)
    assert response.status_code == 201
    assert response.json["scope"] == "*"
    assert auth_client.get("/clients", headers=bearer(response.json["access_token"])).status_code == 200
    shown = client.get(f"/clients/{client_id}").json
    assert (shown["name"], shown["scopes"], shown["is_active"]) == ("Admin", "*", True)


def test_create_client_takes_several_scopes_in_one_argument(runner, auth_client):
    result = runner.invoke(args=["pubsub", "create-client", "svc", "topics:publish:orders  topics:read"])
    client_id, secret = parse_credentials(result.output)
    assert token_request(auth_client, client_id, secret).json["scope"] == "topics:publish:orders topics:read"


def test_create_client_inactive_cannot_get_a_token(runner, auth_client, client):
    result = runner.invoke(args=["pubsub", "create-client", "later", "*", "--inactive"])
    assert result.exit_code == 0, result.output
    client_id, secret = parse_credentials(result.output)
    assert token_request(auth_client, client_id, secret).status_code == 401
    assert client.get(f"/clients/{client_id}").json["is_active"] is False


@pytest.mark.parametrize(
    "scopes",
    ["topics:write", "", "admin", "clients:read:x", "topics:publish:bad/id", "topics:create:orders"],
)
def test_create_client_with_bad_scopes_exits_2_and_creates_nothing(runner, client, scopes):
    result = runner.invoke(args=["pubsub", "create-client", "svc", scopes])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert client.get("/clients").json["data"] == []


def test_create_client_with_bad_scopes_from_the_shell_prints_one_line(database_url, tmp_path):
    env = serve_env(DATABASE_URL=database_url, INSTANCE_PATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "flask", "pubsub", "create-client", "svc", "topics:write"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "topics:write" in lines[0]


# --- OpenAPI -------------------------------------------------------------------------------------

OPEN_OPERATIONS = {("get", "/liveness"), ("get", "/readiness"), ("post", "/oauth/token")}


def spec_operations(spec: dict) -> dict[tuple[str, str], dict]:
    methods = ("get", "put", "post", "delete", "patch")
    return {
        (method, path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in methods
    }


def test_openapi_documents_security_on_exactly_the_protected_operations(auth_client):
    operations = spec_operations(auth_client.get("/openapi.json").json)
    protected = {(e.method.lower(), e.path) for e in ENDPOINTS}
    # The scope matrix covers every operation: a new endpoint must join it (or OPEN_OPERATIONS).
    assert set(operations) == protected | OPEN_OPERATIONS
    for key, operation in operations.items():
        if key in OPEN_OPERATIONS:
            assert "security" not in operation, key
            assert "403" not in operation["responses"], key
        else:
            assert operation["security"] == [{"bearerAuth": []}, {"oauth2": []}], key
            assert {"401", "403"} <= set(operation["responses"]), key
    assert "401" not in operations[("get", "/liveness")]["responses"]
    assert "401" in operations[("post", "/oauth/token")]["responses"]


def test_openapi_with_auth_off_says_nothing_of_tokens(client):
    spec = client.get("/openapi.json").json
    assert "securitySchemes" not in spec.get("components", {})
    for key, operation in spec_operations(spec).items():
        assert "security" not in operation, key
        assert "403" not in operation["responses"], key
        if key != ("post", "/oauth/token"):  # wrong client credentials: a 401 whether auth is on or off
            assert "401" not in operation["responses"], key


def test_openapi_declares_the_bearer_and_client_credentials_schemes(auth_client):
    schemes = auth_client.get("/openapi.json").json["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["type"] == "http"
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    assert schemes["oauth2"]["type"] == "oauth2"
    assert schemes["oauth2"]["flows"]["clientCredentials"]["tokenUrl"] == "/oauth/token"


def test_openapi_documents_the_token_request_as_json_and_as_a_form(auth_client):
    operation = auth_client.get("/openapi.json").json["paths"]["/oauth/token"]["post"]
    assert {"application/json", "application/x-www-form-urlencoded"} <= set(
        operation["requestBody"]["content"]
    )
    assert "201" in operation["responses"]


# --- secrets stay out of the logs ----------------------------------------------------------------


@pytest.fixture
def restore_logging():
    """Debug logging and SQL echo install handlers on shared loggers: put them back afterwards."""
    root, engine_logger = logging.getLogger(), logging.getLogger("sqlalchemy.engine.Engine")
    saved = [(logger, logger.handlers[:], logger.level) for logger in (root, engine_logger)]
    yield
    for logger, handlers, level in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def test_secrets_and_tokens_never_reach_the_logs(make_app, capsys, restore_logging):
    app = make_app(AUTH_ENABLED=True, AUTH_SECRET_KEY=SECRET_KEY, LOG_LEVEL="debug", DATABASE_ECHO=True)
    client = app.test_client()
    admin_id, admin_secret = new_client(app, "*")
    token = token_request(client, admin_id, admin_secret).json["access_token"]
    created = client.post("/clients", json={"name": "svc", "scopes": "*"}, headers=bearer(token))
    assert created.status_code == 201
    secret = created.json["secret"]
    svc_token = token_request(client, created.json["id"], secret).json["access_token"]
    token_request(client, created.json["id"], secret[::-1])  # a failed attempt logs nothing of it
    client.get("/topics", headers=bearer(svc_token))
    client.get("/topics", headers=bearer(svc_token[:-2]))
    body = {"name": "svc", "scopes": "*", "is_active": False}
    assert client.put(f"/clients/{created.json['id']}", json=body, headers=bearer(token)).status_code == 200

    captured = capsys.readouterr()
    logs = captured.out + captured.err
    assert "INSERT INTO clients" in logs  # the capture works: SQL echo and debug logs are in it
    for value in (admin_secret, secret, secret[::-1], token, svc_token, SECRET_KEY):
        assert value not in logs


@pytest.mark.parametrize("name", ["", "x" * 256])
def test_create_client_with_a_bad_name_exits_2_and_creates_nothing(runner, client, name):
    result = runner.invoke(args=["pubsub", "create-client", name, "*"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("Error: ")
    assert client.get("/clients").json["data"] == []


@pytest.mark.parametrize("scope_claim", [["*"], {"*": True}, 42, None])
def test_a_validly_signed_token_with_a_non_string_scope_is_403_not_500(auth_client, token_for, scope_claim):
    token = resign(token_for("*"), scope=scope_claim)
    response = auth_client.get("/topics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert "detail" in response.json


def test_a_token_already_seen_still_expires(auth_client, token_for):
    # Verified tokens are remembered by their text; their expiry must still be checked every time.
    token = resign(token_for("*"), exp=int(time.time()) + 2)
    assert auth_client.get("/topics", headers=bearer(token)).status_code == 200
    time.sleep(2.2)
    response = auth_client.get("/topics", headers=bearer(token))
    assert_unauthorized(response)
    assert response.json["detail"] == "token has expired"


def test_a_revoked_token_is_401_even_when_the_request_is_otherwise_invalid(auth_app, auth_client, client):
    client_id, secret = new_client(auth_app, "*")
    token = token_request(auth_client, client_id, secret).json["access_token"]
    assert auth_client.get("/topics", headers=bearer(token)).status_code == 200
    client.delete(f"/clients/{client_id}")
    # The body fails validation before any transaction opens: revocation is still checked first.
    assert_unauthorized(auth_client.post("/topics", json={"id": "bad id"}, headers=bearer(token)))
    assert_unauthorized(auth_client.post("/topics/orders/messages", json="x", headers=bearer(token)))


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(auth_client, token_for, scheme):
    response = auth_client.get("/topics", headers={"Authorization": f"{scheme} {token_for('*')}"})
    assert response.status_code == 200
