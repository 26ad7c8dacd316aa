#!/usr/bin/env bash
# Local stack for development and integration tests, all on 127.0.0.1:
#   - S3 server (moto) with a bucket (default "pconv-local")
#   - `mlflow server` (SQLite backend under DIR, artifacts proxied to s3://BUCKET/mlflow on that S3 server)
#   - a Ray head with its dashboard / job API (token authentication on by default)
#
# Usage: infra/local/stack.sh up|down|status [--dir DIR]   (DIR defaults to <repo>/.local-stack, git-ignored)
#
#   up      start the three services (each in its own process group), wait until they answer, write DIR/env.sh
#           with the export lines that point tools at them, and print those lines.
#   down    stop ONLY what `up` started: the PIDs recorded in DIR (TERM, then KILL of that process group).
#           No `ray stop` (it would stop every Ray on this machine): the head runs as `ray start --block`, whose
#           PID we own; terminating it shuts down the Ray processes it started.
#   status  one line per service (up/down, PID, address); exit 0 only when all three are up.
#
# Environment knobs (all optional):
#   S3_PORT, MLFLOW_PORT, RAY_PORT (GCS), RAY_DASHBOARD_PORT   fixed ports (default: free ports picked at `up`)
#   STACK_BUCKET        bucket name (default pconv-local)
#   STACK_RAY_CPUS      logical CPUs of the Ray head (default: max(4, nproc); Ray Data read tasks starve with 2)
#   STACK_RAY_AUTH      token | disabled (default token: Ray 2.60 turns token auth on for local clusters anyway)
#   STACK_TIMEOUT       seconds to wait for each service (default 180)
#   PYTHON              interpreter (default: the repo's .venv/bin/python when present, else python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_BIN="$REPO_ROOT/.venv/bin"

usage() {
    echo "usage: $(basename "$0") up|down|status [--dir DIR]" >&2
    exit 2
}

die() {
    echo "stack.sh: error: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- arguments
[[ $# -ge 1 ]] || usage
CMD="$1"
shift
DIR="$REPO_ROOT/.local-stack"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) [[ $# -ge 2 ]] || usage; DIR="$2"; shift 2 ;;
        --dir=*) DIR="${1#--dir=}"; shift ;;
        -h|--help) usage ;;
        *) echo "stack.sh: unknown argument: $1" >&2; usage ;;
    esac
done
case "$CMD" in up|down|status) ;; *) usage ;; esac

[[ "$CMD" == up ]] && mkdir -p "$DIR"
if [[ -d "$DIR" ]]; then DIR="$(cd "$DIR" && pwd)"; fi   # status/down never create it
LOGS="$DIR/logs"

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$VENV_BIN/python" ]]; then PY="$VENV_BIN/python"
else PY="$(command -v python3 || true)"
fi
[[ -n "$PY" ]] || die "no python found (set PYTHON or run 'make setup')"

# Use the venv's entry points when present, else whatever is on PATH.
bin() {
    if [[ -x "$VENV_BIN/$1" ]]; then echo "$VENV_BIN/$1"
    elif command -v "$1" >/dev/null 2>&1; then command -v "$1"
    else die "'$1' not found (run 'make setup' or install it)"
    fi
}

SERVICES=(s3 mlflow ray)

# ---------------------------------------------------------------- process bookkeeping
# DIR/<name>.pid holds "PID START_TICKS": the start time (field 22 of /proc/PID/stat, or `ps -o lstart`)
# guards against signalling an unrelated process that reused a recorded PID.
proc_start() {
    local pid="$1"
    if [[ -r "/proc/$pid/stat" ]]; then
        # The command name (field 2) may contain spaces; cut after its closing parenthesis.
        sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $20}'
    else
        ps -o lstart= -p "$pid" 2>/dev/null | tr -s ' ' '_'
    fi
}

