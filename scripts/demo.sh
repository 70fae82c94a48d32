#!/usr/bin/env bash
# Command 1 of the README: set up, start a DoPQ server (virtual GPUs when the
# machine has no NVIDIA GPU), submit the example jobs of two users through both
# doors (upload and drop folder) and show them run to completion.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/engine.sh
bash scripts/venv.sh
bash scripts/base-image.sh

STATE=${DOPQ_DEMO_STATE:-$PWD/demo-state}
PORT=${DOPQ_DEMO_NS_PORT:-9090}
DOPQ=$PWD/.venv/bin/dopq
rm -rf "$STATE"
mkdir -p "$STATE"
backend=virtual
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    backend=nvml
fi
cat >"$STATE/config.toml" <<TOML
state_dir = "$STATE"
[server]
name = "demo"
[nameserver]
port = $PORT
embedded = "auto"
[gpus]
backend = "$backend"
virtual_count = 2
[users]
allowed = ["alice", "bob", "admin"]
uid_map = { alice = $(id -u), bob = $(id -u) }
[limits]
default_memory = "512m"
TOML
export DOPQ_CONFIG="$STATE/config.toml" DOPQ_NS_PORT=$PORT DOPQ_SERVER=demo

echo "== users (stored as salted scrypt hashes in $STATE/dopq.sqlite3)"
echo "admin-pass-1" | $DOPQ user add admin --admin --password-stdin
echo "alice-pass-1" | $DOPQ user add alice --password-stdin
echo "bob-pass-12" | $DOPQ user add bob --password-stdin

echo "== starting the server (log: $STATE/server.log)"
$DOPQ server >"$STATE/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill -TERM $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    grep -q "ready at" "$STATE/server.log" && break
    kill -0 $SERVER_PID 2>/dev/null || { cat "$STATE/server.log"; exit 1; }
    sleep 0.2
done

# The API speaks TLS with the server's own certificate; clients pin its
# fingerprint (on a terminal, `dopq login` shows it and asks instead).
DOPQ_FINGERPRINT=$($DOPQ server fingerprint)
export DOPQ_FINGERPRINT
echo "== server certificate $DOPQ_FINGERPRINT"
as() { local who=$1; shift; XDG_CONFIG_HOME="$STATE/home-$who" "$DOPQ" "$@"; }
echo "alice-pass-1" | as alice login --user alice --password-stdin
echo "bob-pass-12" | as bob login --user bob --password-stdin
echo "admin-pass-1" | as admin login --user admin --password-stdin

echo "== submitting: alice uploads two jobs, bob uploads one and drops one in the inbox"
as alice submit examples/hello-alice
as alice submit examples/hello-alice --name hello-again --time-limit 5m
as bob submit examples/gpu-bob
mkdir -p "$STATE/inbox/bob"
(cd examples/cpu-bob && "$PWD/../../.venv/bin/python" -c \
    'import sys; from dopq.core.archive import zip_folder; from pathlib import Path; zip_folder(Path("."), Path(sys.argv[1]))' \
    "$STATE/inbox/bob/prep.zip.part")
mv "$STATE/inbox/bob/prep.zip.part" "$STATE/inbox/bob/prep.zip"

sleep 1
echo "== queue"; as admin queue
echo "== running"; as admin running
echo "== status"; as admin status
for id in 1 2 3 4; do
    for _ in $(seq 1 300); do
        as admin show "$id" --json >/dev/null 2>&1 && break
        sleep 0.2
    done
    as admin wait "$id" --timeout 300 || true
done
echo "== history"; as admin history
for id in 1 2 3 4; do
    echo "== logs of job $id"; as admin logs "$id"
done
echo "== users (fair share)"; as admin users
echo "== report (GPU-hours, waits, efficiency per user)"; as admin report
echo "== outputs"; find "$STATE/outputs" -type f | sort
echo "== demo done: the server stops now"
