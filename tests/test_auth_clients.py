"""Clients CRUD as SPEC §3 (through the auth-off app: the endpoints are the same either way)."""

import hashlib
import re
import uuid
from datetime import datetime

import pytest
import sqlalchemy as sa

from pubsub.tables import clients as clients_table

CLIENT_FIELDS = {"id", "name", "scopes", "is_active", "token_version", "created_at", "updated_at"}
VALID_SCOPES = [
    "*",
    "topics:create topics:read topics:delete topics:publish",
    "subscriptions:create subscriptions:read subscriptions:delete subscriptions:consume",
    "clients:create clients:update clients:read clients:delete",
    "topics:publish:orders subscriptions:consume:email-sender",
    "topics:read:a.B-c_9 subscriptions:read:" + "x" * 128,
    "* topics:read",
]
INVALID_SCOPES = [
    "",
    "   ",
    "admin",
    "topics",
    "topics:",
    "topics:write",
    "queues:read",
    "Topics:read",
    "clients:read:0b6c4a4e-4b0e-4a8e-9c39-6c0d2d1b7e11",
    "topics:publish:",
    "topics:publish:bad/id",
    "topics:publish:" + "x" * 129,
    "topics:publish:orders:extra",
    "topics:*",
    "*:*",
    "topics:read,topics:create",
    "topics:read topics:write",
]


def create(client, name="svc", scopes="topics:read", **fields):
    response = client.post("/clients", json={"name": name, "scopes": scopes, **fields})
    assert response.status_code == 201, response.json
    return response.json


def test_create_returns_the_id_and_a_secret_only_then(client):
    response = client.post("/clients", json={"name": "svc", "scopes": "topics:read"})
    assert response.status_code == 201
    assert set(response.json) == {"id", "secret"}
    uuid.UUID(response.json["id"])
    assert re.fullmatch(r"[0-9a-f]{64}", response.json["secret"])

    shown = client.get(f"/clients/{response.json['id']}").json
    assert set(shown) == CLIENT_FIELDS
    listed = client.get("/clients").json["data"]
    assert [set(item) for item in listed] == [CLIENT_FIELDS]
    for text in (client.get(f"/clients/{response.json['id']}").text, client.get("/clients").text):
        assert response.json["secret"] not in text
        assert hashlib.sha256(response.json["secret"].encode()).hexdigest() not in text


def test_a_new_client_has_its_fields_and_version_1(client):
    created = create(client, name="order service", scopes="topics:publish:orders")
    shown = client.get(f"/clients/{created['id']}").json
    assert shown["id"] == created["id"]
    assert shown["name"] == "order service"
    assert shown["scopes"] == "topics:publish:orders"
    assert shown["is_active"] is True
    assert shown["token_version"] == 1
    for field in ("created_at", "updated_at"):
        assert datetime.fromisoformat(shown[field]).tzinfo is not None


def test_a_client_may_be_created_inactive(client):
    created = create(client, is_active=False)
    assert client.get(f"/clients/{created['id']}").json["is_active"] is False


def test_scopes_are_stored_with_single_spaces_and_no_repeats(client):
    created = create(client, scopes="  topics:read   topics:publish:orders topics:read ")
    assert client.get(f"/clients/{created['id']}").json["scopes"] == "topics:read topics:publish:orders"


def test_every_secret_is_new(client):
    secrets = {create(client)["secret"] for _ in range(5)}
    assert len(secrets) == 5


def test_the_database_stores_only_a_sha256_digest_of_the_secret(client, engine):
    created = create(client)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(clients_table)).mappings().all()
        text = conn.execute(sa.text("SELECT clients::text FROM clients")).scalar_one()
    [row] = rows
    assert row["secret_hash"] == hashlib.sha256(created["secret"].encode()).hexdigest()
    assert created["secret"] not in text
    assert created["secret"] not in repr(dict(row))


def test_every_known_scope_is_accepted(client):
    for scopes in VALID_SCOPES:
        created = create(client, scopes=scopes)
        assert client.get(f"/clients/{created['id']}").json["scopes"] == " ".join(scopes.split())


@pytest.mark.parametrize("scopes", INVALID_SCOPES)
def test_unknown_scopes_are_422_on_create_and_update_and_change_nothing(client, scopes):
    response = client.post("/clients", json={"name": "svc", "scopes": scopes})
    assert response.status_code == 422
    assert "json.scopes" in response.json["errors"]
    assert client.get("/clients").json["data"] == []

    created = create(client)
    before = client.get(f"/clients/{created['id']}").json
    body = {"name": "svc", "scopes": scopes, "is_active": True}
    response = client.put(f"/clients/{created['id']}", json=body)
    assert response.status_code == 422
    assert "json.scopes" in response.json["errors"]
    assert client.get(f"/clients/{created['id']}").json == before


