"""API clients: credentials and scopes (an admin's endpoints)."""

import uuid

from flask.views import MethodView

from pubsub import clients, db
from pubsub.auth import require_scope
from pubsub.blueprints import Blueprint
from pubsub.errors import ValidationFailed
from pubsub.schemas import (
    ClientCreateSchema,
    ClientListSchema,
    ClientSchema,
    ClientSecretSchema,
    ClientUpdateSchema,
    ErrorSchema,
    PaginationSchema,
)

blp = Blueprint("clients", __name__, url_prefix="/clients", description="API clients and their scopes")

NOT_FOUND = {"schema": ErrorSchema, "description": "Client not found"}
BAD_ID = {"schema": ErrorSchema, "description": "Invalid input, or an id that is not a UUID"}


def parse_client_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationFailed({"path.id": ["Not a valid UUID."]}) from None


@blp.route("")
class Clients(MethodView):
    @require_scope("clients", "create")
    @blp.arguments(ClientCreateSchema())
    @blp.response(201, ClientSecretSchema)
    def post(self, data):
        """Create a client; its secret is in this response only."""
        with db.begin() as conn:
            client_id, secret = clients.create_client(conn, data["name"], data["scopes"], data["is_active"])
        return {"id": client_id, "secret": secret}

    @require_scope("clients", "read")
    @blp.arguments(PaginationSchema(), location="query")
    @blp.response(200, ClientListSchema)
    def get(self, page):
        """List clients, oldest first."""
        with db.begin() as conn:
            return {"data": clients.list_clients(conn, page["offset"], page["limit"])}


# Documented as a UUID; anything else is a 422 naming path.id (parse_client_id), not a 404.
@blp.route("/<id>", parameters=[{"in": "path", "name": "id", "schema": {"type": "string", "format": "uuid"}}])
class Client(MethodView):
    @require_scope("clients", "read")
    @blp.response(200, ClientSchema)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(422, **BAD_ID)
    def get(self, id):
        """Get a client (never its secret)."""
        with db.begin() as conn:
            return clients.get_client(conn, parse_client_id(id))

    @require_scope("clients", "update")
    @blp.arguments(ClientUpdateSchema())
    @blp.response(200, ClientSchema)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(422, **BAD_ID)
    def put(self, data, id):
        """Replace a client's name, scopes and state; its tokens issued before stop working."""
        with db.begin() as conn:
            return clients.update_client(
                conn, parse_client_id(id), data["name"], data["scopes"], data["is_active"]
            )

    @require_scope("clients", "delete")
    @blp.response(204)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(422, **BAD_ID)
    def delete(self, id):
        """Delete a client; its tokens stop working."""
        with db.begin() as conn:
            clients.delete_client(conn, parse_client_id(id))
