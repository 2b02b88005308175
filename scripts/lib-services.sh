# shellcheck shell=bash
# Helpers shared by scripts/moto.sh, scripts/kms-proxy.sh and scripts/test-services.sh.
# Sourced, not run. Callers set `set -euo pipefail` themselves.

PHI_SCRIPTS_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
PHI_REPO_DIR="$(cd -- "$PHI_SCRIPTS_DIR/.." && pwd)"
# Where pid/port/log/env files live. Override with PHI_TEST_SERVICES_DIR.
PHI_STATE_DIR="${PHI_TEST_SERVICES_DIR:-$PHI_REPO_DIR/target/test-services}"
PHI_PYTHON="${PYTHON:-python3}"

svc_log() { printf '[%s] %s\n' "${SVC_NAME:-services}" "$*" >&2; }

svc_state_init() { mkdir -p -- "$PHI_STATE_DIR"; }

# Print a currently free TCP port on 127.0.0.1.
svc_free_port() {
    "$PHI_PYTHON" -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# svc_pid_alive PID: true if the process exists and is not a zombie.
svc_pid_alive() {
    local pid="$1" state
    [[ -n "$pid" ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    state="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z* ]]
}

# svc_wait_http URL TIMEOUT_S PID: wait until URL answers any HTTP status.
svc_wait_http() {
    local url="$1" timeout="$2" pid="$3" deadline
    deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        if ! svc_pid_alive "$pid"; then
            return 1
        fi
        if "$PHI_PYTHON" - "$url" <<'EOF' 2>/dev/null; then
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=1).read()
except urllib.error.HTTPError:
    pass  # any HTTP answer means the server is up
EOF
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# svc_stop NAME: stop the service whose pid is in $PHI_STATE_DIR/NAME.pid.
svc_stop() {
    local name="$1" pidfile pid i
    pidfile="$PHI_STATE_DIR/$name.pid"
    if [[ ! -f "$pidfile" ]]; then
        svc_log "not running (no $pidfile)"
        rm -f -- "$PHI_STATE_DIR/$name.port" "$PHI_STATE_DIR/$name.env"
        return 0
    fi
    pid="$(cat -- "$pidfile")"
    if svc_pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            svc_pid_alive "$pid" || break
            sleep 0.1
        done
        if svc_pid_alive "$pid"; then
            svc_log "pid $pid did not exit on TERM; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        svc_log "stopped (pid $pid)"
    else
        svc_log "pid $pid was not running"
    fi
    rm -f -- "$pidfile" "$PHI_STATE_DIR/$name.port" "$PHI_STATE_DIR/$name.env"
}

# svc_running NAME: true if NAME's pid file points at a live process.
svc_running() {
    local pidfile="$PHI_STATE_DIR/$1.pid"
    [[ -f "$pidfile" ]] && svc_pid_alive "$(cat -- "$pidfile")"
}