recorded_pid() {  # prints the PID of service $1 if it is alive and still the process we started
    local file="$DIR/$1.pid" pid start
    [[ -f "$file" ]] || return 1
    read -r pid start <"$file" || return 1
    [[ -n "$pid" ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(proc_start "$pid")" == "$start" ]] || return 1
    echo "$pid"
}

# Start "$@" detached in its own session/process group (PGID = PID), stdin from /dev/null, output to a log,
# and record its PID. Python does the spawning so that the PID is exact and it works where `setsid` is missing.
spawn() {
    local name="$1"; shift
    local log="$LOGS/$name.log" pid
    pid="$("$PY" - "$log" "$@" <<'EOF'
import subprocess, sys
log = open(sys.argv[1], "ab")
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True, close_fds=True)
print(proc.pid)
EOF
)" || die "could not start $name: $*"
    echo "$pid $(proc_start "$pid")" >"$DIR/$name.pid"
}

# TERM the recorded process, wait, then TERM/KILL its whole process group (it leads one: spawn() made it so).
stop_service() {
    local name="$1" pid i
    if ! pid="$(recorded_pid "$name")"; then
        if [[ -f "$DIR/$name.pid" ]]; then
            echo "$name: not running (stale $name.pid removed)"
            rm -f "$DIR/$name.pid"
        fi
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 60); do          # up to 30 s for a graceful exit (Ray tears its processes down)
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    # Children left in the group (e.g. uvicorn under `mlflow server`, Ray workers): TERM, then KILL.
    kill -TERM -- "-$pid" 2>/dev/null || true
    for i in $(seq 1 10); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$DIR/$name.pid"
    echo "$name: stopped (pid $pid)"
}

