"""Bearer tokens (JWT) for API clients, and require_scope() for the views.

With AUTH_ENABLED=false (the default) every endpoint is open and nothing here runs on a request.
With it on, a view decorated with require_scope() needs a valid token of a client that still
exists, is active and has not been updated since the token was issued (one indexed lookup).
"""

import copy
import functools
from datetime import timedelta

from flask import Flask, current_app
from flask_jwt_extended import JWTManager, create_access_token, get_jwt, verify_jwt_in_request

from pubsub import clients, db
from pubsub.errors import PubSubError, error_response
from pubsub.schemas import ErrorSchema

BEARER = {"WWW-Authenticate": "Bearer"}
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


class Unauthorized(PubSubError):
    status = 401
    headers = BEARER


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


def token_revoked(jwt_header: dict, jwt_payload: dict) -> bool:
    if "exp" not in jwt_payload:  # PyJWT checks exp only when present; ours always carry one
        return True
    with db.begin() as conn:
        return not clients.token_is_current(conn, jwt_payload.get("sub"), jwt_payload.get("ver"))


def require_scope(resource: str, *actions: str):
    """Require, when auth is on, a token granting RESOURCE:ACTION (or RESOURCE:ACTION:<id> for
    the object named by the view's `id`) for one of the actions, or `*`."""

    def decorator(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            if current_app.config["AUTH_ENABLED"]:
                verify_jwt_in_request()
                scopes = get_jwt().get("scope")
                scopes = scopes if isinstance(scopes, str) else ""
                object_id = kwargs.get("id")
                if not any(clients.scope_allows(scopes, resource, a, object_id) for a in actions):
                    needed = " or ".join(f"{resource}:{a}" for a in actions)
                    raise Forbidden(f"this token lacks the scope {needed}")
            return view(*args, **kwargs)

        # OpenAPI: the operation needs a token and may answer 401 or 403.
        apidoc = copy.deepcopy(getattr(view, "_apidoc", {}))
        manual = apidoc.setdefault("manual_doc", {})
        manual["security"] = SECURITY
        responses = manual.setdefault("responses", {})
        for status, text in AUTH_ERRORS:
            content = {"application/json": {"schema": ErrorSchema}}
            responses[status] = {"description": text, "content": content}
        wrapper._apidoc = apidoc
        return wrapper

    return decorator


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
    # Every token problem is a 401 {"detail": ...} with WWW-Authenticate (flask-jwt-extended
    # would answer some with 422).
    jwt.unauthorized_loader(lambda reason: unauthorized("missing bearer token"))
    jwt.invalid_token_loader(lambda reason: unauthorized("invalid token"))
    jwt.expired_token_loader(lambda header, payload: unauthorized("token has expired"))
    jwt.revoked_token_loader(lambda header, payload: unauthorized("token has been revoked"))
    jwt.needs_fresh_token_loader(lambda header, payload: unauthorized("invalid token"))
    jwt.token_verification_failed_loader(lambda header, payload: unauthorized("invalid token"))
    jwt.user_lookup_error_loader(lambda header, payload: unauthorized("invalid token"))
    jwt.token_in_blocklist_loader(token_revoked)
    for name, scheme in SECURITY_SCHEMES.items():
        api.spec.components.security_scheme(name, scheme)
