"""The scope matrix (SPEC §4): every protected endpoint with its global scope, with every other
scope, with object-specific scopes for its object and for others, and with `*`.

The documented decisions: metrics accept `subscriptions:consume` or `subscriptions:read`;
consume, acks, nacks, extend, reprocess and the dlq listing (it returns payloads) need
`subscriptions:consume`; create and list endpoints name no object, so only global scopes allow
them; /clients takes global scopes only.
"""

import uuid

import pytest

from tests.auth_support import (
    ENDPOINTS,
    GLOBAL_SCOPES,
    OBJECTS,
    OTHER_OBJECTS,
    assert_forbidden,
    bearer,
)

# The shared fixtures.

# Object-specific forms exist for actions on an existing topic or subscription (not create).
OBJECT_SCOPES = [
    scope for scope in GLOBAL_SCOPES if scope.split(":")[0] in OBJECTS and not scope.endswith(":create")
]
ALL_OBJECT_IDS = [*OBJECTS.values(), *OTHER_OBJECTS.values()]


def state(client) -> tuple:
    """What a forbidden request must leave alone."""
    return (
        client.get("/topics").json,
        client.get("/subscriptions").json,
        client.get("/clients").json,
        client.get("/subscriptions/email-sender/metrics").json,
        client.get("/subscriptions/sms-sender/metrics").json,
    )


def every_scope_but(endpoint) -> str:
    """Every global scope but the endpoint's, and every object-specific scope but its own: so also
    topics:read:email-sender (a topic's scope naming the subscription) and the reverse."""
    granted = [scope for scope in GLOBAL_SCOPES if scope not in endpoint.scopes]
    for scope in OBJECT_SCOPES:
        for object_id in ALL_OBJECT_IDS:
            if not (scope in endpoint.scopes and object_id == endpoint.object_id):
                granted.append(f"{scope}:{object_id}")
    return " ".join(granted)


def cases(endpoints):
    return [pytest.param(e, scope, id=f"{e} {scope}") for e in endpoints for scope in e.scopes]


OBJECT_ENDPOINTS = [e for e in ENDPOINTS if e.object_id]
COLLECTION_ENDPOINTS = [e for e in ENDPOINTS if e.resource in OBJECTS and "{id}" not in e.path]
CLIENT_OBJECT_ENDPOINTS = [e for e in ENDPOINTS if e.resource == "clients" and "{id}" in e.path]


def test_the_matrix_has_the_twenty_five_protected_operations():
    assert len(ENDPOINTS) == 25
    assert len(OBJECT_ENDPOINTS) == 16 and len(COLLECTION_ENDPOINTS) == 4


@pytest.mark.parametrize(("endpoint", "scope"), cases(ENDPOINTS))
def test_the_global_scope_allows(auth_client, token_for, world, endpoint, scope):
    response = endpoint.call(auth_client, world, token_for(scope))
    assert response.status_code == endpoint.status, response.get_data(as_text=True)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_star_allows(auth_client, token_for, world, endpoint):
    response = endpoint.call(auth_client, world, token_for("*"))
    assert response.status_code == endpoint.status, response.get_data(as_text=True)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_every_other_scope_together_is_forbidden_and_changes_nothing(
    auth_client, client, token_for, world, endpoint
):
    token = token_for(every_scope_but(endpoint))
    before = state(client)
    assert_forbidden(endpoint.call(auth_client, world, token))
    assert state(client) == before


@pytest.mark.parametrize(("endpoint", "scope"), cases(OBJECT_ENDPOINTS))
def test_the_object_scope_for_its_object_allows(auth_client, token_for, world, endpoint, scope):
    response = endpoint.call(auth_client, world, token_for(f"{scope}:{endpoint.object_id}"))
    assert response.status_code == endpoint.status, response.get_data(as_text=True)


@pytest.mark.parametrize(("endpoint", "scope"), cases(OBJECT_ENDPOINTS))
def test_the_object_scope_for_another_object_is_forbidden(
    auth_client, client, token_for, world, endpoint, scope
):
    other = OTHER_OBJECTS[endpoint.resource]
    token = token_for(f"{scope}:{other}")
    before = state(client)
    assert_forbidden(endpoint.call(auth_client, world, token))
    assert state(client) == before
    # ... while that token does reach the object it names.
    response = endpoint.call(auth_client, world, token, object_id=other)
    assert response.status_code == endpoint.status, response.get_data(as_text=True)


LIST_ENDPOINTS = [e for e in COLLECTION_ENDPOINTS if e.method == "GET"]
CREATE_ENDPOINTS = [e for e in COLLECTION_ENDPOINTS if e.method == "POST"]


