"""The `pubsub` script from any directory, and deploy/: the systemd units that run it, their
settings file and install.sh.

The script is installed as `make install` installs it (`pip install --no-deps -e .`), into a
virtualenv of this module's own that sees this one's packages: what runs is the entry point of
pyproject.toml and the editable install, from a temporary directory outside the checkout.
"""

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from pubsub import MIGRATIONS_DIR, config, create_app, settings
from tests.conftest import new_database
from tests.test_docs import missing
from tests.test_serve import (
    free_port,
    output_of,
    request,
    serve_env,
    stop_group,
    wait_for_exit,
    wait_until_live,
)

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = PROJECT_ROOT / "deploy"
INSTALLED_SCRIPT = "/opt/pubsub/venv/bin/pubsub"  # where install.sh puts it, as the units name it
SERVICES = sorted(DEPLOY.glob("*.service"))
TIMERS = sorted(DEPLOY.glob("*.timer"))
# What every service runs, as the tests below run it.
UNIT_COMMANDS = {
    "pubsub.service": [f"{INSTALLED_SCRIPT} db upgrade", f"{INSTALLED_SCRIPT} serve"],
    "pubsub-cleanup-acked.service": [f"{INSTALLED_SCRIPT} cleanup-acked"],
    "pubsub-cleanup-stuck.service": [f"{INSTALLED_SCRIPT} cleanup-stuck"],
    "pubsub-cleanup-idempotency-keys.service": [f"{INSTALLED_SCRIPT} cleanup-idempotency-keys"],
}
# What the cleanup commands print, run on an empty database.
CLEANUP_OUTPUT = {
    "cleanup-acked": "deleted 0 acked messages older than 3600s",
    "cleanup-stuck": "released 0 stuck messages, moved 0 to the DLQ",
    "cleanup-idempotency-keys": "deleted 0 idempotency keys older than 86400s",
}
HARDENING = {
    "User": "pubsub",
    "Group": "pubsub",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "StateDirectory": "pubsub",
    "Environment": "PUBSUB_INSTANCE_PATH=/var/lib/pubsub",  # the StateDirectory
    "EnvironmentFile": "/etc/pubsub/pubsub.env",
}


def tool(name: str) -> str:
    """A systemd tool: these tests must run in CI (.ci/run installs systemd), may skip elsewhere."""
    return shutil.which(name) or missing(name, "apt-get install systemd")


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections, each a list of (key, value) in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            section.append((key.strip(), value.strip()))
    return sections


def unit_values(path: Path, section: str, key: str) -> list[str]:
    return [value for name, value in unit_entries(path).get(section, []) if name == key]


def env_file_settings() -> dict[str, str]:
    """The settings deploy/pubsub.env sets (its uncommented lines)."""
    lines = (DEPLOY / "pubsub.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def install_checkout(venv: Path, *pip_args: str, checkout: Path = PROJECT_ROOT) -> str:
    """A new virtualenv that sees this one's packages, with the checkout installed by pip; its `pubsub`."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    # The requirements (and pip) from this virtualenv; pubsub only from the install below.
    Path(purelib, "requirements.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n"
    )
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", *pip_args, str(checkout)],
        cwd=venv,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return str(venv / "bin" / "pubsub")


@pytest.fixture(scope="module")
def pubsub_script(tmp_path_factory) -> str:
    """The checkout installed as `make install` installs it (editable); its `pubsub` script."""
    return install_checkout(tmp_path_factory.mktemp("venv"), "-e")


def script_env(**settings: str) -> dict[str, str]:
    """serve_env's environment without PYTHONPATH either: the script must find pubsub by itself."""
    env = serve_env(**settings)
    env.pop("PYTHONPATH", None)
    return env


def run_script(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=90, start_new_session=True
    )


def table_names(url: str) -> set[str]:
    with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(False)) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {name for (name,) in rows}


def migrated_revision(url: str) -> str:
    with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(False)) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


# The script (pubsub/__main__.py).


COMMANDS = ("serve", "cleanup-acked", "cleanup-stuck", "cleanup-idempotency-keys", "create-client", "db")