def test_create_with_a_bad_body_is_422(client):
    for body in [
        {},
        {"scopes": "*"},
        {"name": "svc"},
        {"name": "", "scopes": "*"},
        {"name": "x" * 256, "scopes": "*"},
        {"name": "svc", "scopes": ["topics:read"]},
        {"name": "svc", "scopes": "*", "is_active": "maybe"},
        {"name": "svc", "scopes": "*", "secret": "mine"},
        ["svc", "*"],
    ]:
        response = client.post("/clients", json=body)
        assert response.status_code == 422, (body, response.json)
        assert response.json["detail"]
    assert client.get("/clients").json["data"] == []


def test_update_replaces_every_field_and_bumps_the_token_version(client):
    created = create(client, name="svc", scopes="topics:read")
    before = client.get(f"/clients/{created['id']}").json
    body = {"name": "renamed", "scopes": "subscriptions:consume:email-sender", "is_active": False}
    response = client.put(f"/clients/{created['id']}", json=body)
    assert response.status_code == 200
    assert set(response.json) == CLIENT_FIELDS
    assert response.json["name"] == "renamed"
    assert response.json["scopes"] == "subscriptions:consume:email-sender"
    assert response.json["is_active"] is False
    assert response.json["token_version"] == 2
    assert response.json["created_at"] == before["created_at"]
    assert datetime.fromisoformat(response.json["updated_at"]) > datetime.fromisoformat(before["updated_at"])
    assert client.get(f"/clients/{created['id']}").json == response.json

    again = client.put(f"/clients/{created['id']}", json=body)
    assert again.json["token_version"] == 3


def test_update_needs_every_field(client):
    created = create(client)
    for body in (
        {"name": "svc", "scopes": "*"},
        {"scopes": "*", "is_active": True},
        {"name": "svc", "is_active": True},
    ):
        response = client.put(f"/clients/{created['id']}", json=body)
        assert response.status_code == 422, body
    assert client.get(f"/clients/{created['id']}").json["token_version"] == 1


def test_list_pages_oldest_first(client):
    ids = [create(client, name=f"c{n}")["id"] for n in range(5)]
    assert [c["id"] for c in client.get("/clients").json["data"]] == ids
    page = client.get("/clients", query_string={"offset": 1, "limit": 2}).json["data"]
    assert [c["id"] for c in page] == ids[1:3]
    assert client.get("/clients", query_string={"offset": 5}).json["data"] == []


def test_list_defaults_to_10(client):
    for n in range(12):
        create(client, name=f"c{n}")
    assert len(client.get("/clients").json["data"]) == 10


def test_list_with_bad_paging_is_422(client):
    for query in ({"offset": -1}, {"limit": 0}, {"limit": 101}, {"limit": "many"}):
        assert client.get("/clients", query_string=query).status_code == 422, query


def test_a_client_id_that_is_not_a_uuid_is_422(client):
    body = {"name": "svc", "scopes": "*", "is_active": True}
    for client_id in ("not-a-uuid", "123", "0b6c4a4e-4b0e-4a8e-9c39"):
        for method, kwargs in (("GET", {}), ("PUT", {"json": body}), ("DELETE", {})):
            response = client.open(f"/clients/{client_id}", method=method, **kwargs)
            assert response.status_code == 422, (client_id, method, response.json)
            assert response.json["detail"]


def test_a_missing_client_is_404(client):
    missing = f"/clients/{uuid.uuid4()}"
    body = {"name": "svc", "scopes": "*", "is_active": True}
    assert client.get(missing).status_code == 404
    assert client.put(missing, json=body).status_code == 404
    assert client.delete(missing).status_code == 404
    assert client.get("/clients").json["data"] == []


def test_delete_removes_the_client(client):
    kept, deleted = create(client, name="kept"), create(client, name="deleted")
    response = client.delete(f"/clients/{deleted['id']}")
    assert response.status_code == 204
    assert response.data == b""
    assert client.get(f"/clients/{deleted['id']}").status_code == 404
    assert client.delete(f"/clients/{deleted['id']}").status_code == 404
    assert [c["id"] for c in client.get("/clients").json["data"]] == [kept["id"]]