# ---------------------------------------------------------------- small python helpers
free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port_free() {  # exit 0 when nothing listens on 127.0.0.1:$1
    "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

# http_ok URL [TOKEN_FILE]: exit 0 when URL answers 2xx (with a bearer token read from TOKEN_FILE if given).
http_ok() {
    "$PY" - "$@" <<'EOF'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2 and sys.argv[2]:
    req.add_header("Authorization", "Bearer " + open(sys.argv[2]).read().strip())
try:
    with urllib.request.urlopen(req, timeout=3) as resp:
        sys.exit(0 if 200 <= resp.status < 300 else 1)
except Exception:
    sys.exit(1)
EOF
}

# wait_for NAME URL [TOKEN_FILE]: poll until the URL answers, the process dies, or STACK_TIMEOUT passes.
wait_for() {
    local name="$1" url="$2" token="${3:-}" deadline=$(( SECONDS + ${STACK_TIMEOUT:-180} ))
    while true; do
        if http_ok "$url" "$token"; then return 0; fi
        if ! recorded_pid "$name" >/dev/null; then
            echo "stack.sh: $name exited during start-up; last lines of $LOGS/$name.log:" >&2
            tail -n 30 "$LOGS/$name.log" >&2 || true
            return 1
        fi
        if (( SECONDS > deadline )); then
            echo "stack.sh: $name did not answer on $url within ${STACK_TIMEOUT:-180} s; see $LOGS/$name.log" >&2
            tail -n 30 "$LOGS/$name.log" >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

# The dashboard answers before the head has reported its resources; until then `ray status` prints
# "No cluster status" and jobs may queue. Return only once the cluster reports its CPUs.
wait_for_ray_resources() {
    local deadline=$(( SECONDS + ${STACK_TIMEOUT:-180} )) out
    while true; do
        out="$(RAY_AUTH_MODE="$STACK_RAY_AUTH" "$(bin ray)" status --address "127.0.0.1:$RAY_PORT" 2>&1)" || true
        [[ "$out" == *CPU* ]] && return 0
        if ! recorded_pid ray >/dev/null; then
            echo "stack.sh: ray exited during start-up; last lines of $LOGS/ray.log:" >&2
            tail -n 30 "$LOGS/ray.log" >&2 || true
            return 1
        fi
        if (( SECONDS > deadline )); then
            echo "stack.sh: ray did not report its resources within ${STACK_TIMEOUT:-180} s; last answer:" >&2
            echo "$out" | tail -n 10 >&2
            return 1
        fi
        sleep 1
    done
}

load_conf() {
    [[ -f "$DIR/stack.conf" ]] || return 1
    # shellcheck disable=SC1091
    source "$DIR/stack.conf"
}

# ---------------------------------------------------------------- commands
cmd_status() {
    local all_up=0 pid
    if ! load_conf; then
        for name in "${SERVICES[@]}"; do echo "$name: down"; done
        return 1
    fi
    local -A urls=(
        [s3]="http://127.0.0.1:$S3_PORT/moto-api/"
        [mlflow]="http://127.0.0.1:$MLFLOW_PORT/health"
        [ray]="http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version"
    )
    local -A addrs=(
        [s3]="http://127.0.0.1:$S3_PORT (bucket $STACK_BUCKET)"
        [mlflow]="http://127.0.0.1:$MLFLOW_PORT"
        [ray]="gcs 127.0.0.1:$RAY_PORT, dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT"
    )
    for name in "${SERVICES[@]}"; do
        if pid="$(recorded_pid "$name")"; then
            local token=""
            [[ "$name" == ray && "$STACK_RAY_AUTH" == token ]] && token="$DIR/auth_token"
            if http_ok "${urls[$name]}" "$token"; then
                echo "$name: up (pid $pid, ${addrs[$name]})"
            else
                echo "$name: starting or unhealthy (pid $pid, ${addrs[$name]} does not answer)"
                all_up=1
            fi
        else
            echo "$name: down"
            all_up=1
        fi
    done
    return $all_up
}

cmd_down() {
    local any=0
    for name in ray mlflow s3; do
        [[ -f "$DIR/$name.pid" ]] && any=1
        stop_service "$name"
    done
    if [[ -f "$DIR/ray_temp_dir" ]]; then
        local tmp
        tmp="$(cat "$DIR/ray_temp_dir")"
        # Only the directory `up` created for this stack (mktemp name under /tmp); never anything else.
        [[ "$tmp" == /tmp/pconv-ray.* && -d "$tmp" ]] && rm -rf "$tmp"
        rm -f "$DIR/ray_temp_dir"
    fi
    (( any )) || echo "nothing to stop in $DIR"
    return 0
}

write_env() {
    local env_file="$DIR/env.sh"
    {
        echo "# Generated by infra/local/stack.sh up --dir $DIR  (source it: . $env_file)"
        echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT"
        echo "export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT"
        echo "export AWS_ACCESS_KEY_ID=testing"
        echo "export AWS_SECRET_ACCESS_KEY=testing"
        echo "export AWS_DEFAULT_REGION=us-east-1"
        echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
        echo "export RAY_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT"
        echo "export PCONV_RAY_GCS_ADDRESS=127.0.0.1:$RAY_PORT"
        echo "export PCONV_BUCKET=s3://$STACK_BUCKET"
        echo "export RAY_AUTH_MODE=$STACK_RAY_AUTH"
        if [[ "$STACK_RAY_AUTH" == token ]]; then
            echo "export RAY_AUTH_TOKEN_PATH=$DIR/auth_token"
            echo "unset RAY_AUTH_TOKEN"
        fi
    } >"$env_file"
    echo "# local stack is up; to use it:  . $env_file"
    cat "$env_file"
}

cmd_up() {
    local running=()
    for name in "${SERVICES[@]}"; do
        recorded_pid "$name" >/dev/null && running+=("$name")
    done
    if [[ ${#running[@]} -eq ${#SERVICES[@]} ]]; then
        echo "local stack already up in $DIR"
        load_conf || die "$DIR/stack.conf is missing; run '$0 down --dir $DIR' and start again"
        write_env
        return 0
    elif [[ ${#running[@]} -gt 0 ]]; then
        die "partly running in $DIR (${running[*]}); run '$0 down --dir $DIR' first"
    fi

    S3_PORT="${S3_PORT:-$(free_port)}"
    MLFLOW_PORT="${MLFLOW_PORT:-$(free_port)}"
    RAY_PORT="${RAY_PORT:-$(free_port)}"
    RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-$(free_port)}"
    STACK_BUCKET="${STACK_BUCKET:-pconv-local}"
    STACK_RAY_AUTH="${STACK_RAY_AUTH:-token}"
    [[ "$STACK_RAY_AUTH" == token || "$STACK_RAY_AUTH" == disabled ]] \
        || die "STACK_RAY_AUTH must be 'token' or 'disabled', got '$STACK_RAY_AUTH'"
    local ncpu
    ncpu="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
    STACK_RAY_CPUS="${STACK_RAY_CPUS:-$(( ncpu > 4 ? ncpu : 4 ))}"

    # Fail before starting anything if a requested port is taken (a second stack, a stray server, ...).
    local p
    for p in "S3_PORT=$S3_PORT" "MLFLOW_PORT=$MLFLOW_PORT" "RAY_PORT=$RAY_PORT" "RAY_DASHBOARD_PORT=$RAY_DASHBOARD_PORT"; do
        port_free "${p#*=}" || die "port ${p#*=} (${p%%=*}) is already in use on 127.0.0.1; choose another"
    done
    # Ray's side ports default to fixed numbers (52365, 10001, ...) that collide with other local Ray
    # instances; give each its own free port.
    local ray_client_port agent_http_port agent_grpc_port metrics_port runtime_env_port
    ray_client_port="$(free_port)"; agent_http_port="$(free_port)"; agent_grpc_port="$(free_port)"
    metrics_port="$(free_port)"; runtime_env_port="$(free_port)"

    mkdir -p "$LOGS"
    cat >"$DIR/stack.conf" <<EOF
S3_PORT=$S3_PORT
MLFLOW_PORT=$MLFLOW_PORT
RAY_PORT=$RAY_PORT
RAY_DASHBOARD_PORT=$RAY_DASHBOARD_PORT
STACK_BUCKET=$STACK_BUCKET
STACK_RAY_AUTH=$STACK_RAY_AUTH
EOF

    local s3_url="http://127.0.0.1:$S3_PORT"
    # The environment every service (and, through the Ray head, every Ray worker and job) starts with:
    # S3 via the standard AWS variables, MLflow via MLFLOW_TRACKING_URI.
    export AWS_ENDPOINT_URL="$s3_url" MLFLOW_S3_ENDPOINT_URL="$s3_url"
    export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
    export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
    unset RAY_ADDRESS RAY_AUTH_TOKEN AWS_PROFILE AWS_SESSION_TOKEN

    # Any failure from here on (a service that dies or never answers) stops what was already started.
    trap 'rc=$?; if (( rc != 0 )); then echo "stack.sh: start-up failed; stopping what was started" >&2; cmd_down >&2; fi' EXIT

    # 1. S3 server (moto): its console script when installed, else the module.
    if [[ -x "$VENV_BIN/moto_server" ]]; then
        spawn s3 "$VENV_BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    else
        spawn s3 "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT"
    fi

    # 2. MLflow tracking server. Job execution (huey consumer processes) is not needed here and costs CPU.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false spawn mlflow "$(bin mlflow)" server \
        --backend-store-uri "sqlite:///$DIR/mlflow.db" \
        --artifacts-destination "s3://$STACK_BUCKET/mlflow" --serve-artifacts \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1

    # 3. Ray head. `--block` keeps `ray start` in the foreground: its PID is ours to stop, and on SIGTERM it
    # shuts down the processes it started. A short temp dir keeps Ray's socket paths under the OS limit.
    local ray_tmp
    ray_tmp="$(mktemp -d /tmp/pconv-ray.XXXXXX)"
    echo "$ray_tmp" >"$DIR/ray_temp_dir"
    if [[ "$STACK_RAY_AUTH" == token ]]; then
        ( umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$DIR/auth_token" )
        export RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
    fi
    RAY_AUTH_MODE="$STACK_RAY_AUTH" spawn ray "$(bin ray)" start --head --block \
        --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
        --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
        --ray-client-server-port "$ray_client_port" \
        --dashboard-agent-listen-port "$agent_http_port" --dashboard-agent-grpc-port "$agent_grpc_port" \
        --metrics-export-port "$metrics_port" --runtime-env-agent-port "$runtime_env_port" \
        --num-cpus "$STACK_RAY_CPUS" --temp-dir "$ray_tmp" --disable-usage-stats

    # Wait for each (they start in parallel), then create the bucket.
    wait_for s3 "$s3_url/moto-api/"
    "$PY" - "$s3_url" "$STACK_BUCKET" <<'EOF'
import sys
import boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
if sys.argv[2] not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
    s3.create_bucket(Bucket=sys.argv[2])
EOF
    wait_for mlflow "http://127.0.0.1:$MLFLOW_PORT/health"
    local token=""
    [[ "$STACK_RAY_AUTH" == token ]] && token="$DIR/auth_token"
    wait_for ray "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" "$token"
    wait_for_ray_resources
    trap - EXIT
    write_env
}

case "$CMD" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
esac
