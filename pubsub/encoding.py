"""JSON in and out with orjson: faster than the standard library, and strict where PostgreSQL is
(NaN and Infinity are not JSON, and jsonb would refuse them anyway)."""

from typing import Any

import orjson
from flask import Flask, Response
from flask.json.provider import JSONProvider


class OrjsonProvider(JSONProvider):
    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(orjson.dumps(obj), mimetype="application/json")


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status=status, mimetype="application/json")


def message_json(row: tuple, subscription_id: str) -> dict:
    """A message for the API from an (id, payload, delivery_attempts, created_at[, lease, ...])
    row; its payload is JSON text from PostgreSQL, embedded unparsed. A delivery (a row with its
    lease) carries its lease token, ack_id."""
    id, payload, delivery_attempts, created_at, *lease = row
    message = {
        "id": id,
        "subscription_id": subscription_id,
        "payload": orjson.Fragment(payload),
        "delivery_attempts": delivery_attempts,
        "created_at": created_at,
    }
    if lease:
        message["ack_id"] = f"{id}:{lease[0]}"
    return message


def init_app(app: Flask) -> None:
    app.json = OrjsonProvider(app)