@pytest.mark.parametrize("as_module", [False, True], ids=["pubsub", "python -m pubsub"])
def test_pubsub_script_lists_every_command_from_any_directory(pubsub_script, tmp_path, as_module):
    command = [str(Path(pubsub_script).with_name("python")), "-m", "pubsub"] if as_module else [pubsub_script]
    result = run_script([*command, "--help"], tmp_path, script_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: pubsub [OPTIONS] COMMAND [ARGS]...")
    for command in COMMANDS:
        assert re.search(rf"^  {command} ", result.stdout, re.MULTILINE), result.stdout


def test_pubsub_db_upgrade_migrates_a_new_database_from_any_directory(pubsub_script, server_url, tmp_path):
    with new_database(server_url, migrate=False) as url:
        result = run_script([pubsub_script, "db", "upgrade"], tmp_path, script_env(DATABASE_URL=url))
        assert result.returncode == 0, result.stderr
        assert migrated_revision(url) == ScriptDirectory(MIGRATIONS_DIR).get_current_head()
        assert {"topics", "subscriptions", "subscription_messages"} <= table_names(url)


def test_pubsub_cleanup_acked_deletes_from_any_directory(pubsub_script, api, database_url, tmp_path):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    api.ack("sub", [m["id"] for m in api.consume("sub")])
    command = [pubsub_script, "cleanup-acked", "--older-than", "0"]
    result = run_script(command, tmp_path, script_env(DATABASE_URL=database_url))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "deleted 2 acked messages older than 0s\n"
    assert api.metrics()["acked"] == 0


def test_pubsub_script_reads_the_config_py_of_pubsub_instance_path(
    pubsub_script, api, database_url, tmp_path
):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    api.ack("sub", [m["id"] for m in api.consume("sub")])
    instance = tmp_path / "state"
    instance.mkdir()
    (instance / "config.py").write_text(
        f"DATABASE_URL = {database_url!r}\nCLEANUP_ACKED_MESSAGES_OLDER_THAN_SECONDS = 0\n"
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = run_script([pubsub_script, "cleanup-acked"], cwd, script_env(INSTANCE_PATH=str(instance)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "deleted 1 acked messages older than 0s\n"


def test_pubsub_script_refuses_a_bad_setting_in_one_line(pubsub_script, database_url, tmp_path):
    env = script_env(DATABASE_URL=database_url, CLEANUP_ACKED_MESSAGES_OLDER_THAN_SECONDS="soon")
    result = run_script([pubsub_script, "cleanup-acked"], tmp_path, env)
    assert result.returncode == 1
    assert (
        result.stderr
        == "pubsub: PUBSUB_CLEANUP_ACKED_MESSAGES_OLDER_THAN_SECONDS must be a whole number, not 'soon'\n"
    )


def test_a_copy_of_the_package_alone_refuses_to_run_in_one_line(tmp_path):
    # A non-editable install copies pubsub/ without wsgi.py and migrations/, which the commands need.
    source = tmp_path / "source"  # a copy: a build leaves build/ in the tree it builds
    shutil.copytree(PROJECT_ROOT / "pubsub", source / "pubsub", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    script = install_checkout(tmp_path / "venv", checkout=source)
    result = run_script([script, "--help"], tmp_path, script_env())
    assert result.returncode == 1
    assert result.stderr.startswith("pubsub: no checkout around ")
    assert result.stderr.endswith("install it with `pip install -e <checkout>`\n")
    assert len(result.stderr.splitlines()) == 1


# The units and their settings file.


def test_deploy_holds_the_api_service_and_a_timer_per_cleanup_job():
    assert [path.name for path in SERVICES] == sorted(UNIT_COMMANDS)
    assert [path.name for path in TIMERS] == sorted(
        name.replace(".service", ".timer") for name in UNIT_COMMANDS if name != "pubsub.service"
    )


def test_every_service_runs_only_the_commands_these_tests_run():
    for path in SERVICES:
        commands = unit_values(path, "Service", "ExecStartPre") + unit_values(path, "Service", "ExecStart")
        assert commands == UNIT_COMMANDS[path.name], path.name
        for key, _ in unit_entries(path)["Service"]:  # nothing else runs a command
            assert not key.startswith("Exec") or key in ("ExecStartPre", "ExecStart"), (path.name, key)


@pytest.mark.parametrize("path", SERVICES, ids=lambda path: path.name)
def test_every_service_runs_hardened_as_pubsub_with_its_state_directory(path):
    service = dict(unit_entries(path)["Service"])
    assert {key: service.get(key) for key in HARDENING} == HARDENING
    assert service["WorkingDirectory"] == "/var/lib/pubsub"


def test_the_api_restarts_on_failure_and_gets_the_stop_signal_alone():
    service = dict(unit_entries(DEPLOY / "pubsub.service")["Service"])
    assert service["Restart"] == "on-failure"
    # SIGTERM to serve alone (it passes it to gunicorn, as test_serve checks), SIGKILL to the rest later.
    assert service["KillMode"] == "mixed"
    assert unit_values(DEPLOY / "pubsub.service", "Install", "WantedBy") == ["multi-user.target"]


@pytest.mark.parametrize("path", TIMERS, ids=lambda path: path.name)
def test_every_timer_is_persistent_and_starts_when_the_machine_does(path):
    timer = dict(unit_entries(path)["Timer"])
    assert timer["OnCalendar"]
    assert timer["Persistent"] == "true"
    assert "Unit" not in timer  # it starts the service of its own name
    assert unit_values(path, "Install", "WantedBy") == ["timers.target"]


def test_the_settings_file_names_real_settings_with_their_defaults(monkeypatch):
    text = (DEPLOY / "pubsub.env").read_text()
    lines = re.findall(r"^#?PUBSUB_(\w+)=(.*)$", text, re.MULTILINE)
    assert len({name for name, _ in lines}) == len(lines)  # each once
    for name, value in lines:
        assert name in settings.setting_names(), name
        if f"\n#PUBSUB_{name}=" in text and value:  # a commented line shows the default
            assert settings.parse_value(name, value, getattr(config, name)) == getattr(config, name), name
    # What it sets is accepted as a service starts.
    for name, value in env_file_settings().items():
        monkeypatch.setenv(name, value)
    assert create_app().config["DATABASE_URL"] == env_file_settings()["PUBSUB_DATABASE_URL"]


@contextmanager
def running(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A long-running command in a process group of its own, stopped on the way out if still running."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            stop_group(process)


def unit_command(path: Path, key: str, script: str) -> list[str]:
    """The unit's command line, with the test's script where the unit names the installed one."""
    (line,) = unit_values(path, "Service", key)
    program, *args = line.split()
    assert program == INSTALLED_SCRIPT
    return [script, *args]


def test_the_units_commands_migrate_serve_and_clean_a_new_database(pubsub_script, server_url, tmp_path):
    state = tmp_path / "state"  # the StateDirectory: instance path and working directory
    state.mkdir()
    port, log = free_port(), tmp_path / "serve.log"
    with new_database(server_url, migrate=False) as url:
        # The settings file, with this test's database, port and state directory.
        unit_env = dict(value.split("=", 1) for value in HARDENING["Environment"].split())
        env = script_env(
            **{name.removeprefix("PUBSUB_"): value for name, value in env_file_settings().items()}
        )
        env.update(script_env(DATABASE_URL=url, INSTANCE_PATH=str(state), API_PORT=str(port)))
        assert set(unit_env) == {"PUBSUB_INSTANCE_PATH"}

        api = DEPLOY / "pubsub.service"
        migrate = run_script(unit_command(api, "ExecStartPre", pubsub_script), state, env)
        assert migrate.returncode == 0, migrate.stderr
        assert migrated_revision(url) == ScriptDirectory(MIGRATIONS_DIR).get_current_head()

        with running(unit_command(api, "ExecStart", pubsub_script), state, env, log) as serve:
            wait_until_live(serve, port, log)
            assert request(port, "POST", "/topics", {"id": "orders"})[0] == 201
            # The timers' jobs run beside the API.
            for path in SERVICES:
                if path.name == "pubsub.service":
                    continue
                command = unit_command(path, "ExecStart", pubsub_script)
                result = run_script(command, state, env)
                assert result.returncode == 0, (path.name, result.stderr)
                assert result.stdout.startswith(CLEANUP_OUTPUT[command[1]]), (path.name, result.stdout)
            # KillMode=mixed: SIGTERM to the main process alone.
            serve.send_signal(signal.SIGTERM)
            assert wait_for_exit(serve, log) == 0, output_of(log)
        assert "Traceback" not in output_of(log)


# systemd's own checks, on what install.sh installs.


def dry_install(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--root", str(root), "--no-venv", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = tool("systemd-analyze")
    tool("systemctl")
    root = tmp_path / "root"
    install = dry_install(root)
    assert install.returncode == 0, install.stderr
    # verify --root needs what the units name inside the root: the script (a stand-in: the venv
    # is not built here) and systemd's own units (sysinit.target, timers.target, ...).
    script = root / INSTALLED_SCRIPT.lstrip("/")
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for path in SERVICES + TIMERS:
        result = subprocess.run(
            [analyze, "verify", f"--root={root}", str(root / "etc/systemd/system" / path.name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # A unit systemd could not parse in full still exits 0, with a warning on stderr.
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), path.name


def test_install_script_installs_code_settings_units_and_enables_them_under_a_root(tmp_path):
    tool("systemctl")
    root = tmp_path / "root"
    install = dry_install(root)
    assert install.returncode == 0, install.stderr
    units = root / "etc/systemd/system"
    for path in SERVICES + TIMERS:
        assert (units / path.name).read_text() == path.read_text(), path.name
    assert (
        os.readlink(units / "multi-user.target.wants/pubsub.service") == "/etc/systemd/system/pubsub.service"
    )
    for path in TIMERS:
        assert os.readlink(units / "timers.target.wants" / path.name) == f"/etc/systemd/system/{path.name}"
    settings_file = root / "etc/pubsub/pubsub.env"
    assert settings_file.read_text() == (DEPLOY / "pubsub.env").read_text()
    assert stat.S_IMODE(settings_file.stat().st_mode) == 0o640  # it may hold secrets
    app = root / "opt/pubsub/app"
    for name in ("wsgi.py", "pyproject.toml", "requirements.txt", "migrations/env.py", "pubsub/__main__.py"):
        assert (app / name).is_file(), name
    assert not (app / ".git").exists() and not (app / ".venv").exists()

    # Again, as for an upgrade: the operator's settings stay, the code is a fresh copy.
    settings_file.write_text("PUBSUB_API_PORT=9000\n")
    (app / "pubsub/stale.py").write_text("")
    again = dry_install(root)
    assert again.returncode == 0, again.stderr
    assert settings_file.read_text() == "PUBSUB_API_PORT=9000\n"
    assert not (app / "pubsub/stale.py").exists()
    assert (app / "wsgi.py").is_file()
