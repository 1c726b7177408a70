"""The web console (/console): every page and action through Flask's test client, auth off and on,
CSRF, and the same scopes as the API. The browser walks the same paths in test_console_browser."""

import json
import logging
import re
import time

import pytest

from pubsub import clients, create_app, db
from pubsub.settings import ConfigError
from tests.auth_support import GLOBAL_SCOPES, SOME_MESSAGE_ID, new_client

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf(client) -> str:
    """The session's CSRF token, from a console page's form (the login page, or the overview)."""
    page = client.get("/console/login", follow_redirects=True).get_data(as_text=True)
    return CSRF.search(page)[1]


def post(client, path: str, **form):
    return client.post(path, data={"csrf_token": csrf(client), **form})


def text(response) -> str:
    return response.get_data(as_text=True)


def dead_letters(api, subscription_id: str, payloads: list[dict]) -> list[str]:
    """Publish to a subscription's topic, consume and dead-letter: the DLQ's ids, oldest first."""
    topic_id = api.client.get(f"/subscriptions/{subscription_id}").json["topic_id"]
    api.publish(topic_id, payloads)
    delivered = api.consume(subscription_id, batch_size=len(payloads))
    ids = [message["id"] for message in delivered]
    response = api.client.post(f"/subscriptions/{subscription_id}/nacks?dead_letter=true", json=ids)
    assert response.status_code == 204
    return [message["id"] for message in api.dlq(subscription_id, limit=100)]


@pytest.fixture
def orders(api):
    """Topic orders with subscription invoices."""
    api.create_topic("orders")
    api.create_subscription("invoices", "orders", max_delivery_attempts=3, ack_deadline_seconds=30)


# --- Auth off ------------------------------------------------------------------------------------


def test_overview_says_auth_is_off(client):
    page = text(client.get("/console/"))
    assert "Authentication is off" in page
    assert "Log out" not in page


def test_overview_shows_each_subscriptions_counts_and_settings(client, api, orders):
    api.publish("orders", [{"n": n} for n in range(5)])
    api.consume("invoices", batch_size=2)  # 2 delivered, 3 available
    response = client.get("/console/")
    assert response.status_code == 200
    row = re.search(r'<tr data-id="invoices">(.*?)</tr>', text(response), re.S)[1]
    assert re.search(r'class="num available">3<', row)
    assert re.search(r'class="num delivered">2<', row)
    assert "30 s" in row  # the ack deadline
    assert "3 attempts, backoff 5–300 s" in row
    assert 'href="/console/topics/orders"' in text(response)


def test_overview_puts_the_worst_backlog_first_and_sorts_on_request(client, api):
    api.create_topic("orders")
    api.create_subscription("a-quiet", "orders", filter={"never": ["x"]})
    api.create_subscription("b-busy", "orders")
    api.create_subscription("c-dead", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])  # b-busy and c-dead get 2 each, a-quiet none
    dead_letters(api, "c-dead", [{"n": 3}])  # c-dead: 2 available + 1 dead

    def order(query: str = "") -> list[str]:
        return re.findall(r'<tr data-id="([^"]+)">', text(client.get(f"/console/{query}")))

    assert order()[2] == "a-quiet"
    assert order("?sort=dlq")[0] == "c-dead"
    assert order("?sort=id") == ["a-quiet", "b-busy", "c-dead"]
    assert order("?sort=nonsense") == order()


def test_overview_is_refreshed_by_its_script_and_loads_only_local_assets(client):
    page = text(client.get("/console/"))
    assert 'data-refresh="5"' in page
    assets = re.findall(r'(?:src|href)="([^"#]+\.(?:js|css))"', page)
    assert sorted(assets) == ["/static/console/console.css", "/static/console/console.js"]
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200
        response.close()


def test_console_is_not_in_the_openapi_document(client):
    assert not [path for path in client.get("/openapi.json").json["paths"] if "console" in path]


def test_create_topic(client):
    response = post(client, "/console/topics", id="invoices")
    assert (response.status_code, response.location) == (302, "/console/topics/invoices")
    assert client.get("/topics/invoices").status_code == 200
    assert "topic invoices created" in text(client.get(response.location))


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "a/b"])
def test_a_bad_topic_id_gets_the_apis_message_not_a_500(client, bad):
    response = post(client, "/console/topics", id=bad)
    assert response.status_code == 422
    assert "<code>form.id</code>" in text(response)
    assert client.get("/topics").json["data"] == []


