#!/usr/bin/env bash
# One fedkws run on Flower's Deployment Engine, all on 127.0.0.1: a SuperLink, one SuperNode
# per client (node-config partition-id=K num-partitions=N), the run submitted with `flwr run`.
# Waits for the run's results.json, then ends every process it started (also on error or
# Ctrl-C): by PID, then whatever those started that is still alive, found by a marker in
# its environment.
#
#   experiments/deployment_engine.sh [--experiment NAME] [--run-dir DIR] [--clients N] [OVERRIDE ...]
#
#   experiments/deployment_engine.sh --experiment seed_repro model.width=8 train.rounds=2
#
# OVERRIDEs are Hydra overrides, as for fedkws-train. --clients N: the SuperNodes to start;
# defaults to those that federation.supernodes gives for partition.num_clients (auto: one
# per client up to 100 clients; K: K nodes, each serving many clients); required for
# partition=speaker unless federation.supernodes is a number. The run folder defaults to
# outputs/<name>/flwr/<date>/<time>; logs and Flower's state (FLWR_HOME) go to a folder
# under /tmp, printed at the start and kept.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${FEDKWS_BIN:-$ROOT/.venv/bin}"
PY="$BIN/python"
export PATH="$BIN:$PATH"  # flower-superexec, which the SuperLink and the SuperNodes start
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"

experiment="" run_dir="" clients=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --experiment | --run-dir | --clients)
            if [[ $# -lt 2 ]]; then echo "error: $1 needs a value (see --help)" >&2; exit 2; fi ;;&
        --experiment) experiment="$2"; shift 2 ;;
        --run-dir) run_dir="$2"; shift 2 ;;
        --clients)
            if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
                echo "error: --clients $2: must be a number of SuperNodes >= 1" >&2; exit 2
            fi
            clients="$2"; shift 2 ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done
overrides="$("$PY" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@")"

# The config's name and number of clients, composed exactly as the ServerApp will.
facts="$("$PY" - "$experiment" "$overrides" <<'EOF'
import sys
from fedkws.errors import user_errors
from fedkws.fl.flwr_apps import compose_config
from fedkws.fl.server_app import node_count
from fedkws.spec import from_config
with user_errors():
    spec = from_config(compose_config({"experiment": sys.argv[1], "overrides": sys.argv[2]}))
clients = None if spec.partition.scheme == "speaker" else spec.partition.num_clients
shared = spec.federation.supernodes  # null, auto or a number (fewer nodes than clients)
if clients is not None:
    nodes = node_count(clients, shared)
else:  # a speaker partition's clients come from the data: known here only if K is given
    nodes = shared if isinstance(shared, int) else None
print("" if nodes is None else nodes)
print(spec.name)
EOF
)"
clients="${clients:-$(head -n 1 <<< "$facts")}"
name="$(tail -n +2 <<< "$facts")"
if [[ -z "$clients" ]]; then
    echo "error: partition=speaker: the number of clients comes from the data; pass --clients N" \
        "(the SuperNodes to start) or set federation.supernodes=K" >&2
    exit 2
fi
run_dir="${run_dir:-outputs/$name/flwr/$(date +%Y-%m-%d)/$(date +%H-%M-%S)}"
[[ "$run_dir" = /* ]] || run_dir="$ROOT/$run_dir"

work="$(mktemp -d /tmp/fedkws-deployment.XXXXXX)"
export FLWR_HOME="$work/flwr-home"
mkdir -p "$FLWR_HOME"
marker="$(basename "$work")-$$"
ports=($("$PY" - "$((clients + 1))" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
))
link="127.0.0.1:${ports[0]}"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "deployment"

[superlink.deployment]
address = "$link"
insecure = true
EOF

pids=()
marked() {  # live processes started from here, found by the marker in their environment
    grep -lzx "FEDKWS_DEPLOYMENT=$marker" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
}
cleanup() {
    local status=$? pid left
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 60); do
        left="$(marked)"
        [[ -z "$left" ]] && break
        sleep 0.5
    done
    if [[ -n "$left" ]]; then
        echo "killing what did not end within 30 s: $(echo $left)" >&2
        kill -KILL $left 2>/dev/null || true
    fi
    echo "stopped every process this script started (SuperLink, SuperNodes, flwr); logs: $work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start "$@" in the background with the marker; log to $work/<first arg>.log
    local log="$work/$1.log"
    shift
    env FEDKWS_DEPLOYMENT="$marker" "$@" > "$log" 2>&1 &
    pids+=("$!")
}

echo "logs and Flower state: $work"
start superlink flower-superlink --insecure --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "${ports[0]}"
for _ in $(seq 120); do
    curl -sf "http://$link/health" > /dev/null && break
    kill -0 "${pids[0]}" 2> /dev/null || { tail -20 "$work/superlink.log" >&2; exit 1; }
    sleep 0.5
done
echo "SuperLink on $link (pid ${pids[0]})"
for ((k = 0; k < clients; k++)); do
    start "supernode$k" flower-supernode --insecure --superlink "$link" \
        --node-config "partition-id=$k num-partitions=$clients" --port "${ports[k + 1]}"
    echo "SuperNode partition-id=$k (pid ${pids[-1]})"
done

"$PY" - "$work/run-config.toml" "$experiment" "$overrides" "$run_dir" <<'EOF'
import sys
from pathlib import Path
import tomli_w
keys = ("experiment", "overrides", "run-dir")
Path(sys.argv[1]).write_text(tomli_w.dumps(dict(zip(keys, sys.argv[2:]))))
EOF
cd "$ROOT"
# In the background, so that a signal reaches the trap at once, not when the run has ended.
env FEDKWS_DEPLOYMENT="$marker" flwr run . deployment --stream -c "$work/run-config.toml" &
pids+=("$!")
wait "${pids[-1]}"

for _ in $(seq 60); do  # the stream can end a moment before the file is in place
    [[ -f "$run_dir/results.json" ]] && break
    sleep 0.5
done
if [[ ! -f "$run_dir/results.json" ]]; then
    echo "error: no results.json in $run_dir (logs: $work)" >&2
    exit 1
fi
"$PY" - "$run_dir/results.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))["summary"]
print(f"results: {sys.argv[1]} (complete: {summary.get('complete')})")
sys.exit(0 if summary.get("complete") else 1)
EOF
