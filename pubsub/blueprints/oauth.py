"""OAuth2 client-credentials token endpoint."""

import base64
import binascii

from flask import current_app, request
from flask.views import MethodView

from pubsub import clients, db
from pubsub.auth import Unauthorized, issue_token
from pubsub.blueprints import Blueprint, read_json_body
from pubsub.errors import InvalidInput, PubSubError, ValidationFailed
from pubsub.schemas import ErrorSchema, TokenRequestSchema, TokenSchema

blp = Blueprint("oauth", __name__, url_prefix="/oauth", description="Access tokens")

BAD_CREDENTIALS = "invalid client credentials"


def basic_credentials() -> tuple[str, str] | None:
    """client_id and client_secret from an HTTP Basic header, as Swagger UI sends them by default."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized(BAD_CREDENTIALS) from None
    return client_id, secret


def read_credentials() -> tuple[str, str]:
    """From JSON {client_id, client_secret}, an OAuth2 form (grant_type=client_credentials), or Basic."""
    basic = basic_credentials()
    if request.mimetype == "application/x-www-form-urlencoded":
        body = request.form.to_dict()
    elif basic is not None and not request.get_data(cache=True):
        body = {}
    else:
        body = read_json_body()[0]
    if not isinstance(body, dict):
        raise ValidationFailed({"json": ["must be a JSON object"]})
    # Whichever way the credentials come, a grant_type, if given, must be this one.
    if body.get("grant_type", "client_credentials") != "client_credentials":
        raise InvalidInput("grant_type must be client_credentials")
    if basic is not None:
        return basic
    problems = {
        f"json.{field}": ["Missing or not a string."]
        for field in ("client_id", "client_secret")
        if not isinstance(body.get(field), str)
    }
    if problems:
        raise ValidationFailed(problems)
    return body["client_id"], body["client_secret"]


@blp.route("/token")
class Token(MethodView):
    @blp.doc(
        requestBody={
            "required": True,
            "content": {
                "application/json": {"schema": TokenRequestSchema},
                "application/x-www-form-urlencoded": {"schema": TokenRequestSchema},
            },
        }
    )
    @blp.response(201, TokenSchema)
    @blp.alt_response(
        400, schema=ErrorSchema, description="Malformed body, or tokens unavailable (no AUTH_SECRET_KEY)"
    )
    @blp.alt_response(401, schema=ErrorSchema, description="Unknown, inactive or wrong credentials")
    @blp.alt_response(415, schema=ErrorSchema, description="Neither JSON nor a form")
    @blp.alt_response(422, schema=ErrorSchema, description="Missing fields")
    def post(self):
        """Exchange a client's id and secret for an access token."""
        if not current_app.config["AUTH_SECRET_KEY"]:
            raise PubSubError("tokens are not available: AUTH_SECRET_KEY is not set")
        client_id, secret = read_credentials()
        with db.begin() as conn:
            client = clients.authenticate_client(conn, client_id, secret)
        if client is None:
            raise Unauthorized(BAD_CREDENTIALS)
        return issue_token(client)
