#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start/stop the fault-injecting KMS proxy (scripts/kms_fault_proxy.py) in front of moto.
#
# Usage:
#   scripts/kms-proxy.sh start [UPSTREAM_URL]  # default upstream: the running moto (moto.sh)
#   scripts/kms-proxy.sh stop
#   scripts/kms-proxy.sh status
#   scripts/kms-proxy.sh env                   # print the `export ...` line(s)
#
#   eval "$(scripts/kms-proxy.sh start)"
#
# State: target/test-services/kms-proxy.{pid,port,log,env} (dir: PHI_TEST_SERVICES_DIR).
# Exported: PHI_KMS_PROXY_URL=http://127.0.0.1:PORT
# Env: PHI_KMS_PROXY_ENFORCE_KEY_STATE=1 starts it with --enforce-key-state
#      (can also be toggled at run time: POST /__fault__/config).
set -euo pipefail

SVC_NAME=kms-proxy
# shellcheck source=lib-services.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib-services.sh"

NAME=kms-proxy
START_TIMEOUT="${PHI_KMS_PROXY_START_TIMEOUT:-15}"

start() {
    svc_state_init
    if svc_running "$NAME"; then
        svc_log "already running (pid $(cat "$PHI_STATE_DIR/$NAME.pid"), port $(cat "$PHI_STATE_DIR/$NAME.port"))"
        cat -- "$PHI_STATE_DIR/$NAME.env"
        return 0
    fi
    local upstream="${1:-}"
    if [[ -z "$upstream" ]]; then
        if [[ -f "$PHI_STATE_DIR/moto.port" ]] && svc_running moto; then
            upstream="http://127.0.0.1:$(cat "$PHI_STATE_DIR/moto.port")"
        else
            svc_log "no upstream given and moto is not running (scripts/moto.sh start)"
            return 1
        fi
    fi

    local extra=() pid port log="$PHI_STATE_DIR/$NAME.log" portfile="$PHI_STATE_DIR/$NAME.port"
    if [[ "${PHI_KMS_PROXY_ENFORCE_KEY_STATE:-0}" == "1" ]]; then
        extra+=(--enforce-key-state)
    fi
    rm -f -- "$portfile"
    # The proxy binds port 0 itself and reports the port: no free-port race.
    setsid "$PHI_PYTHON" "$PHI_SCRIPTS_DIR/kms_fault_proxy.py" \
        --upstream "$upstream" --host 127.0.0.1 --port 0 --port-file "$portfile" \
        "${extra[@]}" </dev/null >"$log" 2>&1 &
    pid=$!
    local deadline=$((SECONDS + START_TIMEOUT))
    while [[ ! -s "$portfile" ]] && ((SECONDS < deadline)) && svc_pid_alive "$pid"; do
        sleep 0.05
    done
    if [[ ! -s "$portfile" ]]; then
        svc_log "proxy did not start; log:"
        tail -n 20 -- "$log" >&2 || true
        kill -KILL "$pid" 2>/dev/null || true
        return 1
    fi
    port="$(cat -- "$portfile")"
    if ! svc_wait_http "http://127.0.0.1:$port/__fault__/health" "$START_TIMEOUT" "$pid"; then
        svc_log "proxy not answering; log:"
        tail -n 20 -- "$log" >&2 || true
        kill -KILL "$pid" 2>/dev/null || true
        return 1
    fi
    echo "$pid" >"$PHI_STATE_DIR/$NAME.pid"
    printf 'export PHI_KMS_PROXY_URL=http://127.0.0.1:%s\n' "$port" >"$PHI_STATE_DIR/$NAME.env"
    svc_log "up: pid $pid, http://127.0.0.1:$port -> $upstream (log: $log)"
    cat -- "$PHI_STATE_DIR/$NAME.env"
}

case "${1:-}" in
    start) shift; start "$@" ;;
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
    *) echo "usage: $0 start [UPSTREAM_URL]|stop|status|env" >&2; exit 2 ;;
esac
