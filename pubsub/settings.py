"""Load and check the configuration: defaults, instance/config.py, PUBSUB_* variables."""

import os
import re
from typing import Any

from flask import Flask

from pubsub import config as defaults

ENV_PREFIX = "PUBSUB_"
# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting has a value the service cannot start with."""


def lists_ipv6_among_hosts(url: str | None) -> bool:
    """Whether a URL names several hosts (host1:port1,host2:port2), one of them [IPv6]."""
    netloc = (url or "").partition("://")[2].split("/", 1)[0].split("?", 1)[0]
    hosts = netloc.rpartition("@")[2]
    return "," in hosts and "[" in hosts


def setting_names() -> list[str]:
    return [name for name in vars(defaults) if name.isupper()]


def parse_value(name: str, raw: str, default: Any) -> Any:
    """Convert an environment string to the type of the setting's default."""
    if isinstance(default, bool):
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ConfigError(f"{ENV_PREFIX}{name} must be true or false, not {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name} must be a whole number, not {raw!r}") from None
    return raw or None


def load_config(app: Flask, overrides: dict[str, Any] | None = None) -> None:
    app.config.from_object(defaults)
    app.config.from_pyfile(os.path.join(app.instance_path, "config.py"), silent=True)
    for name in setting_names():
        raw = os.environ.get(ENV_PREFIX + name)
        if raw is not None:
            app.config[name] = parse_value(name, raw, getattr(defaults, name))
    app.config.update(overrides or {})
    check_config(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["API_MAX_BODY_BYTES"]


def check_config(config: dict[str, Any]) -> None:
    """Refuse values that would only fail later, naming the variable."""

    def require(ok: bool, name: str, message: str, secret: bool = False) -> None:
        if not ok:
            got = "" if secret else f" (got {config[name]!r})"  # never print a secret
            raise ConfigError(f"{ENV_PREFIX}{name} {message}{got}")

    at_least = {
        "DATABASE_POOL_SIZE": 1,
        "DATABASE_MAX_OVERFLOW": 0,
        "SUBSCRIPTION_MAX_ATTEMPTS": 1,
        "SUBSCRIPTION_BACKOFF_MIN_SECONDS": 1,  # as a subscription's own (schemas.py)
        "SUBSCRIPTION_BACKOFF_MAX_SECONDS": 1,
        "API_PORT": 1,
        "API_NUM_WORKERS": 1,
        "API_NUM_THREADS": 1,
        "API_MAX_BODY_BYTES": 1024,
        "AUTH_ACCESS_TOKEN_EXPIRE_MINUTES": 1,
        "CLEANUP_ACKED_MESSAGES_OLDER_THAN_SECONDS": 0,
        "CLEANUP_STUCK_MESSAGES_LOCK_TIMEOUT_SECONDS": 1,
        "LONG_POLL_RECHECK_SECONDS": 1,
        "LONG_POLL_MAX_WAITERS": 1,
        "METRICS_BACKLOG_CACHE_SECONDS": 0,
        "OPERATIONS_CHUNK_ROWS": 1,
        "PUBLISH_IDEMPOTENCY_SECONDS": 1,
        "DATABASE_STATEMENT_TIMEOUT_SECONDS": 0,
        "DATABASE_POOL_TIMEOUT_SECONDS": 1,
    }
    for name, low in at_least.items():
        value = config[name]
        require(isinstance(value, int) and value >= low, name, f"must be a number >= {low}")
    require(config["API_PORT"] <= 65535, "API_PORT", "must be <= 65535")
    require(
        config["SUBSCRIPTION_BACKOFF_MIN_SECONDS"] <= config["SUBSCRIPTION_BACKOFF_MAX_SECONDS"],
        "SUBSCRIPTION_BACKOFF_MIN_SECONDS",
        "must not exceed PUBSUB_SUBSCRIPTION_BACKOFF_MAX_SECONDS",
    )
    require(str(config["LOG_LEVEL"]).lower() in LOG_LEVELS, "LOG_LEVEL", f"must be one of {LOG_LEVELS}")
    require(config["LOG_FORMAT"] in LOG_FORMATS, "LOG_FORMAT", f"must be one of {LOG_FORMATS}")
    require(
        config["AUTH_ALGORITHM"] in ("HS256", "HS384", "HS512"),
        "AUTH_ALGORITHM",
        "must be HS256, HS384 or HS512 (tokens are signed with AUTH_SECRET_KEY)",
    )
    if config["AUTH_ENABLED"]:
        key = config["AUTH_SECRET_KEY"] or ""
        # RFC 7518 §3.2: an HMAC key at least as long as the hash (PyJWT warns otherwise).
        min_bytes = {"HS384": 48, "HS512": 64}.get(config["AUTH_ALGORITHM"], 32)
        require(
            len(key.encode()) >= min_bytes,
            "AUTH_SECRET_KEY",
            f"must be set, at least {min_bytes} bytes for {config['AUTH_ALGORITHM']},"
            " when PUBSUB_AUTH_ENABLED is true"
            " (make one with: PUBSUB_AUTH_ENABLED=false flask pubsub generate-secret-key)",
            secret=True,
        )
    console_key = config["CONSOLE_SECRET_KEY"]
    require(
        console_key is None or (isinstance(console_key, str) and len(console_key.encode()) >= 32),
        "CONSOLE_SECRET_KEY",
        "must be at least 32 bytes, or unset (make one with: flask pubsub generate-secret-key)",
        secret=True,
    )
    token = config["METRICS_BEARER_TOKEN"]
    require(
        token is None or (isinstance(token, str) and BEARER_TOKEN.fullmatch(token) is not None),
        "METRICS_BEARER_TOKEN",
        "must be letters, digits and -._~+/ (a bearer token), or unset",
        secret=True,
    )
    url = config["DATABASE_URL"]
    require(
        url is None or url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")),
        "DATABASE_URL",
        "must start with postgresql:// or postgresql+psycopg://",
    )
    listen_url = config["DATABASE_LISTEN_URL"]
    require(
        listen_url is None
        or listen_url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")),
        "DATABASE_LISTEN_URL",
        "must start with postgresql:// or postgresql+psycopg://, or be unset (DATABASE_URL's)",
        secret=True,  # it may hold a password
    )
    # libpq's multi-host form reaches SQLAlchemy as host:port pairs (pubsub.db.multihost_url),
    # which cannot hold a bracketed IPv6 address: refused here rather than on the first request.
    for name in ("DATABASE_URL", "DATABASE_LISTEN_URL"):
        require(
            not lists_ipv6_among_hosts(config[name]),
            name,
            "lists several hosts, one an IPv6 address in brackets, which SQLAlchemy cannot take"
            " in a multi-host URL: give that host a name",
            secret=True,  # it may hold a password
        )
    require(
        isinstance(config["DATABASE_PREPARED_STATEMENTS"], bool),
        "DATABASE_PREPARED_STATEMENTS",
        "must be true or false",
    )
