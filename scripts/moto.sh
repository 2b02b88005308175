#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start/stop a local AWS KMS and S3 (moto_server serves both on one port) on a free loopback port.
#
# Usage:
#   scripts/moto.sh start    # start (no-op if already running); prints `export ...` lines
#   scripts/moto.sh stop     # stop it
#   scripts/moto.sh status   # exit 0 if running
#   scripts/moto.sh env      # print the `export ...` lines of the running server
#
#   eval "$(scripts/moto.sh start)"   # to get the variables into the current shell
#
# State (override the dir with PHI_TEST_SERVICES_DIR): target/test-services/
#   moto.pid, moto.port, moto.log, moto.env
# Exported variables:
#   AWS_ENDPOINT_URL=http://127.0.0.1:PORT  AWS_REGION=us-east-1
#   AWS_ACCESS_KEY_ID=testing  AWS_SECRET_ACCESS_KEY=testing
#   AWS_EC2_METADATA_DISABLED=true  PHI_MOTO_URL=http://127.0.0.1:PORT
set -euo pipefail

SVC_NAME=moto
# shellcheck source=lib-services.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib-services.sh"

NAME=moto
START_TIMEOUT="${PHI_MOTO_START_TIMEOUT:-30}"

print_env() {
    local port="$1"
    cat <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export PHI_MOTO_URL=http://127.0.0.1:$port
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_EC2_METADATA_DISABLED=true
EOF
}

start() {
    svc_state_init
    if svc_running "$NAME"; then
        svc_log "already running (pid $(cat "$PHI_STATE_DIR/$NAME.pid"), port $(cat "$PHI_STATE_DIR/$NAME.port"))"
        cat -- "$PHI_STATE_DIR/$NAME.env"
        return 0
    fi
    "$PHI_PYTHON" -c 'import moto.server' 2>/dev/null || {
        svc_log "moto[server] is not installed: run scripts/install-deps.sh first"; return 1; }

    local attempt port pid log="$PHI_STATE_DIR/$NAME.log"
    for attempt in 1 2 3; do
        port="$(svc_free_port)"
        svc_log "starting moto_server on 127.0.0.1:$port (attempt $attempt)"
        # Own session, no tty, stdio detached: survives this script and never holds a
        # caller's $(...) pipe open.
        setsid "$PHI_PYTHON" -m moto.server -H 127.0.0.1 -p "$port" \
            </dev/null >"$log" 2>&1 &
        pid=$!
        if svc_wait_http "http://127.0.0.1:$port/moto-api/" "$START_TIMEOUT" "$pid"; then
            echo "$pid" >"$PHI_STATE_DIR/$NAME.pid"
            echo "$port" >"$PHI_STATE_DIR/$NAME.port"
            print_env "$port" >"$PHI_STATE_DIR/$NAME.env"
            svc_log "up: pid $pid, http://127.0.0.1:$port (log: $log)"
            cat -- "$PHI_STATE_DIR/$NAME.env"
            return 0
        fi
        svc_log "moto_server did not come up; log:"
        tail -n 20 -- "$log" >&2 || true
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) svc_stop "$NAME" ;;
    status)
        if svc_running "$NAME"; then
            svc_log "running (pid $(cat "$PHI_STATE_DIR/$NAME.pid"), port $(cat "$PHI_STATE_DIR/$NAME.port"))"
        else
            svc_log "not running"; exit 1
        fi ;;
    env)
        svc_running "$NAME" || { svc_log "not running"; exit 1; }
        cat -- "$PHI_STATE_DIR/$NAME.env" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
