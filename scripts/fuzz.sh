#!/usr/bin/env bash
# The fuzz targets of phi-envelope (fuzz/, a cargo-fuzz crate of its own).
#
#   scripts/fuzz.sh smoke [SECONDS]            every target for SECONDS (default 20): CI
#   scripts/fuzz.sh long [SECONDS] [TARGET...] every (or the given) target for SECONDS
#                                              (default 900), FUZZ_JOBS (2) at a time in the
#                                              background, then minimise the corpora
#   scripts/fuzz.sh minimize [TARGET...]       merge new findings into fuzz/corpus, minimised
#   scripts/fuzz.sh repro TARGET FILE...       run a target on saved inputs (a crash artifact)
#   scripts/fuzz.sh seed                       (re)write the seed corpus from the vectors
#   scripts/fuzz.sh build | list
#
# Works on a fresh machine: installs cargo-fuzz if missing; uses the nightly toolchain if
# `cargo +nightly` works, else the stable one with RUSTC_BOOTSTRAP=1 (set FUZZ_TOOLCHAIN=stable
# to force it). Env: FUZZ_SANITIZER (address | none; default address), FUZZ_JOBS (2),
# FUZZ_OUT (where long runs keep their work corpora and logs; default fuzz/runs).
#
# Crashes are written to fuzz/artifacts/TARGET/ (ignored by git); turn each one into a test in
# tests/fuzz_regressions.rs and keep its minimised input in fuzz/corpus/TARGET/.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
FUZZ=$ROOT/fuzz

# Every target, in the order they run. keystore_load, audit_verify and recovery_share need the
# local keystore, the audit log and the recovery recipient (cargo features of the fuzz crate, on
# by default).
TARGETS=(header_parse keyref_parse record_open envelope_open stream_decrypt seek_decrypt
         stream_mutate round_trip file_engine keystore_load audit_verify recovery_share)

log() { printf '[fuzz] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- toolchain -------------------------------------------------------------------------------
TC=()
pick_toolchain() {
    if [[ "${FUZZ_TOOLCHAIN:-auto}" != "stable" ]] && cargo +nightly --version >/dev/null 2>&1; then
        TC=(+nightly)
        log "toolchain: $(cargo +nightly --version)"
    else
        # cargo-fuzz passes -Z flags to rustc (sanitizers, coverage options): allow them on
        # the stable toolchain.
        export RUSTC_BOOTSTRAP=1
        TC=()
        log "toolchain: $(cargo --version) with RUSTC_BOOTSTRAP=1 (no nightly found)"
    fi
}

ensure_cargo_fuzz() {
    if ! cargo fuzz --version >/dev/null 2>&1; then
        log "installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
}

SANITIZER=${FUZZ_SANITIZER:-address}
HOST=""
BIN=""
build() {
    ensure_cargo_fuzz
    pick_toolchain
    HOST=$(rustc "${TC[@]}" -vV | sed -n 's/^host: //p')
    log "building the fuzz targets (sanitizer: $SANITIZER)"
    (cd "$FUZZ" && cargo "${TC[@]}" fuzz build --sanitizer "$SANITIZER" -O)
    BIN=$FUZZ/target/$HOST/release
    for t in "${TARGETS[@]}"; do
        [[ -x "$BIN/$t" ]] || die "target $t was not built"
    done
}

# Flags every run gets. The keystore target may run Argon2id with up to 1 GiB (the file's own
# bounded parameters), hence the memory and time limits.
common_flags() {
    local t=$1
    local flags=(-rss_limit_mb=3072 -timeout=60 -print_final_stats=1)
    [[ "$t" == keystore_load ]] && flags=(-rss_limit_mb=3072 -timeout=180 -print_final_stats=1)
    printf '%s\n' "${flags[@]}"
}

# The decryption targets take whole messages: let the fuzzer make inputs of a few chunks, while
# the committed corpus keeps inputs of at most 20 000 bytes (one full chunk and a final one) to
# stay small. Valid messages of many chunks are made at run time by stream_mutate (from the
# vectors), round_trip and file_engine.
run_flags() {
    case $1 in
        record_open | envelope_open | stream_decrypt | seek_decrypt) echo -max_len=40000 ;;
    esac
}
corpus_flags() {
    case $1 in
        record_open | envelope_open | stream_decrypt | seek_decrypt) echo -max_len=20000 ;;
        audit_verify) echo -max_len=2048 ;;
    esac
}

check_target() {
    local t=$1
    local known=" ${TARGETS[*]} "
    [[ "$known" == *" $t "* ]] || die "unknown target $t (scripts/fuzz.sh list)"
}

