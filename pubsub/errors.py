"""Domain errors, each with its HTTP status, and the handlers that render every error as
``{"detail": ...}`` (plus ``"errors"`` for validation failures)."""

import logging

import psycopg
import sqlalchemy.exc
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from pubsub.db import OutcomeUnknown

log = logging.getLogger(__name__)

# fastpubsub's texts for the same cases, word for word: its clients may match on them.
TOPIC_NOT_FOUND = "Topic not found"
SUBSCRIPTION_NOT_FOUND = "Subscription not found"
CLIENT_NOT_FOUND = "Client not found"
TOPIC_ALREADY_EXISTS = "This topic already exists"
SUBSCRIPTION_ALREADY_EXISTS = "This subscription already exists"
INSUFFICIENT_SCOPE = "Insufficient scope"
# A token of a client deleted, deactivated or updated since it was issued.
TOKEN_REVOKED = "token has been revoked"


class PubSubError(Exception):
    status = 400
    headers: dict | None = None

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(PubSubError):
    status = 404


class Unauthorized(PubSubError):
    """A missing, invalid, expired or revoked bearer token."""

    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class AlreadyExists(PubSubError):
    status = 409


class DatabaseUnavailable(PubSubError):
    """The database cannot be reached or did not answer in time: nothing was committed, so the
    client may safely retry, unless the detail says the outcome is unknown (OUTCOME_UNKNOWN)."""

    status = 503
    headers = {"Retry-After": "1"}

    def __init__(self, detail: str = "database is unavailable"):
        super().__init__(detail)


class RetryConflict(PubSubError):
    """A request that met another one in progress with the same effect (a publish with the same
    Idempotency-Key): it changed nothing, and a retry will find the other's outcome."""

    status = 409
    headers = {"Retry-After": "1"}


class InvalidInput(PubSubError):
    """Input that passed the schema but cannot be accepted (e.g. a NUL character in a payload)."""

    status = 422


class ValidationFailed(PubSubError):
    """A request body that webargs does not parse (bare JSON arrays) failed validation."""

    status = 422

    def __init__(self, errors: dict[str, list[str]]):
        super().__init__("Validation error")
        self.errors = errors


def error_response(status: int, detail: str, errors: dict | None = None, headers=None):
    body: dict = {"detail": detail}
    if errors:
        body["errors"] = errors
    return jsonify(body), status, headers or {}


def flatten_errors(messages: dict, prefix: str = "") -> dict[str, list[str]]:
    """webargs nests errors by location and field; the API promises ``{"location.field": [...]}``."""
    flat: dict[str, list[str]] = {}
    for key, value in messages.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_errors(value, name))
        else:
            flat[name] = [str(m) for m in value] if isinstance(value, list) else [str(value)]
    return flat


def handle_pubsub_error(error: PubSubError):
    return error_response(error.status, error.detail, getattr(error, "errors", None), error.headers)


def handle_http_exception(error: HTTPException):
    data = getattr(error, "data", None) or {}
    headers = data.get("headers") or {}
    if "messages" in data:  # webargs: 422 for invalid fields, 400 for a body that is not JSON
        detail = "Validation error" if error.code == 422 else "Invalid JSON body"
        return error_response(error.code or 422, detail, flatten_errors(data["messages"]), headers)
    if error.code == 405 and error.valid_methods:
        headers = {**headers, "Allow": ", ".join(error.valid_methods)}
    return error_response(error.code or 500, error.description or error.name, None, headers)


def handle_data_error(error: sqlalchemy.exc.DataError | psycopg.DataError):
    # Class 22 errors come from what the client sent (e.g. \u0000 in a JSON string, which
    # PostgreSQL's jsonb cannot store); say so instead of failing with a 500. The hot statements
    # run on psycopg directly (messages.run), so its errors arrive unwrapped.
    orig = getattr(error, "orig", error)
    message = str(getattr(orig, "diag", None) and orig.diag.message_primary or orig)
    return error_response(422, f"invalid data: {message}")


def handle_database_unavailable(error: Exception):
    # Connection refused or dropped, server shutting down, pool exhausted: the transaction did
    # not commit, so the client may safely retry.
    log.warning("database unavailable: %s", (str(error).splitlines() or [""])[0])
    return handle_pubsub_error(DatabaseUnavailable(*unavailable_detail(error)))


# A statement cancelled by DATABASE_STATEMENT_TIMEOUT_SECONDS (57014 query_canceled) or a lock
# wait that gave up (55P03 lock_not_available): PostgreSQL rolled it back, nothing was done.
TIMED_OUT_SQLSTATES = ("57014", "55P03")
DATABASE_TIMED_OUT = "database did not answer in time; nothing was done, retry later"


# A statement the server did not answer within its bound (OutcomeUnknown): it was cancelled
# and its connection closed, but it may have committed first (a commit waiting for a synchronous
# standby that is gone is committed on the primary when cancelled).
OUTCOME_UNKNOWN = (
    "database did not answer in time; the request may or may not have taken effect: retry it"
    " (a retried publish may be stored twice unless it has an Idempotency-Key)"
)


def unavailable_detail(error: Exception) -> tuple[str, ...]:
    """The 503's detail for this error, as DatabaseUnavailable's arguments: its own text for a
    timeout, whose outcome is known, or for one whose outcome is unknown; the default otherwise."""
    orig = getattr(error, "orig", error)  # SQLAlchemy wraps psycopg's errors
    if getattr(orig, "sqlstate", None) in TIMED_OUT_SQLSTATES:
        return (DATABASE_TIMED_OUT,)
    if isinstance(orig, OutcomeUnknown):
        return (OUTCOME_UNKNOWN,)
    return ()


# A server that takes no writes (25006 read_only_sql_transaction): a hot standby, or a primary
# being demoted, reached through a multi-host DATABASE_URL without target_session_attrs=read-write
# during a failover. The statement did nothing: a 503 whose retry finds the new primary.
READ_ONLY_SQLSTATE = "25006"


def handle_internal_error(error: Exception):
    orig = getattr(error, "orig", error)
    if getattr(orig, "sqlstate", None) == READ_ONLY_SQLSTATE:
        return handle_database_unavailable(error)
    return handle_unexpected(error)


def handle_unexpected(error: Exception):
    log.exception("unhandled error")
    return error_response(500, "internal server error")


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(PubSubError, handle_pubsub_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(sqlalchemy.exc.DataError, handle_data_error)
    app.register_error_handler(sqlalchemy.exc.OperationalError, handle_database_unavailable)
    app.register_error_handler(sqlalchemy.exc.InterfaceError, handle_database_unavailable)
    app.register_error_handler(sqlalchemy.exc.TimeoutError, handle_database_unavailable)
    app.register_error_handler(psycopg.DataError, handle_data_error)
    app.register_error_handler(psycopg.OperationalError, handle_database_unavailable)
    app.register_error_handler(psycopg.InterfaceError, handle_database_unavailable)
    app.register_error_handler(sqlalchemy.exc.InternalError, handle_internal_error)
    app.register_error_handler(psycopg.errors.ReadOnlySqlTransaction, handle_database_unavailable)
    app.register_error_handler(Exception, handle_unexpected)
