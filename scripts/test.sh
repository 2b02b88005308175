#!/usr/bin/env bash
# The whole test suite, real components included: installs SoftHSM2 and moto if
# missing, creates a fresh SoftHSM2 token, starts a KMS-compatible server and the
# fault-injecting proxy and an OpenBao dev server (Transit) on loopback, runs every
# test with every feature, stops them.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --test pkcs11   # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
exec scripts/test-services.sh run -- cargo test --all-features --locked "$@"