# --- smoke: what CI runs ---------------------------------------------------------------------
smoke() {
    local secs=${1:-20}
    build
    local failed=()
    SMOKE_WORK=$(mktemp -d "${TMPDIR:-/tmp}/phi-fuzz-smoke.XXXXXX")
    trap 'rm -rf "$SMOKE_WORK"' EXIT
    local work=$SMOKE_WORK
    for t in "${TARGETS[@]}"; do
        mkdir -p "$work/$t" "$FUZZ/artifacts/$t"
        log "smoke: $t for ${secs}s"
        local out=$work/$t.log
        # New inputs go to the scratch directory; the committed corpus is read only.
        if "$BIN/$t" "$work/$t" "$FUZZ/corpus/$t" -max_total_time="$secs" \
            -artifact_prefix="$FUZZ/artifacts/$t/" $(common_flags "$t") $(run_flags "$t") \
            >"$out" 2>&1; then
            log "  $(grep -E '^#[0-9]+' "$out" | tail -1 | sed -E 's/ +/ /g')"
            log "  $(grep -E 'stat::number_of_executed_units' "$out" | sed -E 's/ +/ /g')"
        else
            failed+=("$t")
            grep -E -A12 'panicked at|ERROR: libFuzzer|SUMMARY' "$out" | head -40 >&2 || tail -40 "$out" >&2
            log "  FAILED: artifacts in fuzz/artifacts/$t/"
        fi
    done
    if ((${#failed[@]})); then
        die "smoke run failed for: ${failed[*]}"
    fi
    log "smoke run passed: ${#TARGETS[@]} targets"
}

# --- long runs -------------------------------------------------------------------------------
OUT=${FUZZ_OUT:-$FUZZ/runs}
run_long_one() {
    local t=$1 secs=$2
    mkdir -p "$OUT/$t" "$FUZZ/artifacts/$t"
    # Fork mode with -ignore_crashes: a crash is saved and the run goes on, so one known bug
    # does not hide the others for the rest of the run.
    "$BIN/$t" "$OUT/$t" "$FUZZ/corpus/$t" -fork=1 -ignore_crashes=1 -ignore_timeouts=1 \
        -ignore_ooms=1 -max_total_time="$secs" -artifact_prefix="$FUZZ/artifacts/$t/" \
        $(common_flags "$t") $(run_flags "$t") >"$OUT/$t.log" 2>&1 || true
}

summary() {
    local t line crashes
    printf '%-15s %12s %8s %8s %s\n' target executions cov ft 'crashes/timeouts/ooms'
    for t in "$@"; do
        [[ -f "$OUT/$t.log" ]] || continue
        line=$(grep -E '^#[0-9]+: cov:' "$OUT/$t.log" | tail -1 || true)
        crashes=$(ls "$FUZZ/artifacts/$t" 2>/dev/null | grep -c -E '^(crash|timeout|oom)-' || true)
        printf '%-15s %12s %8s %8s %s (artifacts: %s)\n' "$t" \
            "$(sed -nE 's/^#([0-9]+):.*/\1/p' <<<"$line")" \
            "$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$line")" \
            "$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$line")" \
            "$(sed -nE 's/.*oom\/timeout\/crash: ([0-9\/]+).*/\1/p' <<<"$line")" "$crashes"
    done
}

long() {
    local secs=900
    if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then secs=$1; shift; fi
    local targets=("$@")
    ((${#targets[@]})) || targets=("${TARGETS[@]}")
    for t in "${targets[@]}"; do check_target "$t"; done
    build
    local jobs=${FUZZ_JOBS:-2}
    log "long run: ${#targets[@]} targets x ${secs}s, $jobs at a time; logs in $OUT/TARGET.log"
    for t in "${targets[@]}"; do
        while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
        log "start $t"
        run_long_one "$t" "$secs" &
    done
    wait
    minimize "${targets[@]}"
    summary "${targets[@]}" | tee "$OUT/summary.txt" >&2
}

minimize() {
    local targets=("$@")
    ((${#targets[@]})) || targets=("${TARGETS[@]}")
    [[ -n "$BIN" ]] || build
    for t in "${targets[@]}"; do
        check_target "$t"
        local new=$FUZZ/corpus/.$t.min
        rm -rf "$new" && mkdir -p "$new"
        local dirs=("$FUZZ/corpus/$t")
        [[ -d "$OUT/$t" ]] && dirs+=("$OUT/$t")
        log "minimise $t"
        "$BIN/$t" -merge=1 "$new" "${dirs[@]}" $(common_flags "$t") $(corpus_flags "$t") \
            >"$OUT.$t.merge.log" 2>&1 || { tail -20 "$OUT.$t.merge.log" >&2; die "merge of $t failed"; }
        rm -f "$OUT.$t.merge.log"
        rm -rf "$FUZZ/corpus/$t" && mv "$new" "$FUZZ/corpus/$t"
        log "  $t: $(ls "$FUZZ/corpus/$t" | wc -l) inputs, $(du -sb "$FUZZ/corpus/$t" | cut -f1) bytes"
    done
}

repro() {
    local t=${1:?target}; shift
    check_target "$t"
    build
    "$BIN/$t" $(common_flags "$t") "$@"
}

seed() {
    pick_toolchain
    (cd "$FUZZ" && cargo "${TC[@]}" run --release --example gen_corpus -- "$FUZZ/corpus")
}

cmd=${1:-smoke}
shift || true
case "$cmd" in
    smoke) smoke "$@" ;;
    long) long "$@" ;;
    minimize | minimise) mkdir -p "$OUT"; minimize "$@" ;;
    repro) repro "$@" ;;
    seed) seed ;;
    build) build ;;
    list) printf '%s\n' "${TARGETS[@]}" ;;
    *) die "unknown command $cmd (smoke | long | minimize | repro | seed | build | list)" ;;
esac
