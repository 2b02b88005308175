#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start/stop a throwaway PostgreSQL server for the audit trail tests: a fresh cluster
# (initdb) in a temporary directory, listening on 127.0.0.1 (a free port) and on a Unix
# socket in that directory, trust authentication on both (a test server only).
# TLS is on too (ssl=on) with a throwaway CA made at start (the `openssl` tool): the
# server's certificate names `localhost` only (DNS SAN; not 127.0.0.1, so that the
# name check can be tested), and a second, unrelated CA is made for the wrong-CA test.
# Plaintext stays allowed on both listeners, except for members of the role
# `phi_test_tls_only`, which may log in over TCP with TLS only (`hostssl`, then
# `host ... reject` in pg_hba.conf): a login as one of them proves the session is TLS.
# The role `phi_tls_cert_user` logs in with a client certificate only (`hostssl ... cert`),
# `phi_tls_scram_user` with a SCRAM-SHA-256 password over TLS (channel binding).
#
# Usage:
#   scripts/postgres.sh start     # start (no-op if already running); prints `export ...` lines
#   scripts/postgres.sh stop      # stop it and delete its cluster
#   scripts/postgres.sh restart-db  # `pg_ctl restart -m fast` (the tests' restart mid-load)
#   scripts/postgres.sh status    # exit 0 if running
#   scripts/postgres.sh env       # print the `export ...` lines of the running server
#
# PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user
# (created by the Debian package) and initdb/pg_ctl run through runuser.
#
# State (override the dir with PHI_TEST_SERVICES_DIR): target/test-services/
#   postgres.dir (the cluster's temporary directory), postgres.port, postgres.env
# Exported variables:
#   PHI_PG_URL=postgresql://postgres@127.0.0.1:PORT/postgres   (the superuser)
#   PHI_PG_HOST=127.0.0.1  PHI_PG_PORT=PORT  PHI_PG_SOCKET_DIR=DIR
#   PHI_PG_SCRIPT=<this script>  PHI_PG_STATE_DIR=<the state dir> (for restart-db)
#   PHI_PG_TLS_CA=DIR/tls/ca.crt (the CA of the server's certificate, PEM)
#   PHI_PG_TLS_OTHER_CA=DIR/tls/other-ca.crt (a CA that signed nothing the server has)
#   PHI_PG_TLS_NAME=localhost (the one name in the server's certificate)
#   PHI_PG_TLS_CLIENT_CERT, PHI_PG_TLS_CLIENT_KEY: a client certificate (CN
#     phi_tls_cert_user, signed by the CA), the one way that role logs in (`cert`)
set -euo pipefail

SVC_NAME=postgres
# shellcheck source=lib-services.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib-services.sh"

NAME=postgres

pg_bindir() {
    local d
    if command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        pg_config --bindir; return 0
    fi
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" ]] && { echo "$d"; return 0; }
    done
    return 1
}

