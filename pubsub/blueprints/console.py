"""The operators' web console at /console: server-rendered pages and forms over the same domain
functions and scope checks as the API (a client of them: it adds pages, never rules).

Not part of the API: a plain Flask blueprint, so the OpenAPI document never sees it. With auth
on, a login exchanges a client's id and secret for a token as /oauth/token does; the session
(Flask's signed cookie) holds it until it expires, and every page and action checks it with
auth.authorize, the API's own check, then has its transaction check revocation first, as
require_scope does. Every POST form carries a CSRF token kept in the session.
"""

import hashlib
import hmac
import logging
import os
import secrets
import time

import marshmallow as ma
import orjson
import psycopg
import sqlalchemy.exc
from flask import (
    Blueprint,
    Flask,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from pubsub import auth, clients, db, messages, operations, subscriptions, topics
from pubsub.blueprints import checked_array, json_object, message_id
from pubsub.errors import INSUFFICIENT_SCOPE, InvalidInput, PubSubError, Unauthorized, ValidationFailed
from pubsub.schemas import (
    MAX_BATCH_IDS,
    MAX_PUBLISH_BATCH,
    PaginationSchema,
    RedriveQuerySchema,
    SubscriptionCreateSchema,
    TopicCreateSchema,
)

log = logging.getLogger(__name__)

bp = Blueprint("console", __name__, url_prefix="/console")

# Listed on the overview: more than a console page should hold is left to the API's paging.
OVERVIEW_MAX_ROWS = 1000
DLQ_PAGE_ROWS = 20
# The overview's counts are fetched again this often by console.js (no reload: forms keep input).
REFRESH_SECONDS = 5
# The session key file made in instance/ when neither CONSOLE_SECRET_KEY nor AUTH_SECRET_KEY is set.
SECRET_KEY_FILE = "console-secret-key"
CSRF_FIELD = "csrf_token"
SORTS = {
    # The worst backlog first: what is owed to consumers, then the age of its oldest message.
    "backlog": lambda row: (-row["backlog"], -row["oldest_unacked_age_seconds"], row["id"]),
    "oldest": lambda row: (-row["oldest_unacked_age_seconds"], -row["backlog"], row["id"]),
    "dlq": lambda row: (-row["dlq"], -row["backlog"], row["id"]),
    "id": lambda row: row["id"],
}


class ScopeMissing(PubSubError):
    """A 403 page naming the scope the session's client lacks."""

    status = 403


class FormRejected(PubSubError):
    """A POST whose CSRF token is missing or is not the session's."""

    status = 400


# --- Session secret, CSRF, login ------------------------------------------------------------------


def session_secret(app: Flask) -> str:
    """CONSOLE_SECRET_KEY; else a key derived from AUTH_SECRET_KEY (never the signing key itself);
    else a random key kept in instance/, shared by every worker and kept across restarts."""
    if app.config["CONSOLE_SECRET_KEY"]:
        return app.config["CONSOLE_SECRET_KEY"]
    if app.config["AUTH_SECRET_KEY"]:
        key = app.config["AUTH_SECRET_KEY"].encode()
        return hmac.new(key, b"pubsub console session", hashlib.sha256).hexdigest()
    path = os.path.join(app.instance_path, SECRET_KEY_FILE)
    try:
        os.makedirs(app.instance_path, exist_ok=True)
        # O_EXCL: of workers starting together, one writes the key and the others read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the writer may not have written yet
            with open(path) as file:
                key = file.read().strip()
            if key:
                return key
            time.sleep(0.01)
        raise RuntimeError(f"{path} is empty: delete it, or set PUBSUB_CONSOLE_SECRET_KEY") from None
    except OSError as error:  # a read-only instance/: the console works, its sessions per process
        log.warning("console sessions last as long as this process: %s; set PUBSUB_CONSOLE_SECRET_KEY", error)
        return secrets.token_hex(32)
    key = secrets.token_hex(32)
    with os.fdopen(fd, "w") as file:
        file.write(key)
    return key


def init_app(app: Flask) -> None:
    app.secret_key = session_secret(app)
    app.config.setdefault("SESSION_COOKIE_SAMESITE", "Lax")
    app.register_blueprint(bp)


def csrf_token() -> str:
    """The session's CSRF token, made on first use; every console form sends it back."""
    token = session.get(CSRF_FIELD)
    if token is None:
        token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


@bp.before_request
def check_form():
    if request.method != "POST":
        return
    sent = request.form.get(CSRF_FIELD, "")
    expected = session.get(CSRF_FIELD, "")
    # compare_digest: how long the comparison takes says nothing of how much was right.
    if not (expected and hmac.compare_digest(sent.encode(), expected.encode())):
        raise FormRejected("the form was not sent by this console, or the session is new: reload the page")


bp.add_app_template_global(csrf_token)


@bp.app_template_global()
def console_context() -> dict:
    return {
        "auth_enabled": current_app.config["AUTH_ENABLED"],
        "client_id": session.get("client_id"),
        "scopes": session.get("scopes"),
    }


def session_token() -> str:
    """The session's token, or Unauthorized (to the login page) when there is none or it expired."""
    token = session.get("token")
    if not token or session.get("expires_at", 0) <= time.time():
        raise Unauthorized("please log in" if not token else "your session has expired: please log in again")
    return token


def allow(resource: str, *actions: str, object_id: str | None = None) -> None:
    """The API's check (require_scope): with auth on, the session's token must grant
    RESOURCE:ACTION (or RESOURCE:ACTION:<object_id>) for one of the actions, or `*`; the next
    transaction checks that its client has not been revoked since."""
    if not current_app.config["AUTH_ENABLED"]:
        return
    try:
        token = auth.authorize(f"Bearer {session_token()}", resource, actions, object_id)
    except auth.Forbidden:
        needed = " or ".join(f"{resource}:{action}" for action in actions)
        raise ScopeMissing(f"{INSUFFICIENT_SCOPE}: this needs {needed}") from None
    if "console_revocation_check" not in g:  # once a request, however many scopes it needs
        g.console_revocation_check = db.before_next_transaction(auth.RevocationCheck(token))


def permitted(resource: str, *actions: str, object_id: str | None = None) -> bool:
    """Whether allow() passes: for parts of a page that need more than the page itself."""
    try:
        allow(resource, *actions, object_id=object_id)
    except ScopeMissing:
        return False
    return True


@bp.errorhandler(PubSubError)
def error_page(error: PubSubError):
    if isinstance(error, Unauthorized) and request.endpoint != "console.login":
        for key in ("token", "expires_at", "client_id", "scopes"):
            session.pop(key, None)
        flash(error.detail)
        return redirect(url_for("console.login"))
    problems = getattr(error, "errors", None) or {}
    return render_template("console/error.html", error=error, problems=problems), error.status


@bp.errorhandler(sqlalchemy.exc.DataError)
@bp.errorhandler(psycopg.DataError)
def data_error_page(error: Exception):
    """What PostgreSQL refuses of what was sent (a NUL character in a payload): a 422 page."""
    orig = getattr(error, "orig", error)
    detail = str(getattr(orig, "diag", None) and orig.diag.message_primary or orig)
    return error_page(InvalidInput(f"invalid data: {detail}"))


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Exchange a client's id and secret for a token, as /oauth/token does, into the session."""
    if not current_app.config["AUTH_ENABLED"]:
        return redirect(url_for("console.overview"))
    if request.method == "GET":
        return render_template("console/login.html")
    if not current_app.config["AUTH_SECRET_KEY"]:
        raise PubSubError("tokens are not available: AUTH_SECRET_KEY is not set")
    with db.begin() as conn:
        client = clients.authenticate_client(
            conn, request.form.get("client_id", "").strip(), request.form.get("client_secret", "")
        )
    if client is None:
        return render_template("console/login.html", failed=True), 401
    issued = auth.issue_token(client)
    session.clear()  # a new session for a new login: no CSRF token survives from before it
    session.update(
        token=issued["access_token"],
        expires_at=int(time.time()) + issued["expires_in"],
        client_id=str(client["id"]),
        scopes=issued["scope"],
    )
    log.info("console login of client %s", client["id"])
    return redirect(url_for("console.overview"))


@bp.post("/logout")
def logout():
    session.clear()
    flash("logged out")
    return redirect(
        url_for("console.login") if current_app.config["AUTH_ENABLED"] else url_for("console.overview")
    )


# --- Pages ---------------------------------------------------------------------------------------


def subscription_rows(conn, sort: str) -> list[dict]:
    """Every subscription's settings and backlog (the /metrics gauges' count), sorted."""
    settings = {row["id"]: row for row in subscriptions.list_subscriptions(conn, 0, OVERVIEW_MAX_ROWS)}
    rows = []
    for counts in subscriptions.count_backlog(conn):
        setting = settings.get(counts["subscription_id"])
        if setting is not None:
            # Available as GET .../metrics counts it: in backoff included.
            available = counts["available"] + counts["backoff"]
            backlog = available + counts["delivered"] + counts["waiting"]
            rows.append({**setting, **counts, "available": available, "backlog": backlog})
    return sorted(rows, key=SORTS[sort])


@bp.get("/")
def overview():
    """Topics and subscriptions, with each subscription's backlog."""
    allow("topics", "read")
    allow("subscriptions", "read")
    sort = request.args.get("sort", "backlog")
    if sort not in SORTS:
        sort = "backlog"
    with db.begin() as conn:
        topic_rows = topics.list_topics(conn, 0, OVERVIEW_MAX_ROWS)
        rows = subscription_rows(conn, sort)
    return render_template(
        "console/overview.html",
        topics=topic_rows,
        subscriptions=rows,
        sort=sort,
        sorts=SORTS,
        refresh_seconds=REFRESH_SECONDS,
        now=time.strftime("%H:%M:%S UTC", time.gmtime()),
    )


@bp.get("/topics/<topic_id>")
def topic(topic_id: str):
    """A topic, its subscriptions, and a form to publish a test message."""
    allow("topics", "read", object_id=topic_id)
    with db.begin() as conn:
        found = topics.get_topic(conn, topic_id)
    return render_template("console/topic.html", topic=found)


@bp.get("/subscriptions/<subscription_id>")
def subscription(subscription_id: str):
    """A subscription's settings, counts and a page of its DLQ."""
    allow("subscriptions", "read", object_id=subscription_id)
    # Dead letters carry payloads: listing them is consuming's right, as in the API.
    can_consume = permitted("subscriptions", "consume", object_id=subscription_id)
    page = load(
        PaginationSchema(), {"offset": request.args.get("offset", "0"), "limit": DLQ_PAGE_ROWS}, "query"
    )
    with db.begin() as conn:
        found = subscriptions.get_subscription(conn, subscription_id)
        counts = subscriptions.get_metrics(conn, subscription_id)
        rows = (
            messages.list_dlq(conn, subscription_id, page["offset"], page["limit"] + 1) if can_consume else []
        )
    dead = [
        {"id": id, "payload": pretty_json(payload), "attempts": attempts, "created_at": created_at}
        for id, payload, attempts, created_at in rows[: page["limit"]]
    ]
    return render_template(
        "console/subscription.html",
        subscription=found,
        counts=counts,
        dead=dead,
        offset=page["offset"],
        limit=page["limit"],
        more=len(rows) > page["limit"],
        can_consume=can_consume,
    )


def pretty_json(text: str) -> str:
    return orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


# --- Actions: each a POST form, answered with a redirect (post/redirect/get) -------------------------


def load(schema: ma.Schema, data: dict, location: str = "form") -> dict:
    """Form input through the API's own schema: its limits, its messages, a 422 page."""
    try:
        return schema.load(data)
    except ma.ValidationError as error:
        messages_ = error.messages if isinstance(error.messages, dict) else {"_schema": error.messages}
        raise ValidationFailed(
            {f"{location}.{field}": [str(text) for text in texts] for field, texts in messages_.items()}
        ) from None


def form_integer(name: str):
    """A form field for an integer field of a schema: absent when empty, an int when it is one,
    else the text itself, for the schema to refuse by name."""
    text = request.form.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def form_json(name: str, required: bool = False):
    """A JSON form field, parsed; a 422 naming the field when it is not JSON."""
    text = request.form.get(name, "").strip()
    if not text:
        if required:
            raise ValidationFailed({f"form.{name}": ["Missing data for required field."]})
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise ValidationFailed({f"form.{name}": [f"not JSON: {error}"]}) from None


@bp.post("/topics")
def create_topic():
    allow("topics", "create")
    data = load(TopicCreateSchema(), {"id": request.form.get("id", "").strip()})
    with db.begin() as conn:
        topics.create_topic(conn, data["id"])
    flash(f"topic {data['id']} created")
    return redirect(url_for("console.topic", topic_id=data["id"]))


@bp.post("/topics/<topic_id>/delete")
def delete_topic(topic_id: str):
    allow("topics", "delete", object_id=topic_id)
    with db.begin() as conn:
        topics.delete_topic(conn, topic_id)
    flash(f"topic {topic_id} deleted, with its subscriptions and their messages")
    return redirect(url_for("console.overview"))


@bp.post("/topics/<topic_id>/publish")
def publish(topic_id: str):
    allow("topics", "publish", object_id=topic_id)
    body = form_json("payload", required=True)
    batch = checked_array(body if isinstance(body, list) else [body], MAX_PUBLISH_BATCH, json_object)
    with db.connect() as conn:
        copies = messages.publish(conn, topic_id, orjson.dumps(batch).decode())
    flash(f"published {len(batch)} message(s) to {topic_id}: {copies} subscription copies")
    return redirect(url_for("console.topic", topic_id=topic_id))


@bp.post("/subscriptions")
def create_subscription():
    allow("subscriptions", "create")
    form = {
        "id": request.form.get("id", "").strip(),
        "topic_id": request.form.get("topic_id", "").strip(),
        "filter": form_json("filter"),
        "ordering_key": request.form.get("ordering_key", "").strip() or None,
    }
    for field in (
        "max_delivery_attempts",
        "backoff_min_seconds",
        "backoff_max_seconds",
        "ack_deadline_seconds",
    ):
        form[field] = form_integer(field)
    data = load(SubscriptionCreateSchema(), form)
    with db.begin() as conn:
        subscriptions.create_subscription(
            conn,
            data["id"],
            data["topic_id"],
            data["filter"],
            data["max_delivery_attempts"],
            data["backoff_min_seconds"],
            data["backoff_max_seconds"],
            data["ack_deadline_seconds"],
            data["ordering_key"],
        )
    flash(f"subscription {data['id']} created")
    return redirect(url_for("console.subscription", subscription_id=data["id"]))


@bp.post("/subscriptions/<subscription_id>/delete")
def delete_subscription(subscription_id: str):
    allow("subscriptions", "delete", object_id=subscription_id)
    with db.begin() as conn:
        subscriptions.delete_subscription(conn, subscription_id)
    flash(f"subscription {subscription_id} deleted, with its messages")
    return redirect(url_for("console.overview"))


def chunk_rows() -> int:
    return current_app.config["OPERATIONS_CHUNK_ROWS"]


def back_to(subscription_id: str, text: str):
    flash(text)
    return redirect(url_for("console.subscription", subscription_id=subscription_id))


@bp.post("/subscriptions/<subscription_id>/dlq/reprocess")
def reprocess(subscription_id: str):
    allow("subscriptions", "consume", object_id=subscription_id)
    ids = checked_array(request.form.getlist("ids"), MAX_BATCH_IDS, message_id)
    if not ids:
        raise ValidationFailed({"form.ids": ["select at least one message"]})
    with db.connect() as conn:
        count = messages.reprocess(conn, subscription_id, ids)
    return back_to(subscription_id, f"{count} dead letter(s) back in the queue")


@bp.post("/subscriptions/<subscription_id>/dlq/redrive")
def redrive(subscription_id: str):
    allow("subscriptions", "consume", object_id=subscription_id)
    given = form_integer("limit")
    limit = load(RedriveQuerySchema(), {} if given is None else {"limit": given})
    with db.connect() as conn:  # autocommit: each chunk commits on its own
        count = operations.redrive_dlq(conn, subscription_id, chunk_rows(), limit.get("limit"))
    return back_to(subscription_id, f"{count} dead letter(s) redriven")


@bp.post("/subscriptions/<subscription_id>/dlq/purge")
def purge_dlq(subscription_id: str):
    allow("subscriptions", "delete", object_id=subscription_id)
    with db.connect() as conn:
        count = operations.purge_dlq(conn, subscription_id, chunk_rows())
    return back_to(subscription_id, f"{count} dead letter(s) deleted")


@bp.post("/subscriptions/<subscription_id>/purge")
def purge_backlog(subscription_id: str):
    allow("subscriptions", "delete", object_id=subscription_id)
    with db.connect() as conn:
        count = operations.purge_backlog(conn, subscription_id, chunk_rows())
    return back_to(subscription_id, f"{count} message(s) of the backlog deleted")