@pytest.mark.parametrize(("endpoint", "scope"), cases(LIST_ENDPOINTS))
def test_list_endpoints_take_only_global_scopes(auth_client, token_for, world, endpoint, scope):
    token = token_for(" ".join(f"{scope}:{object_id}" for object_id in ALL_OBJECT_IDS))
    assert_forbidden(endpoint.call(auth_client, world, token))


@pytest.mark.parametrize(("endpoint", "scope"), cases(CREATE_ENDPOINTS))
def test_create_scopes_have_no_object_form(auth_client, client, endpoint, scope):
    # Creating is not an action on an existing object: `topics:create:orders` could never allow
    # anything, so it is refused rather than silently accepted.
    named = (endpoint.body or {}).get("id") or OBJECTS[endpoint.resource]
    response = client.post("/clients", json={"name": "x", "scopes": f"{scope}:{named}"})
    assert response.status_code == 422
    assert "json.scopes" in response.json["errors"]


@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS, ids=str)
def test_an_allowed_request_for_a_missing_object_is_404_not_403(auth_client, token_for, endpoint):
    for scopes in (endpoint.scopes[0], f"{endpoint.scopes[0]}:missing"):
        response = endpoint.call(auth_client, "", token_for(scopes), object_id="missing")
        assert response.status_code == 404, (scopes, response.json)


@pytest.mark.parametrize("endpoint", CLIENT_OBJECT_ENDPOINTS, ids=str)
def test_an_allowed_request_for_a_missing_client_is_404(auth_client, token_for, endpoint):
    response = endpoint.call(auth_client, str(uuid.uuid4()), token_for(endpoint.scopes[0]))
    assert response.status_code == 404, response.json


def test_read_monitors_a_subscription_but_does_not_consume_it(auth_client, token_for, world):
    headers = {"Authorization": f"Bearer {token_for('subscriptions:read:email-sender')}"}
    base = "/subscriptions/email-sender"
    assert auth_client.get(f"{base}/metrics", headers=headers).status_code == 200
    assert auth_client.get(f"{base}", headers=headers).status_code == 200
    assert_forbidden(auth_client.get(f"{base}/messages?consumer_id=w", headers=headers))
    assert_forbidden(auth_client.get(f"{base}/dlq", headers=headers))
    for action in ("acks", "nacks", "extend", "dlq/reprocess"):
        assert_forbidden(auth_client.post(f"{base}/{action}", json=[], headers=headers))


@pytest.mark.parametrize(
    ("scopes", "status"),
    [
        ("subscriptions:read", 403),
        ("subscriptions:read:email-sender", 403),
        ("subscriptions:read subscriptions:create subscriptions:delete", 403),
        ("subscriptions:consume", 200),
        ("subscriptions:consume:email-sender", 200),
        ("*", 200),
    ],
)
def test_dead_letters_carry_payloads_so_listing_them_needs_consume(
    auth_client, token_for, world, scopes, status
):
    response = auth_client.get("/subscriptions/email-sender/dlq", headers=bearer(token_for(scopes)))
    assert response.status_code == status, response.json


def test_a_publisher_for_one_topic_publishes_there_only(auth_client, client, token_for, world):
    headers = {"Authorization": f"Bearer {token_for('topics:publish:orders')}"}
    assert auth_client.post("/topics/orders/messages", json=[{"n": 2}], headers=headers).status_code == 204
    assert_forbidden(auth_client.post("/topics/payments/messages", json=[{"n": 2}], headers=headers))
    assert_forbidden(auth_client.get("/topics/orders", headers=headers))
    assert client.get("/subscriptions/email-sender/metrics").json["available"] == 2
    assert client.get("/subscriptions/sms-sender/metrics").json["available"] == 1


def test_a_consumer_for_one_subscription_runs_its_whole_cycle(auth_client, client, token_for, world):
    headers = {"Authorization": f"Bearer {token_for('subscriptions:consume:email-sender')}"}
    base = "/subscriptions/email-sender"
    [message] = auth_client.get(f"{base}/messages?consumer_id=w", headers=headers).json["data"]
    assert message["payload"] == {"topic": "orders"}
    assert auth_client.post(f"{base}/acks", json=[message["id"]], headers=headers).status_code == 204
    assert auth_client.get(f"{base}/metrics", headers=headers).json["acked"] == 1
    assert_forbidden(auth_client.get("/subscriptions/sms-sender/messages?consumer_id=w", headers=headers))
    assert client.get("/subscriptions/sms-sender/metrics").json["available"] == 1
