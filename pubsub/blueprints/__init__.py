"""One module per resource. Shared here: the Blueprint class and reading JSON bodies."""

import functools
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import flask_smorest
import marshmallow as ma
import orjson
from flask import Response, current_app, request
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

from pubsub import auth
from pubsub.encoding import json_response
from pubsub.errors import ValidationFailed
from pubsub.schemas import EXTENSION, UUID_PATTERN, ErrorSchema


def request_body() -> bytes:
    """The raw body, or 413 when it is larger than MAX_CONTENT_LENGTH (API_MAX_BODY_BYTES).

    Werkzeug refuses a larger Content-Length itself, but cuts a chunked body (no length) at the
    limit without a word: one more byte to read means it was larger. A body shorter than its
    Content-Length is a 400: gunicorn ends the stream where the client stopped sending, and
    what came may still parse as JSON."""
    raw = request.get_data(cache=True)
    if request.content_length is not None and len(raw) < request.content_length:
        raise BadRequest("the body is shorter than its Content-Length")
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and limit is not None and len(raw) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    return raw


def check_query_string(query_string: str) -> None:
    """422 for a query string that is not percent-encoded UTF-8: Werkzeug would re-quote bad
    escapes into the values (a consumer_id of "%FF"), and fail with a 500 on raw bytes, which
    PEP 3333 passes through as latin-1."""
    try:
        unquote_to_bytes(query_string.encode("ascii")).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise ValidationFailed({"query": ["must be percent-encoded UTF-8"]}) from None


QUERY_CACHE_SIZE = 10_000
_query_cache: dict[tuple, dict] = {}


class OrjsonParser(FlaskParser):
    """webargs with orjson: the standard library's parser recurses, so deeply nested JSON
    raised RecursionError (a 500); orjson stops at 1024 levels with a JSONDecodeError (a 400)."""

    def _raw_load_json(self, req):
        if not is_json_request(req):
            return core.missing
        return orjson.loads(request_body())

    def load_querystring(self, req, schema):
        check_query_string(req.environ.get("QUERY_STRING", ""))
        return super().load_querystring(req, schema)

    def parse(self, argmap, req=None, *, location=None, **kwargs):
        """Query arguments are a function of the query string alone, so each process keeps the
        last QUERY_CACHE_SIZE answers: a consumer asks with the same query string every time,
        and the load is a tenth of what a long poll that finds nothing costs the server. Only
        what loads without error is kept; a miss loads as before."""
        if location != "query" or not isinstance(argmap, ma.Schema):
            return super().parse(argmap, req, location=location, **kwargs)
        # Keyed without kwargs: each view has a schema instance of its own (and so one set of
        # them), which also lets a request answered without Flask find its view's entry.
        key = (id(argmap), request.environ.get("QUERY_STRING", ""))
        loaded = _query_cache.get(key)
        if loaded is None:
            loaded = super().parse(argmap, req, location=location, **kwargs)
            if len(_query_cache) >= QUERY_CACHE_SIZE:
                _query_cache.clear()
            _query_cache[key] = loaded
        return dict(loaded)


def cached_query(schema: ma.Schema, query_string: str) -> dict | None:
    """The arguments that the view whose schema this is loaded from this query string before,
    or None if it has not (lately): what a request answered without Flask may take as valid."""
    loaded = _query_cache.get((id(schema), query_string))
    return None if loaded is None else dict(loaded)


def answer_error(app, environ: dict, start_response, error: Exception):
    """Answer an error raised while serving a request without Flask as the app's own handlers
    answer it, never by running the view again: by then its work may be done."""
    with app.request_context(environ):
        response = app.make_response(app.handle_user_exception(error))
        return response(environ, start_response)


def document_only(decorator: Callable) -> Callable:
    """Keep the OpenAPI documentation a flask-smorest decorator adds, without its wrapper: each
    wrapper costs a call and an ensure_sync() on every request, and these only document."""

    def apply(view: Callable) -> Callable:
        view._apidoc = decorator(view)._apidoc
        return view

    return apply


