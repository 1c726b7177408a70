"""One module per resource. Shared here: the Blueprint class and reading JSON bodies."""

import functools
import re
from collections.abc import Callable
from typing import Any

import flask_smorest
import marshmallow as ma
import orjson
from flask import Response, request
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


def document_only(decorator: Callable) -> Callable:
    """Keep the OpenAPI documentation a flask-smorest decorator adds, without its wrapper: each
    wrapper costs a call and an ensure_sync() on every request, and these only document."""

    def apply(view: Callable) -> Callable:
        view._apidoc = decorator(view)._apidoc
        return view

    return apply


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = OrjsonParser()

    def alt_response(self, *args, **kwargs):
        return document_only(super().alt_response(*args, **kwargs))

    @staticmethod
    def doc(**kwargs):
        return document_only(flask_smorest.Blueprint.doc(**kwargs))

    def response(self, status_code, schema=None, **kwargs):
        """As flask-smorest's, except that a 204 view returns its empty response itself: the
        generic wrapper would serialize None with jsonify on every call, for nothing."""
        decorator = super().response(status_code, schema, **kwargs)
        if int(status_code) != 204 or schema is not None:
            return decorator

        def apply(view: Callable) -> Callable:
            @functools.wraps(view)
            def wrapper(*args, **kwargs):
                result = view(*args, **kwargs)
                return Response(status=204) if result is None else result

            wrapper._apidoc = decorator(view)._apidoc
            return wrapper

        return apply


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
        try:
            body = [item(value) for value in body]
        except ma.ValidationError:  # the slow path, only to name every bad item
            raise ValidationFailed(item_problems(body, item)) from None
    return body, raw


def item_problems(body: list, item: Callable[[Any], Any]) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    for index, value in enumerate(body):
        try:
            item(value)
        except ma.ValidationError as error:
            messages = error.messages
            problems[f"json.{index}"] = messages if isinstance(messages, list) else [str(messages)]
    return problems


_UUID = ma.fields.UUID()
CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def message_id(value: Any) -> str:
    """A message id as canonical UUID text. The usual form passes a regular expression; only
    other spellings (no hyphens, braces, urn:uuid:) go through marshmallow's UUID field, which
    costs ~10 µs an id, too much for batches of 1000."""
    if isinstance(value, str) and CANONICAL_UUID.fullmatch(value):
        return value
    return str(_UUID.deserialize(value))


def json_object(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ma.ValidationError("must be a JSON object")
    return value
