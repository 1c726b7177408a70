"""Configuration: defaults, instance/config.py, PUBSUB_* variables, and refusal of bad values."""

import os

import pytest

from pubsub import create_app
from pubsub.settings import ConfigError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in os.environ:
        if name.startswith("PUBSUB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PUBSUB_INSTANCE_PATH", str(tmp_path))


def test_defaults():
    app = create_app()
    assert app.config["DATABASE_POOL_SIZE"] == 5
    assert app.config["SUBSCRIPTION_MAX_ATTEMPTS"] == 5
    assert app.config["API_HOST"] == "127.0.0.1"
    assert app.config["API_PORT"] == 8000
    assert app.config["AUTH_ENABLED"] is False


def test_environment_variables_override_with_the_pubsub_prefix(monkeypatch):
    monkeypatch.setenv("PUBSUB_DATABASE_POOL_SIZE", "12")
    monkeypatch.setenv("PUBSUB_DATABASE_POOL_PRE_PING", "false")
    monkeypatch.setenv("PUBSUB_LOG_FORMAT", "json")
    monkeypatch.setenv("PUBSUB_DATABASE_URL", "postgresql://u:p@db.example:5432/x")
    app = create_app()
    assert app.config["DATABASE_POOL_SIZE"] == 12
    assert app.config["DATABASE_POOL_PRE_PING"] is False
    assert app.config["LOG_FORMAT"] == "json"
    assert app.config["DATABASE_URL"] == "postgresql://u:p@db.example:5432/x"


def test_instance_config_sits_between_defaults_and_environment(tmp_path, monkeypatch):
    (tmp_path / "config.py").write_text("API_NUM_THREADS = 3\nAPI_NUM_WORKERS = 4\n")
    monkeypatch.setenv("PUBSUB_INSTANCE_PATH", str(tmp_path))
    monkeypatch.setenv("PUBSUB_API_NUM_WORKERS", "2")
    app = create_app()
    assert app.config["API_NUM_THREADS"] == 3
    assert app.config["API_NUM_WORKERS"] == 2


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DATABASE_POOL_SIZE", "0", "PUBSUB_DATABASE_POOL_SIZE must be a number >= 1"),
        ("DATABASE_POOL_SIZE", "many", "PUBSUB_DATABASE_POOL_SIZE must be a whole number"),
        ("DATABASE_ECHO", "maybe", "PUBSUB_DATABASE_ECHO must be true or false"),
        ("API_PORT", "70000", "PUBSUB_API_PORT must be <= 65535"),
        ("LOG_LEVEL", "loud", "PUBSUB_LOG_LEVEL must be one of"),
        ("LOG_FORMAT", "xml", "PUBSUB_LOG_FORMAT must be one of"),
        ("DATABASE_URL", "mysql://x", "PUBSUB_DATABASE_URL must start with postgresql://"),
        ("DATABASE_LISTEN_URL", "mysql://x", "PUBSUB_DATABASE_LISTEN_URL must start with postgresql://"),
        (
            "DATABASE_PREPARED_STATEMENTS",
            "maybe",
            "PUBSUB_DATABASE_PREPARED_STATEMENTS must be true or false",
        ),
        (
            "SUBSCRIPTION_BACKOFF_MIN_SECONDS",
            "301",
            "PUBSUB_SUBSCRIPTION_BACKOFF_MIN_SECONDS must not exceed",
        ),
        # As a subscription's own limits: at least 1.
        ("SUBSCRIPTION_MAX_ATTEMPTS", "0", "PUBSUB_SUBSCRIPTION_MAX_ATTEMPTS must be a number >= 1"),
        (
            "SUBSCRIPTION_BACKOFF_MIN_SECONDS",
            "0",
            "PUBSUB_SUBSCRIPTION_BACKOFF_MIN_SECONDS must be a number >= 1",
        ),
        (
            "SUBSCRIPTION_BACKOFF_MAX_SECONDS",
            "0",
            "PUBSUB_SUBSCRIPTION_BACKOFF_MAX_SECONDS must be a number >= 1",
        ),
    ],
)
def test_invalid_values_stop_start_up_naming_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(f"PUBSUB_{name}", value)
    with pytest.raises(ConfigError, match=message):
        create_app()


@pytest.mark.parametrize("token", ["two words", "tab\there", "caf\u00e9", "=padding-first"])
def test_a_metrics_token_no_header_could_carry_is_refused_unprinted(monkeypatch, token):
    monkeypatch.setenv("PUBSUB_METRICS_BEARER_TOKEN", token)
    with pytest.raises(ConfigError, match="PUBSUB_METRICS_BEARER_TOKEN must be") as refused:
        create_app()
    assert token not in str(refused.value)


@pytest.mark.parametrize(("raw", "token"), [("", None), ("s3cret.Token-_~+/==", "s3cret.Token-_~+/==")])
def test_metrics_token_from_the_environment(monkeypatch, raw, token):
    monkeypatch.setenv("PUBSUB_METRICS_BEARER_TOKEN", raw)
    assert create_app().config["METRICS_BEARER_TOKEN"] == token