def test_an_existing_topic_gets_a_409_page(client, api):
    api.create_topic("orders")
    response = post(client, "/console/topics", id="orders")
    assert response.status_code == 409
    assert "This topic already exists" in text(response)


def test_create_subscription_with_its_settings(client, api):
    api.create_topic("orders")
    response = post(
        client,
        "/console/subscriptions",
        id="invoices",
        topic_id="orders",
        filter='{"country": ["BR"]}',
        max_delivery_attempts="7",
        backoff_min_seconds="",
        backoff_max_seconds="",
        ack_deadline_seconds="45",
        ordering_key="customer_id",
    )
    assert (response.status_code, response.location) == (302, "/console/subscriptions/invoices")
    created = client.get("/subscriptions/invoices").json
    assert created["filter"] == {"country": ["BR"]}
    assert created["ordering_key"] == "customer_id"
    assert "customer_id" in client.get("/console/subscriptions/invoices").get_data(as_text=True)
    assert (created["max_delivery_attempts"], created["ack_deadline_seconds"]) == (7, 45)
    assert (created["backoff_min_seconds"], created["backoff_max_seconds"]) == (5, 300)  # the defaults


@pytest.mark.parametrize(
    ("form", "status", "says"),
    [
        ({"max_delivery_attempts": "many"}, 422, "form.max_delivery_attempts"),
        ({"max_delivery_attempts": "0"}, 422, "form.max_delivery_attempts"),
        ({"ack_deadline_seconds": "5"}, 422, "form.ack_deadline_seconds"),
        ({"backoff_min_seconds": "50", "backoff_max_seconds": "10"}, 422, "form.backoff_min_seconds"),
        ({"filter": "{not json"}, 422, "form.filter"),
        ({"filter": '{"country": "BR"}'}, 422, "form.filter"),
        ({"id": "bad id"}, 422, "form.id"),
        ({"topic_id": "missing"}, 404, "Topic not found"),
    ],
)
def test_bad_subscription_input_gets_a_clear_page(client, api, form, status, says):
    api.create_topic("orders")
    response = post(client, "/console/subscriptions", **{"id": "invoices", "topic_id": "orders", **form})
    assert response.status_code == status
    assert says in text(response)
    assert client.get("/subscriptions").json["data"] == []


def test_publish_a_test_message(client, api, orders):
    page = text(client.get("/console/topics/orders"))
    assert "Publish a test message" in page
    response = post(client, "/console/topics/orders/publish", payload='[{"n": 1}, {"n": 2}]')
    assert (response.status_code, response.location) == (302, "/console/topics/orders")
    assert [m["payload"] for m in api.consume("invoices")] == [{"n": 1}, {"n": 2}]
    post(client, "/console/topics/orders/publish", payload='{"single": true}')
    assert [m["payload"] for m in api.consume("invoices")] == [{"single": True}]


@pytest.mark.parametrize("payload", ["", "{oops", "[1, 2]", '"text"'])
def test_a_bad_test_message_gets_a_422_page(client, api, orders, payload):
    response = post(client, "/console/topics/orders/publish", payload=payload)
    assert response.status_code == 422
    assert api.metrics("invoices")["available"] == 0


def test_a_payload_postgresql_refuses_gets_a_422_page(client, api, orders):
    response = post(client, "/console/topics/orders/publish", payload='{"text": "nul \\u0000 here"}')
    assert (response.status_code, response.mimetype) == (422, "text/html")
    assert "invalid data" in text(response)
    assert api.metrics("invoices")["available"] == 0


def test_publish_to_a_missing_topic_gets_a_404_page(client):
    response = post(client, "/console/topics/nope/publish", payload="{}")
    assert response.status_code == 404
    assert "Topic not found" in text(response)


def test_delete_topic_and_subscription(client, api, orders):
    api.create_topic("payments")
    response = post(client, "/console/subscriptions/invoices/delete")
    assert (response.status_code, response.location) == (302, "/console/")
    assert client.get("/subscriptions/invoices").status_code == 404
    assert post(client, "/console/topics/orders/delete").status_code == 302
    assert client.get("/topics/orders").status_code == 404
    assert post(client, "/console/topics/orders/delete").status_code == 404


