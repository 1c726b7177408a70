"""Bearer tokens (JWT) for API clients, and require_scope() for the views.

With AUTH_ENABLED=false (the default) every endpoint is open and nothing here runs on a request.
With it on, a view decorated with require_scope() needs a valid token of a client that still
exists, is active and has not been updated since the token was issued. That last check is one
indexed lookup in the request's own statement, never cached: the publish, claim, ack, nack and
extend statements make it themselves (revocation_token), and for any other request it runs as
the first statement of the request's transaction. authorize() makes every other check, and
needs no request, only the Authorization header: the views and the direct publish path
(blueprints.topics.DirectPublish) check tokens alike.
"""

import functools
import time
from datetime import timedelta

from flask import Flask, current_app, request
from flask_jwt_extended import JWTManager, create_access_token, decode_token

from pubsub import clients, db
from pubsub.clients import TokenRef
from pubsub.errors import INSUFFICIENT_SCOPE, TOKEN_REVOKED, PubSubError, Unauthorized, error_response
from pubsub.schemas import ErrorSchema

BEARER = Unauthorized.headers
SECURITY = [{"bearerAuth": []}, {"oauth2": []}]
SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
    "oauth2": {
        "type": "oauth2",
        "description": "Client credentials: the client_id and client_secret of an API client.",
        "flows": {"clientCredentials": {"tokenUrl": "/oauth/token", "scopes": {}}},
    },
}


AUTH_ERRORS = (("401", "Missing, invalid, expired or revoked token"), ("403", "The token lacks the scope"))


class Forbidden(PubSubError):
    status = 403


def unauthorized(detail: str):
    return error_response(401, detail, headers=BEARER)


def issue_token(client: dict) -> dict:
    """An access token carrying the client's id, scopes and token_version."""
    minutes = current_app.config["AUTH_ACCESS_TOKEN_EXPIRE_MINUTES"]
    token = create_access_token(
        identity=str(client["id"]),
        additional_claims={"scope": client["scopes"], "ver": client["token_version"]},
        expires_delta=timedelta(minutes=minutes),
    )
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": minutes * 60,
        "scope": client["scopes"],
    }


# Tokens this app has already verified with flask-jwt-extended, by their exact text: decoding
# costs ~0.4 ms, the dictionary lookup nothing. Per app, since the key is the app's. Only a
# byte-identical token hits, its expiry is still checked on every request, and revocation is
# checked against the database on every request regardless.
VERIFIED_TOKENS_MAX = 4096


def verify_token(authorization: str) -> dict:
    """The claims of the bearer token in an Authorization header's value, verified (signature,
    algorithm, expiry, type). Needs the app's context, not a request's."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token")
    verified = current_app.extensions["pubsub_verified_tokens"]
    claims = verified.get(token)
    if claims is None:
        claims = decode_token(token)  # failures reach the loaders in init_app: a 401
        # PyJWT checks exp only when present; a refresh token is no access token.
        if not (
            isinstance(claims.get("sub"), str)
            and isinstance(claims.get("exp"), int)
            and claims.get("type") == "access"
        ):
            raise Unauthorized("invalid token")
        if len(verified) >= VERIFIED_TOKENS_MAX:
            verified.clear()
        verified[token] = claims
    elif claims["exp"] <= time.time():
        raise Unauthorized("token has expired")
    return claims


def authorize(authorization: str, resource: str, actions: tuple[str, ...], object_id: str | None) -> TokenRef:
    """Every check of a request's token but revocation: valid, and granting RESOURCE:ACTION (or
    RESOURCE:ACTION:<object_id>) for one of the actions, or `*`. Returns what the revocation
    check needs, which the request's statement makes (RevocationCheck)."""
    claims = verify_token(authorization)
    scopes = claims.get("scope")
    scopes = scopes if isinstance(scopes, str) else ""
    if not any(clients.scope_allows(scopes, resource, action, object_id) for action in actions):
        raise Forbidden(INSUFFICIENT_SCOPE)
    token = clients.token_ref(claims["sub"], claims.get("ver"))
    if token is None:  # names no client that could be current: no need to ask the database
        raise Unauthorized(TOKEN_REVOKED)
    return token