class NoContent(Response):
    """A 204: no body, so no Content-Type (Werkzeug's default would say text/html), and cheaper
    to build."""

    default_mimetype = None


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = OrjsonParser()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Run for each operation when an app registers the blueprint: the app's config decides.
        self._prepare_doc_cbks.append(auth.document_security)

    def alt_response(self, *args, **kwargs):
        return document_only(super().alt_response(*args, **kwargs))

    def arguments(self, schema, *, location="json", **kwargs):
        """As flask-smorest's; a JSON body also documents the 400 for malformed JSON."""
        decorator = super().arguments(schema, location=location, **kwargs)
        if location != "json":
            return decorator
        malformed = self.alt_response(400, schema=ErrorSchema, description="Malformed JSON")
        return lambda view: malformed(decorator(view))

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
                return NoContent(status=204) if result is None else result

            wrapper._apidoc = decorator(view)._apidoc
            return wrapper

        return apply


PREFER_HEADER = {
    "in": "header",
    "name": "Prefer",
    "required": False,
    "schema": {"type": "string", "example": "return=representation"},
    "description": "RFC 7240. return=representation: answer with the result instead of 204;"
    f" other preferences are ignored. {EXTENSION}",
}


def document_prefer(view: Callable) -> Callable:
    """Document the Prefer header, which the view reads itself: added to the parameters
    flask-smorest documents from @arguments, which doc(parameters=...) would replace."""
    apidoc = getattr(view, "_apidoc", {})
    arguments = apidoc.get("arguments", {})
    parameters = [*arguments.get("parameters", []), PREFER_HEADER]
    view._apidoc = {**apidoc, "arguments": {**arguments, "parameters": parameters}}
    return view


def wants_representation() -> bool:
    """RFC 7240 `Prefer: return=representation`: the caller asks for a result body."""
    prefer = request.headers.get("Prefer")
    if not prefer:
        return False
    preferences = (part.split(";")[0].strip().lower() for part in prefer.split(","))
    return "return=representation" in preferences


def representation(body: dict, status: int = 200) -> Response:
    response = json_response(body, status)
    response.headers["Preference-Applied"] = "return=representation"
    return response


def read_json_body() -> tuple[Any, bytes]:
    """The parsed body and its raw bytes. Malformed JSON (or not UTF-8, NaN, nesting past 1024
    levels) is a 400; a body that is not declared as JSON is a 415."""
    if not request.is_json:
        raise UnsupportedMediaType("Content-Type must be application/json")
    raw = request_body()
    try:
        return orjson.loads(raw), raw
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"Invalid JSON body: {error}") from None


def load_json_array(max_items: int, item: Callable[[Any], Any] | None = None) -> tuple[list, bytes]:
    """A JSON array body of at most max_items, each item checked (and converted) by `item`."""
    body, raw = read_json_body()
    return checked_array(body, max_items, item), raw


def checked_array(body: Any, max_items: int, item: Callable[[Any], Any] | None = None) -> list:
    """The parsed body as a JSON array of at most max_items, each item checked (and converted) by
    `item`, or ValidationFailed naming what is wrong."""
    if not isinstance(body, list):
        raise ValidationFailed({"json": ["must be a JSON array"]})
    if len(body) > max_items:
        raise ValidationFailed({"json": [f"at most {max_items} items per request"]})
    if item is not None:
        try:
            body = [item(value) for value in body]
        except ma.ValidationError:  # the slow path, only to name every bad item
            raise ValidationFailed(item_problems(body, item)) from None
    return body


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
CANONICAL_UUID = re.compile(UUID_PATTERN)


def message_id(value: Any) -> str:
    """A message id as canonical UUID text. The usual form passes a regular expression; only
    other spellings (no hyphens, braces, urn:uuid:) go through marshmallow's UUID field, which
    costs ~10 µs an id, too much for batches of 1000."""
    if isinstance(value, str) and CANONICAL_UUID.fullmatch(value):
        return value
    return str(_UUID.deserialize(value))


LEASE_TOKEN = re.compile(f"({UUID_PATTERN}):([0-9]{{1,9}})")


def message_ref(value: Any) -> tuple[str, int | None]:
    """A message id (its current delivery) or a lease token, "<id>:<lease>" (that delivery)."""
    try:
        if isinstance(value, str) and (token := LEASE_TOKEN.fullmatch(value)):
            return message_id(token[1]), int(token[2])
        return message_id(value), None
    except ma.ValidationError:
        raise ma.ValidationError("must be a message id (a UUID) or an ack_id") from None


def json_object(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ma.ValidationError("must be a JSON object")
    return value
