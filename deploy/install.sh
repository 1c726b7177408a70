#!/usr/bin/env bash
# Install (or upgrade) pubsub as systemd services on a Debian VM, from this checkout (as root):
#   sudo deploy/install.sh             # user, code, venv, settings, units; enable and (re)start
#   sudo deploy/install.sh --no-start  # the same, but start nothing (edit /etc/pubsub/pubsub.env first)
#   deploy/install.sh --root DIR --no-venv   # a dry install under DIR (tests): files and enable links only
# What goes where: the code in /opt/pubsub/app (root-owned, read-only to the service), its venv in
# /opt/pubsub/venv (/opt/pubsub/venv/bin/pubsub runs every command), the settings in
# /etc/pubsub/pubsub.env (installed once, never overwritten), the units in /etc/systemd/system,
# the state in /var/lib/pubsub (systemd's StateDirectory). README.md: "Deploy on a VM".
set -euo pipefail

usage() { echo "usage: $0 [--root DIR] [--no-venv] [--no-start]" >&2; exit 2; }
root="" venv=1 start=1
while [ $# -gt 0 ]; do
    case $1 in
    --root) [ $# -ge 2 ] || usage; root=$(realpath -m "$2"); shift 2 ;;
    --no-venv) venv=0; shift ;;
    --no-start) start=0; shift ;;
    *) usage ;;
    esac
done

checkout=$(cd "$(dirname "$0")/.." && pwd)
app=$root/opt/pubsub/app
units=$root/etc/systemd/system
timers=(pubsub-cleanup-stuck.timer pubsub-cleanup-acked.timer pubsub-cleanup-idempotency-keys.timer)
log() { echo "=== $*"; }

if [ -z "$root" ]; then
    [ "$EUID" -eq 0 ] || { echo "$0: run as root (or with --root DIR)" >&2; exit 1; }
    if ! id -u pubsub >/dev/null 2>&1; then
        log "creating the system user pubsub"
        useradd --system --user-group --home-dir /var/lib/pubsub --no-create-home \
            --shell /usr/sbin/nologin pubsub
    fi
fi

log "copying the code to $app"
# A fresh copy each time, swapped in whole: no file of an older release lingers.
rm -rf "$app.new"
mkdir -p "$app.new"
tar -C "$checkout" --exclude=./.git --exclude=./.venv --exclude=./instance --exclude='__pycache__' \
    --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude='*.egg-info' -cf - . | tar -C "$app.new" -xf -
rm -rf "$app.old"
[ ! -e "$app" ] || mv "$app" "$app.old"
mv "$app.new" "$app"
rm -rf "$app.old"

if [ "$venv" -eq 1 ]; then
    log "installing the requirements and pubsub in $root/opt/pubsub/venv"
    [ -x "$root/opt/pubsub/venv/bin/python" ] || python3 -m venv "$root/opt/pubsub/venv"
    "$root/opt/pubsub/venv/bin/python" -m pip install --quiet --upgrade pip
    "$root/opt/pubsub/venv/bin/python" -m pip install --quiet -r "$app/requirements.txt"
    # Editable: the pubsub script runs the code, wsgi.py and migrations/ in /opt/pubsub/app.
    "$root/opt/pubsub/venv/bin/python" -m pip install --quiet --no-deps -e "$app"
    # Bytecode now: under ProtectSystem=strict the service cannot write it.
    "$root/opt/pubsub/venv/bin/python" -m compileall -q "$app/pubsub" "$app/migrations" "$app/wsgi.py"
fi

if [ -e "$root/etc/pubsub/pubsub.env" ]; then
    log "keeping $root/etc/pubsub/pubsub.env (the new template: $app/deploy/pubsub.env)"
else
    log "installing $root/etc/pubsub/pubsub.env"
    install -d -m 0755 "$root/etc/pubsub"
    install -m 0640 "$checkout/deploy/pubsub.env" "$root/etc/pubsub/pubsub.env"
    [ -n "$root" ] || chgrp pubsub /etc/pubsub/pubsub.env # secrets go there: the group reads, others not
fi

log "installing the units in $units"
install -d -m 0755 "$units"
install -m 0644 "$checkout"/deploy/pubsub*.service "$checkout"/deploy/pubsub*.timer "$units/"

if [ -n "$root" ]; then
    # Offline: systemctl only makes the [Install] links under DIR.
    systemctl --root="$root" enable pubsub.service "${timers[@]}"
    exit 0
fi
systemctl daemon-reload
systemctl enable pubsub.service "${timers[@]}"
if [ "$start" -eq 1 ]; then
    log "(re)starting pubsub (migrations first) and its timers"
    systemctl restart pubsub.service
    systemctl start "${timers[@]}"
    systemctl --no-pager --lines=5 status pubsub.service
else
    log "enabled, not started: edit /etc/pubsub/pubsub.env, then: systemctl start pubsub.service ${timers[*]}"
fi
