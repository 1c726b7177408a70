"""API clients: credentials, scopes and the version that revokes their tokens."""

import hashlib
import hmac
import re
import secrets
import uuid

import sqlalchemy as sa

from pubsub.errors import CLIENT_NOT_FOUND, InvalidInput, NotFound
from pubsub.tables import clients

CLIENT_COLUMNS = (
    clients.c.id,
    clients.c.name,
    clients.c.scopes,
    clients.c.is_active,
    clients.c.token_version,
    clients.c.created_at,
    clients.c.updated_at,
)
ACTIONS = {
    "topics": ("create", "read", "delete", "publish"),
    "subscriptions": ("create", "read", "update", "delete", "consume"),
    "clients": ("create", "update", "read", "delete"),
}
# Object-specific scopes name an existing topic or subscription: RESOURCE:ACTION:ID (creating is
# not an action on an existing object, so there is no create form).
OBJECT_ACTIONS = {
    "topics": ("read", "delete", "publish"),
    "subscriptions": ("read", "update", "delete", "consume"),
}
OBJECT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# The same grammar as one regular expression, for the OpenAPI document (normalize_scopes checks).
_SCOPE = "|".join(
    [r"\*"]
    + [f"{resource}:(?:{'|'.join(actions)})" for resource, actions in ACTIONS.items()]
    + [
        f"{resource}:(?:{'|'.join(actions)}):[A-Za-z0-9._-]{{1,128}}"
        for resource, actions in OBJECT_ACTIONS.items()
    ]
)
SCOPES_PATTERN = rf"^\s*(?:{_SCOPE})(?:\s+(?:{_SCOPE}))*\s*$"
# Compared against when the client is unknown, so that case costs the same as a wrong secret.
UNKNOWN_CLIENT_DIGEST = hashlib.sha256(b"no such client").hexdigest()


def normalize_scopes(scopes: str) -> str:
    """Check a space-separated scope list and return it with single spaces; unknown scopes are 422."""
    words = scopes.split()
    if not words:
        raise InvalidInput("scopes: give at least one scope, e.g. '*' or 'topics:read'")
    for word in words:
        if word == "*":
            continue
        parts = word.split(":")
        resource, action = (parts + ["", ""])[:2]
        known = action in ACTIONS.get(resource, ())
        if len(parts) == 3:
            known = action in OBJECT_ACTIONS.get(resource, ()) and bool(OBJECT_ID.fullmatch(parts[2]))
        elif len(parts) != 2:
            known = False
        if not known:
            raise InvalidInput(f"scopes: unknown scope {word!r}")
    return " ".join(dict.fromkeys(words))


def scope_allows(scopes: str, resource: str, action: str, object_id: str | None = None) -> bool:
    granted = scopes.split()
    return (
        "*" in granted
        or f"{resource}:{action}" in granted
        or (object_id is not None and f"{resource}:{action}:{object_id}" in granted)
    )


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_client(
    conn: sa.Connection, name: str, scopes: str, is_active: bool = True
) -> tuple[uuid.UUID, str]:
    """Returns the new client's id and its secret, which is stored only as a digest."""
    secret = secrets.token_hex(32)
    stmt = (
        sa.insert(clients)
        .values(name=name, scopes=normalize_scopes(scopes), is_active=is_active, secret_hash=digest(secret))
        .returning(clients.c.id)
    )
    return conn.execute(stmt).scalar_one(), secret


def get_client(conn: sa.Connection, client_id: uuid.UUID) -> dict:
    row = conn.execute(sa.select(*CLIENT_COLUMNS).where(clients.c.id == client_id)).mappings().first()
    if row is None:
        raise NotFound(CLIENT_NOT_FOUND)
    return dict(row)


def list_clients(conn: sa.Connection, offset: int, limit: int) -> list[dict]:
    stmt = sa.select(*CLIENT_COLUMNS).order_by(clients.c.created_at, clients.c.id).offset(offset).limit(limit)
    return [dict(row) for row in conn.execute(stmt).mappings()]


def update_client(conn: sa.Connection, client_id: uuid.UUID, name: str, scopes: str, is_active: bool) -> dict:
    """Replace name, scopes and state; the new token_version revokes every token issued before."""
    stmt = (
        sa.update(clients)
        .where(clients.c.id == client_id)
        .values(
            name=name,
            scopes=normalize_scopes(scopes),
            is_active=is_active,
            token_version=clients.c.token_version + 1,
            updated_at=sa.func.now(),
        )
        .returning(*CLIENT_COLUMNS)
    )
    row = conn.execute(stmt).mappings().first()
    if row is None:
        raise NotFound(CLIENT_NOT_FOUND)
    return dict(row)


def delete_client(conn: sa.Connection, client_id: uuid.UUID) -> None:
    if conn.execute(sa.delete(clients).where(clients.c.id == client_id)).rowcount == 0:
        raise NotFound(CLIENT_NOT_FOUND)


def authenticate_client(conn: sa.Connection, client_id: str, secret: str) -> dict | None:
    """The active client with this id and secret, or None; every failure looks the same."""
    try:
        parsed_id = uuid.UUID(client_id)
    except (ValueError, AttributeError, TypeError):
        parsed_id = None
    row = None
    if parsed_id is not None:
        stmt = sa.select(*CLIENT_COLUMNS, clients.c.secret_hash).where(clients.c.id == parsed_id)
        row = conn.execute(stmt).mappings().first()
    expected = row["secret_hash"] if row is not None else UNKNOWN_CLIENT_DIGEST
    secret_ok = hmac.compare_digest(digest(secret), expected)
    if row is None or not secret_ok or not row["is_active"]:
        return None
    return dict(row)


# What a token names for its revocation check: its client's id (canonical UUID text) and the
# token_version it was issued with.
TokenRef = tuple[str, int]
TOKEN_VERSION_MAX = 2**31 - 1  # the column is an integer


def token_ref(client_id: object, token_version: object) -> TokenRef | None:
    """The client and version a token's claims name, or None when they cannot be those of any
    current client (so the token is revoked without asking the database)."""
    try:
        parsed_id = uuid.UUID(client_id)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return None
    if type(token_version) is not int or not 0 < token_version <= TOKEN_VERSION_MAX:
        return None
    return str(parsed_id), token_version


def token_is_current(conn: sa.Connection, client_id: object, token_version: object) -> bool:
    """A token stays valid while its client exists, is active and has not been updated since."""
    ref = token_ref(client_id, token_version)
    if ref is None:
        return False
    stmt = sa.select(clients.c.token_version).where(clients.c.id == uuid.UUID(ref[0]), clients.c.is_active)
    return conn.execute(stmt).scalar() == ref[1]  # None: no such active client


def token_current_sql(client_id: str, token_version: str) -> str:
    """token_is_current as an SQL condition on two expressions (a uuid and an integer), for a
    statement that makes the revocation check itself (messages.PUBLISH)."""
    return (
        f"EXISTS (SELECT FROM clients WHERE clients.id = {client_id} AND clients.is_active"
        f" AND clients.token_version = {token_version})"
    )
