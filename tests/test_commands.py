"""`flask pubsub cleanup-acked` and `cleanup-stuck` (serve is covered in test_serve.py)."""

import os
import subprocess
import sys
import time

import pytest

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_flask(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The real `flask` command line, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "flask", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def orders(api):
    api.create_topic("orders")


def test_cleanup_acked_deletes_old_acked_messages_and_prints_the_count(orders, api, runner):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": n} for n in range(3)])
    api.ack("sub", [m["id"] for m in api.consume("sub")])

    kept = runner.invoke(args=["pubsub", "cleanup-acked", "--older-than", "3600"])
    assert kept.exit_code == 0, kept.output
    assert "deleted 0 acked messages" in kept.output
    assert api.metrics()["acked"] == 3

    time.sleep(0.01)
    result = runner.invoke(args=["pubsub", "cleanup-acked", "--older-than", "0"])
    assert result.exit_code == 0, result.output
    assert "deleted 3 acked messages" in result.output
    assert api.metrics()["acked"] == 0


def test_cleanup_acked_defaults_to_the_configured_retention(orders, api, make_app):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    api.ack("sub", [m["id"] for m in api.consume("sub")])
    runner = make_app(CLEANUP_ACKED_MESSAGES_OLDER_THAN_SECONDS=0).test_cli_runner()
    time.sleep(0.01)
    result = runner.invoke(args=["pubsub", "cleanup-acked"])
    assert "deleted 1 acked messages older than 0s" in result.output
    assert api.metrics()["acked"] == 0


def test_cleanup_stuck_releases_expired_locks_only(orders, api, runner):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [stuck] = api.consume("sub", "crashed-worker")
    time.sleep(1.1)
    api.publish("orders", [{"n": 2}])
    [fresh] = api.consume("sub", "live-worker")

    result = runner.invoke(args=["pubsub", "cleanup-stuck", "--lock-timeout", "1"])
    assert result.exit_code == 0, result.output
    assert "released 1 stuck messages, moved 0 to the DLQ" in result.output
    assert api.metrics()["delivered"] == 1
    [again] = api.consume("sub", "new-worker")
    assert again["id"] == stuck["id"]
    assert again["delivery_attempts"] == 2
    assert fresh["id"] != stuck["id"]


def test_cleanup_stuck_dead_letters_messages_out_of_attempts(orders, api, runner):
    # A consumer that always crashes: each delivery counts, and the last one ends in the DLQ.
    api.create_subscription("sub", "orders", max_delivery_attempts=2)
    api.publish("orders", [{"poison": True}])
    for attempt in (1, 2):
        [message] = api.consume("sub", "crashing-worker")
        assert message["delivery_attempts"] == attempt
        time.sleep(1.1)
        result = runner.invoke(args=["pubsub", "cleanup-stuck", "--lock-timeout", "1"])
        assert result.exit_code == 0, result.output
    assert "released 0 stuck messages, moved 1 to the DLQ" in result.output
    assert api.consume("sub") == []
    assert api.metrics()["dlq"] == 1
    assert api.dlq("sub")[0]["payload"] == {"poison": True}


@pytest.mark.parametrize(
    "args",
    [
        ["cleanup-acked", "--older-than", "-1"],
        ["cleanup-acked", "--older-than", "soon"],
        ["cleanup-stuck", "--lock-timeout", "0"],
        ["cleanup-stuck", "--bogus"],
        ["cleanup-acked", "extra"],
    ],
)
def test_bad_arguments_give_one_line_and_a_non_zero_exit(args):
    result = run_flask("pubsub", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr


def test_a_bad_setting_stops_a_command_with_one_line_naming_it():
    result = run_flask("pubsub", "cleanup-acked", PUBSUB_SUBSCRIPTION_BACKOFF_MIN_SECONDS="500")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "pubsub: PUBSUB_SUBSCRIPTION_BACKOFF_MIN_SECONDS must not exceed"
        " PUBSUB_SUBSCRIPTION_BACKOFF_MAX_SECONDS (got 500)"
    ]


def test_database_errors_give_one_line():
    result = run_flask("pubsub", "cleanup-stuck", PUBSUB_DATABASE_URL="postgresql://nobody@127.0.0.1:9/none")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("Error: database error:")
    assert "Traceback" not in result.stderr