# as_owner CMD...: run CMD as the cluster's owner (postgres when we are root).
as_owner() {
    if [[ "$(id -u)" == "0" ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

running() {
    local dir
    [[ -f "$PHI_STATE_DIR/$NAME.dir" ]] || return 1
    dir="$(cat -- "$PHI_STATE_DIR/$NAME.dir")"
    [[ -d "$dir/data" ]] || return 1
    as_owner "$(pg_bindir)/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

# make_tls DIR: a throwaway CA, the server's key and certificate (for `localhost` only)
# signed by it, another CA; ssl=on in the cluster's postgresql.conf and the TLS-only
# rule for `phi_test_tls_only` at the top of its pg_hba.conf.
make_tls() {
    local dir="$1" tls="$1/tls" hba
    command -v openssl >/dev/null 2>&1 || { svc_log "no openssl: run scripts/install-deps.sh"; return 1; }
    mkdir -p -- "$tls"
    printf '%s\n' '[req]' 'distinguished_name = dn' '[dn]' '[ca]' 'basicConstraints = critical, CA:TRUE' \
        'keyUsage = critical, keyCertSign, cRLSign' 'subjectKeyIdentifier = hash' \
        '[server]' 'basicConstraints = critical, CA:FALSE' \
        'keyUsage = critical, digitalSignature' 'extendedKeyUsage = serverAuth' \
        'subjectAltName = DNS:localhost' 'authorityKeyIdentifier = keyid' \
        'subjectKeyIdentifier = hash' '[client]' 'basicConstraints = critical, CA:FALSE' \
        'keyUsage = critical, digitalSignature' 'extendedKeyUsage = clientAuth' \
        'authorityKeyIdentifier = keyid' >"$tls/ext.cnf"
    local name
    for name in ca other-ca; do
        openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout "$tls/$name.key" -out "$tls/$name.crt" -days 7 \
            -subj "/CN=phi-envelope test $name" -config "$tls/ext.cnf" -extensions ca \
            >>"$tls/openssl.log" 2>&1 || { tail -n 20 -- "$tls/openssl.log" >&2; return 1; }
    done
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$tls/server.key" -out "$tls/server.csr" -subj "/CN=localhost" \
        -config "$tls/ext.cnf" >>"$tls/openssl.log" 2>&1 &&
    openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
        -CAcreateserial -out "$tls/server.crt" -days 7 -extfile "$tls/ext.cnf" \
        -extensions server >>"$tls/openssl.log" 2>&1 || { tail -n 20 -- "$tls/openssl.log" >&2; return 1; }
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$tls/client.key" -out "$tls/client.csr" -subj "/CN=phi_tls_cert_user" \
        -config "$tls/ext.cnf" >>"$tls/openssl.log" 2>&1 &&
    openssl x509 -req -in "$tls/client.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
        -CAcreateserial -out "$tls/client.crt" -days 7 -extfile "$tls/ext.cnf" \
        -extensions client >>"$tls/openssl.log" 2>&1 || { tail -n 20 -- "$tls/openssl.log" >&2; return 1; }
    rm -f -- "$tls/ca.key" "$tls/other-ca.key" "$tls/server.csr" "$tls/client.csr"
    chmod 600 -- "$tls/server.key" "$tls/client.key"
    chmod 644 -- "$tls/ca.crt" "$tls/other-ca.crt" "$tls/server.crt" "$tls/client.crt"
    [[ "$(id -u)" == "0" ]] && chown -R postgres: -- "$tls"
    {
        echo "ssl = on"
        echo "ssl_cert_file = '$tls/server.crt'"
        echo "ssl_key_file = '$tls/server.key'"
        echo "ssl_ca_file = '$tls/ca.crt'"
    } >>"$dir/data/postgresql.conf"
    hba="$dir/data/pg_hba.conf"
    {
        echo "# Members of phi_test_tls_only: TCP with TLS only (scripts/postgres.sh)."
        echo "hostssl all phi_tls_cert_user 127.0.0.1/32 cert"
        echo "hostssl all phi_tls_scram_user 127.0.0.1/32 scram-sha-256"
        echo "hostssl all +phi_test_tls_only 127.0.0.1/32 trust"
        echo "host    all +phi_test_tls_only all          reject"
        cat -- "$hba"
    } >"$hba.new"
    mv -f -- "$hba.new" "$hba"
    [[ "$(id -u)" == "0" ]] && chown postgres: -- "$hba"
    return 0
}

start() {
    svc_state_init
    if running; then
        svc_log "already running (port $(cat "$PHI_STATE_DIR/$NAME.port"))"
        cat -- "$PHI_STATE_DIR/$NAME.env"
        return 0
    fi
    local bin dir port attempt
    bin="$(pg_bindir)" || { svc_log "PostgreSQL is not installed: run scripts/install-deps.sh first"; return 1; }
    dir="$(mktemp -d /tmp/phi-pg.XXXXXX)"
    chmod 755 -- "$dir"
    if [[ "$(id -u)" == "0" ]]; then
        id postgres >/dev/null 2>&1 || { svc_log "no postgres user (the Debian package creates it)"; return 1; }
        chown postgres: -- "$dir"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 || {
        svc_log "initdb failed:"; tail -n 20 -- "$dir/initdb.log" >&2; return 1; }
    make_tls "$dir" || { svc_log "cannot make the TLS certificates (openssl)"; return 1; }
    for attempt in 1 2 3; do
        port="$(svc_free_port)"
        svc_log "starting PostgreSQL on 127.0.0.1:$port and $dir (attempt $attempt)"
        # fsync stays on: the tests check durability across a restart.
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300" start >&2; then
            echo "$dir" >"$PHI_STATE_DIR/$NAME.dir"
            echo "$port" >"$PHI_STATE_DIR/$NAME.port"
            cat >"$PHI_STATE_DIR/$NAME.env" <<ENV
export PHI_PG_URL=postgresql://postgres@127.0.0.1:$port/postgres
export PHI_PG_HOST=127.0.0.1
export PHI_PG_PORT=$port
export PHI_PG_SOCKET_DIR=$dir
export PHI_PG_SCRIPT=$PHI_SCRIPTS_DIR/postgres.sh
export PHI_PG_STATE_DIR=$PHI_STATE_DIR
export PHI_PG_TLS_CA=$dir/tls/ca.crt
export PHI_PG_TLS_OTHER_CA=$dir/tls/other-ca.crt
export PHI_PG_TLS_NAME=localhost
export PHI_PG_TLS_CLIENT_CERT=$dir/tls/client.crt
export PHI_PG_TLS_CLIENT_KEY=$dir/tls/client.key
ENV
            svc_log "up: 127.0.0.1:$port (log: $dir/server.log)"
            cat -- "$PHI_STATE_DIR/$NAME.env"
            return 0
        fi
        svc_log "PostgreSQL did not come up; log:"
        tail -n 20 -- "$dir/server.log" >&2 || true
    done
    return 1
}

stop() {
    local dir
    if [[ -f "$PHI_STATE_DIR/$NAME.dir" ]]; then
        dir="$(cat -- "$PHI_STATE_DIR/$NAME.dir")"
        if [[ -d "$dir/data" ]]; then
            as_owner "$(pg_bindir)/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
        fi
        [[ "$dir" == /tmp/phi-pg.* ]] && rm -rf -- "$dir"
        svc_log "stopped"
    else
        svc_log "not running"
    fi
    rm -f -- "$PHI_STATE_DIR/$NAME.dir" "$PHI_STATE_DIR/$NAME.port" "$PHI_STATE_DIR/$NAME.env"
}

restart_db() {
    local dir port
    dir="$(cat -- "$PHI_STATE_DIR/$NAME.dir")"
    port="$(cat -- "$PHI_STATE_DIR/$NAME.port")"
    as_owner "$(pg_bindir)/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300" restart >&2
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart-db) restart_db ;;
    status)
        if running; then svc_log "running (port $(cat "$PHI_STATE_DIR/$NAME.port"))"
        else svc_log "not running"; exit 1; fi ;;
    env)
        running || { svc_log "not running"; exit 1; }
        cat -- "$PHI_STATE_DIR/$NAME.env" ;;
    *) echo "usage: $0 start|stop|restart-db|status|env" >&2; exit 2 ;;
esac