def test_subscription_page_shows_settings_counts_and_the_dlq_pretty_printed(client, api, orders):
    [dead] = dead_letters(api, "invoices", [{"order": {"id": 7, "lines": [1, 2]}}])
    api.publish("orders", [{"n": 1}])
    response = client.get("/console/subscriptions/invoices")
    assert response.status_code == 200
    page = text(response)
    assert "<th>Ack deadline</th><td>30 s</td>" in page
    assert "<th>Max delivery attempts</th><td>3</td>" in page
    assert f'<tr data-id="{dead}">' in page
    payload = re.search(r'<pre class="payload">(.*?)</pre>', page, re.S)[1]
    assert json.loads(payload.replace("&#34;", '"')) == {"order": {"id": 7, "lines": [1, 2]}}
    assert '\n  "order": {\n    "id": 7,' in payload.replace("&#34;", '"')  # indented
    counts = re.search(r'<table id="counts">.*?<tbody><tr>(.*?)</tr>', page, re.S)[1]
    assert re.findall(r">(\d+)<", counts) == ["1", "0", "0", "0", "1", "0"]  # the last: waiting behind a key


def test_the_dlq_is_paged(client, api, orders):
    ids = dead_letters(api, "invoices", [{"n": n} for n in range(23)])
    first = text(client.get("/console/subscriptions/invoices"))
    assert re.findall(r'<tr data-id="([^"]+)">', first) == ids[:20]
    assert 'href="?offset=20"' in first
    second = text(client.get("/console/subscriptions/invoices?offset=20"))
    assert re.findall(r'<tr data-id="([^"]+)">', second) == ids[20:]
    assert 'id="next"' not in second and 'href="?offset=0"' in second


def test_a_bad_offset_gets_a_422_page(client, api, orders):
    response = client.get("/console/subscriptions/invoices?offset=-1")
    assert response.status_code == 422
    assert "query.offset" in text(response)


def test_a_missing_subscription_gets_a_404_page(client):
    response = client.get("/console/subscriptions/nope")
    assert response.status_code == 404
    assert response.mimetype == "text/html"
    assert "Subscription not found" in text(response)


def test_reprocess_selected_dead_letters(client, api, orders):
    ids = dead_letters(api, "invoices", [{"n": 1}, {"n": 2}, {"n": 3}])
    client.get("/console/")  # a session with a CSRF token
    response = client.post(
        "/console/subscriptions/invoices/dlq/reprocess", data={"csrf_token": csrf(client), "ids": ids[:2]}
    )
    assert (response.status_code, response.location) == (302, "/console/subscriptions/invoices")
    assert [m["id"] for m in api.dlq("invoices")] == ids[2:]
    assert sorted(m["id"] for m in api.consume("invoices")) == sorted(ids[:2])
    assert "2 dead letter(s) back in the queue" in text(client.get(response.location))


@pytest.mark.parametrize("ids", [[], ["not-a-uuid"]])
def test_reprocess_without_valid_ids_gets_a_422_page(client, api, orders, ids):
    dead_letters(api, "invoices", [{"n": 1}])
    response = client.post(
        "/console/subscriptions/invoices/dlq/reprocess", data={"csrf_token": csrf(client), "ids": ids}
    )
    assert response.status_code == 422
    assert len(api.dlq("invoices")) == 1


def test_redrive_purge_dlq_and_purge_backlog(client, api, orders):
    dead_letters(api, "invoices", [{"n": n} for n in range(3)])
    assert post(client, "/console/subscriptions/invoices/dlq/redrive", limit="2").status_code == 302
    assert api.metrics("invoices")["dlq"] == 1 and api.metrics("invoices")["available"] == 2
    assert post(client, "/console/subscriptions/invoices/dlq/redrive", limit="x").status_code == 422
    assert post(client, "/console/subscriptions/invoices/dlq/purge").status_code == 302
    assert api.metrics("invoices")["dlq"] == 0
    response = post(client, "/console/subscriptions/invoices/purge")
    assert response.status_code == 302
    assert api.metrics("invoices")["available"] == 0
    assert "2 message(s) of the backlog deleted" in text(client.get(response.location))


