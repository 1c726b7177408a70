"""One module per resource. Shared here: the Blueprint class and reading JSON bodies."""

from collections.abc import Callable
from typing import Any

import flask_smorest
import marshmallow as ma
import orjson
from flask import request
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import BadRequest, UnsupportedMediaType

from pubsub.errors import ValidationFailed


class OrjsonParser(FlaskParser):
    """webargs with orjson: the standard library's parser recurses, so deeply nested JSON
    raised RecursionError (a 500); orjson stops at 1024 levels with a JSONDecodeError (a 400)."""

    def _raw_load_json(self, req):
        if not is_json_request(req):
            return core.missing
        return orjson.loads(req.get_data(cache=True))


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = OrjsonParser()


def read_json_body() -> tuple[Any, bytes]:
    """The parsed body and its raw bytes. Malformed JSON (or not UTF-8, NaN, nesting past 1024
    levels) is a 400; a body that is not declared as JSON is a 415."""
    if not request.is_json:
        raise UnsupportedMediaType("Content-Type must be application/json")
    raw = request.get_data(cache=True)
    try:
        return orjson.loads(raw), raw
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"Invalid JSON body: {error}") from None


def load_json_array(max_items: int, item: Callable[[Any], Any] | None = None) -> tuple[list, bytes]:
    """A JSON array body of at most max_items, each item checked (and converted) by `item`."""
    body, raw = read_json_body()
    if not isinstance(body, list):
        raise ValidationFailed({"json": ["must be a JSON array"]})
    if len(body) > max_items:
        raise ValidationFailed({"json": [f"at most {max_items} items per request"]})
    if item is not None:
        problems: dict[str, list[str]] = {}
        converted = []
        for index, value in enumerate(body):
            try:
                converted.append(item(value))
            except ma.ValidationError as error:
                problems[f"json.{index}"] = (
                    error.messages if isinstance(error.messages, list) else [str(error.messages)]
                )
        if problems:
            raise ValidationFailed(problems)
        body = converted
    return body, raw


_UUID = ma.fields.UUID()


def message_id(value: Any):
    return _UUID.deserialize(value)


def json_object(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ma.ValidationError("must be a JSON object")
    return value
