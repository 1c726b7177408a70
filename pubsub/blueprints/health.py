"""Liveness and readiness probes."""

import sqlalchemy as sa
from flask.views import MethodView

from pubsub import db
from pubsub.blueprints import Blueprint
from pubsub.errors import DatabaseUnavailable
from pubsub.schemas import ErrorSchema, StatusSchema

blp = Blueprint("health", __name__, description="Health probes")


@blp.route("/liveness")
class Liveness(MethodView):
    @blp.response(200, StatusSchema)
    def get(self):
        """The process is up (does not touch the database)."""
        return {"status": "alive"}


@blp.route("/readiness")
class Readiness(MethodView):
    @blp.response(200, StatusSchema)
    @blp.alt_response(
        503,
        schema=ErrorSchema,
        description="Database unreachable",
        headers={"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    )
    def get(self):
        """The database answers; 503 while it does not."""
        try:
            with db.begin() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            # The API's own 503 (errors.handle_database_unavailable), without its warning: a
            # probe asks every few seconds, and its 503 already says it.
            raise DatabaseUnavailable() from None
        return {"status": "ready"}