# --- CSRF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [None, "", "forged"])
def test_a_form_without_the_sessions_csrf_token_is_refused(client, api, orders, sent):
    dead_letters(api, "invoices", [{"n": 1}])
    csrf(client)  # the session has a token; the form does not send it
    data = {} if sent is None else {"csrf_token": sent}
    for path in (
        "/console/topics",
        "/console/subscriptions/invoices/dlq/purge",
        "/console/topics/orders/delete",
    ):
        response = client.post(path, data={"id": "evil", **data})
        assert response.status_code == 400, path
        assert "not sent by this console" in text(response)
    assert client.get("/topics/evil").status_code == 404
    assert client.get("/topics/orders").status_code == 200
    assert api.metrics("invoices")["dlq"] == 1


def test_a_csrf_token_of_another_session_is_refused(app, client):
    other = app.test_client()
    response = client.post("/console/topics", data={"csrf_token": csrf(other), "id": "evil"})
    assert response.status_code == 400


# --- Auth on -------------------------------------------------------------------------------------


def log_in(client, app, scopes: str) -> str:
    client_id, secret = new_client(app, scopes)
    response = post(client, "/console/login", client_id=client_id, client_secret=secret)
    assert (response.status_code, response.location) == (302, "/console/"), text(response)
    return client_id


def test_without_a_session_every_page_leads_to_the_login(auth_client):
    for path in ("/console/", "/console/subscriptions/email-sender", "/console/topics/orders"):
        response = auth_client.get(path)
        assert (response.status_code, response.location) == (302, "/console/login")
    page = text(auth_client.get("/console/login"))
    assert "Client secret" in page and "Authentication is off" not in page


def test_login_with_wrong_credentials_is_refused(auth_app, auth_client):
    client_id, _ = new_client(auth_app, "*")
    response = post(auth_client, "/console/login", client_id=client_id, client_secret="wrong")
    assert response.status_code == 401
    assert "invalid client credentials" in text(response)
    assert auth_client.get("/console/").status_code == 302


def test_login_logout_and_no_token_in_urls_or_logs(auth_app, auth_client, world, caplog):
    caplog.set_level(logging.DEBUG)
    client_id = log_in(auth_client, auth_app, "*")
    page = auth_client.get("/console/")
    assert page.status_code == 200
    assert client_id in text(page) and "Log out" in text(page)
    with auth_client.session_transaction() as session:
        token = session["token"]
        assert session["expires_at"] > time.time() + 4 * 60
    assert token not in text(page)
    assert token not in caplog.text
    response = post(auth_client, "/console/logout")
    assert (response.status_code, response.location) == (302, "/console/login")
    assert auth_client.get("/console/").status_code == 302


def test_an_expired_session_leads_to_the_login(auth_app, auth_client, world):
    log_in(auth_client, auth_app, "*")
    with auth_client.session_transaction() as session:
        session["expires_at"] = int(time.time()) - 1
    response = auth_client.get("/console/")
    assert (response.status_code, response.location) == (302, "/console/login")
    assert "expired" in text(auth_client.get("/console/login"))


def test_a_revoked_client_is_logged_out_at_its_next_page(auth_app, auth_client, world):
    client_id = log_in(auth_client, auth_app, "*")
    assert auth_client.get("/console/").status_code == 200
    with auth_app.app_context(), db.begin() as conn:
        clients.delete_client(conn, client_id)
    response = auth_client.get("/console/")
    assert (response.status_code, response.location) == (302, "/console/login")


# (method, path, form, the global scopes that allow it: all of them are needed)
ACTIONS = [
    ("GET", "/console/", {}, ("topics:read", "subscriptions:read")),
    ("GET", "/console/topics/orders", {}, ("topics:read",)),
    ("GET", "/console/subscriptions/email-sender", {}, ("subscriptions:read",)),
    ("POST", "/console/topics", {"id": "invoices"}, ("topics:create",)),
    ("POST", "/console/topics/orders/delete", {}, ("topics:delete",)),
    ("POST", "/console/topics/orders/publish", {"payload": "{}"}, ("topics:publish",)),
    ("POST", "/console/subscriptions", {"id": "audit", "topic_id": "orders"}, ("subscriptions:create",)),
    ("POST", "/console/subscriptions/email-sender/delete", {}, ("subscriptions:delete",)),
    (
        "POST",
        "/console/subscriptions/email-sender/dlq/reprocess",
        {"ids": SOME_MESSAGE_ID},
        ("subscriptions:consume",),
    ),
    ("POST", "/console/subscriptions/email-sender/dlq/redrive", {}, ("subscriptions:consume",)),
    ("POST", "/console/subscriptions/email-sender/dlq/purge", {}, ("subscriptions:delete",)),
    ("POST", "/console/subscriptions/email-sender/purge", {}, ("subscriptions:delete",)),
]