class RevocationCheck:
    """A request's revocation check: run as the first statement of its next transaction
    (db.before_next_transaction), unless a statement that makes the check itself takes it over
    first (revocation_token)."""

    __slots__ = ("token",)

    def __init__(self, token: TokenRef):
        self.token = token

    def __call__(self, conn) -> None:
        if not clients.token_is_current(conn, *self.token):
            raise Unauthorized(TOKEN_REVOKED)


def revocation_token() -> TokenRef | None:
    """The request's token, for a statement that checks its revocation itself (publish, claim,
    ack, nack, extend): that statement takes the check over. None when auth is off or the check
    has already run."""
    check = db.take_pending(RevocationCheck)
    return check.token if check is not None else None


def require_scope(resource: str, *actions: str):
    """Require, when auth is on, a token granting RESOURCE:ACTION (or RESOURCE:ACTION:<id> for
    the object named by the view's `id`) for one of the actions, or `*`."""

    def decorator(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            if not current_app.config["AUTH_ENABLED"]:
                return view(*args, **kwargs)
            token = authorize(request.headers.get("Authorization", ""), resource, actions, kwargs.get("id"))
            # The revocation check is the first statement of the view's own transaction, or part
            # of its statement: no second pooled connection or commit per request.
            check = db.before_next_transaction(RevocationCheck(token))
            try:
                result = view(*args, **kwargs)
            except Exception:
                db.run_pending(check)  # a revoked token is a 401, whatever else went wrong
                raise
            db.run_pending(check)  # a view that opened no transaction
            return result

        # OpenAPI: document_security() reads this mark when the app's document is built.
        wrapper._apidoc = {**getattr(view, "_apidoc", {}), "requires_token": True}
        return wrapper

    return decorator


def document_security(doc: dict, doc_info: dict, *, app: Flask, **kwargs) -> dict:
    """A flask-smorest doc callback (blueprints.Blueprint): with auth on, an operation behind
    require_scope() needs a token and may answer 401 or 403; with auth off it does neither, so
    the document says nothing of tokens."""
    if doc_info.get("requires_token") and app.config["AUTH_ENABLED"]:
        doc["security"] = SECURITY
        responses = doc.setdefault("responses", {})
        for status, text in AUTH_ERRORS:
            content = {"application/json": {"schema": ErrorSchema}}
            responses[status] = {"description": text, "content": content}
    return doc


def init_app(app: Flask, api) -> None:
    config = app.config
    config.update(
        JWT_SECRET_KEY=config["AUTH_SECRET_KEY"],
        JWT_ALGORITHM=config["AUTH_ALGORITHM"],
        # Only our algorithm: "alg": "none" or another family is refused, never tried.
        JWT_DECODE_ALGORITHMS=[config["AUTH_ALGORITHM"]],
        JWT_TOKEN_LOCATION=["headers"],
        JWT_ACCESS_TOKEN_EXPIRES=timedelta(minutes=config["AUTH_ACCESS_TOKEN_EXPIRE_MINUTES"]),
    )
    jwt = JWTManager(app)
    app.extensions["pubsub_verified_tokens"] = {}
    # decode_token (in verify_token) fails only as invalid or expired: both are a 401
    # {"detail": ...} with WWW-Authenticate (flask-jwt-extended would answer the first with 422).
    # Missing and revoked tokens are raised by verify_token, authorize and the revocation check.
    jwt.invalid_token_loader(lambda reason: unauthorized("invalid token"))
    jwt.expired_token_loader(lambda header, payload: unauthorized("token has expired"))
    if config["AUTH_ENABLED"]:
        for name, scheme in SECURITY_SCHEMES.items():
            api.spec.components.security_scheme(name, scheme)