def act(client, method: str, path: str, form: dict):
    if method == "GET":
        return client.get(path)
    return post(client, path, **form)


def test_every_console_route_is_in_the_scope_table(auth_app):
    routes = {
        (method, rule.rule)
        for rule in auth_app.url_map.iter_rules()
        if rule.endpoint.startswith("console.") and rule.endpoint not in ("console.login", "console.logout")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    covered = {
        (method, auth_app.url_map.bind("localhost").match(path, method=method, return_rule=True)[0].rule)
        for method, path, _, _ in ACTIONS
    }
    assert routes == covered


@pytest.mark.parametrize(
    ("method", "path", "form", "needs"), ACTIONS, ids=[f"{a[0]} {a[1]}" for a in ACTIONS]
)
def test_a_client_without_the_scope_gets_a_403_page(auth_app, auth_client, world, method, path, form, needs):
    for missing in needs:
        log_in(auth_client, auth_app, " ".join(scope for scope in GLOBAL_SCOPES if scope != missing))
        response = act(auth_client, method, path, form)
        assert response.status_code == 403, (missing, text(response))
        assert f"this needs {missing}" in text(response)


@pytest.mark.parametrize(
    ("method", "path", "form", "needs"), ACTIONS, ids=[f"{a[0]} {a[1]}" for a in ACTIONS]
)
def test_a_client_with_only_the_scope_is_allowed(auth_app, auth_client, world, method, path, form, needs):
    log_in(auth_client, auth_app, " ".join(needs))
    response = act(auth_client, method, path, form)
    assert response.status_code in (200, 302), text(response)
    if response.status_code == 302:
        assert response.location != "/console/login"


def test_object_scopes_allow_their_object_only(auth_app, auth_client, world):
    log_in(auth_client, auth_app, "subscriptions:read:email-sender subscriptions:consume:email-sender")
    assert auth_client.get("/console/subscriptions/email-sender").status_code == 200
    assert auth_client.get("/console/subscriptions/sms-sender").status_code == 403
    assert post(auth_client, "/console/subscriptions/email-sender/dlq/redrive").status_code == 302
    assert post(auth_client, "/console/subscriptions/sms-sender/dlq/redrive").status_code == 403


def test_the_dlq_needs_the_consume_scope(auth_app, auth_client, world, api):
    [message] = dead_letters(api, "email-sender", [{"n": 1}])  # through the auth-off app
    log_in(auth_client, auth_app, "subscriptions:read")
    page = text(auth_client.get("/console/subscriptions/email-sender"))
    assert "Listing dead letters needs" in page and message not in page
    log_in(auth_client, auth_app, "subscriptions:read subscriptions:consume")
    assert message in text(auth_client.get("/console/subscriptions/email-sender"))


# --- The session's key ---------------------------------------------------------------------------


def test_the_session_key_is_the_setting_or_derived_never_the_token_key(make_app, auth_app):
    assert make_app(CONSOLE_SECRET_KEY="k" * 32).secret_key == "k" * 32
    assert auth_app.secret_key not in (None, auth_app.config["AUTH_SECRET_KEY"])
    assert len(auth_app.secret_key) == 64


def test_a_short_session_key_stops_start_up(make_app):
    with pytest.raises(ConfigError, match="PUBSUB_CONSOLE_SECRET_KEY must be at least 32 bytes"):
        make_app(CONSOLE_SECRET_KEY="short")


def test_without_keys_the_workers_share_one_kept_in_instance(tmp_path, monkeypatch, database_url):
    monkeypatch.setenv("PUBSUB_INSTANCE_PATH", str(tmp_path))
    first, second = (create_app({"DATABASE_URL": database_url, "TESTING": True}) for _ in range(2))
    assert first.secret_key == second.secret_key
    assert (tmp_path / "console-secret-key").read_text() == first.secret_key
    assert (tmp_path / "console-secret-key").stat().st_mode & 0o777 == 0o600
