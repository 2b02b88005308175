#!/usr/bin/env bash
# Runs the criterion benches (streams, files, records) and prints the table
# of docs/PERFORMANCE.md: every figure with its ratio to the baseline that
# ran in the same process (raw ring AES-256-GCM for streams, the floor of
# our design for records) and to the peers, with the targets of issue 10.
#
#   scripts/bench.sh            full run (criterion defaults: 3 s warm-up, 5 s per bench)
#   scripts/bench.sh --quick    short run (1 s warm-up, 2 s per bench) for a first look
#   scripts/bench.sh --table    only print the table from the last run's results
#   scripts/bench.sh --cpu      time single-thread benches by the CPU time of their thread
#                               (PHI_BENCH_CLOCK=cpu; results in criterion-cpu/), for a busy
#                               machine where wall time is inflated by other processes;
#                               the multi-thread benches are skipped
#   scripts/bench.sh --rss      also measure peak RSS of a 1 GiB file round trip
#   extra arguments after -- go to criterion (e.g. -- 'record-seal')
#
# Wall-clock benchmarks need a quiet machine: the script prints the load
# average first; on a busy 2-core machine the two-thread figures are
# meaningless. As root it runs the benches at nice -10.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

warmup=3 measure=5 run=1 rss=0 cpu=0
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) warmup=1 measure=2 ;;
        --table) run=0 ;;
        --rss) rss=1 ;;
        --cpu) cpu=1 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
    shift
done

target_dir=$(cargo metadata --manifest-path benches/Cargo.toml --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

criterion_dir="$target_dir/criterion"
if [ "$cpu" = 1 ]; then
    export PHI_BENCH_CLOCK=cpu
    criterion_dir="$target_dir/criterion-cpu"
fi
export CRITERION_HOME="$criterion_dir"

if [ "$run" = 1 ]; then
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
    nice_cmd=()
    if [ "$(id -u)" = 0 ]; then nice_cmd=(nice -n -10); fi
    cargo bench --manifest-path benches/Cargo.toml --bench streams --bench records --no-run
    "${nice_cmd[@]}" cargo bench --manifest-path benches/Cargo.toml --bench streams --bench records -- \
        --warm-up-time "$warmup" --measurement-time "$measure" "${extra[@]}"
fi

if [ "$rss" = 1 ]; then
    cargo bench --manifest-path benches/Cargo.toml --bench profile --no-run
    bin=$(ls -t "$target_dir"/release/deps/profile-* | grep -v '\.d$' | head -1)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/phi-bench.XXXXXX")
    for t in 1 2; do
        /usr/bin/time -f "peak RSS %M KiB (1 GiB file, encrypt + decrypt, $t threads)" \
            "$bin" file-roundtrip "$dir" 1024 "$t"
    done
    rmdir "$dir"
fi

python3 - "$criterion_dir" "$cpu" <<'PY'
import json, os, sys

root = sys.argv[1]
clock = "CPU time of the benchmarking thread" if sys.argv[2] == "1" else "wall time"
print(f"\nclock: {clock}; medians from {root}")

def median_ns(group, bench):
    p = os.path.join(root, group, *bench.split("/"), "new", "estimates.json")
    try:
        with open(p) as f:
            return json.load(f)["median"]["point_estimate"]
    except FileNotFoundError:
        return None

def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"

def verdict(r, target):
    if r is None or target is None:
        return ""
    return f"target >= {target}x: " + ("met" if r >= target else "MISSED")

def ratio(a, b):
    return None if a is None or b is None else a / b

rows = []
print()
print("Streams (16 MiB), engine (256 MiB), files (64 MiB): GiB/s of plaintext; ratio to the row named")
print(f"{'bench':42} {'GiB/s':>8} {'ratio':>8}  {'to':24} {'':28}")
for op in ("seal", "open"):
    g = f"stream-{op}"
    t = {b: median_ns(g, b) for b in
         ("raw-ring", "raw-ring-copy", "raw-ring-2t", "stream-1t", "engine/1t", "engine/2t", "age-1t")}
    f = {b: median_ns(f"file-{op}", b) for b in ("file/1t", "file/2t")}
    e = {b: median_ns(f"engine-{op}", b) for b in ("1t", "2t")}
    sizes = {"stream": 16 << 20, "engine": 256 << 20, "file": 64 << 20}
    def gibs(ns, kind):
        return None if ns is None else sizes[kind] / ns * 1e9 / (1 << 30)
    def per_gib(ns, kind):
        return None if ns is None else ns / sizes[kind]
    # Ratios across data sizes compare throughput (time per byte).
    def tratio(a, ka, b, kb):
        return ratio(per_gib(a, ka), per_gib(b, kb))
    S, E, F = "stream", "engine", "file"
    lines = [
        (f"{g}/raw-ring", t["raw-ring"], S, None, "baseline", None),
        (f"{g}/raw-ring-copy", t["raw-ring-copy"], S, ratio(t["raw-ring"], t["raw-ring-copy"]), "raw-ring", None),
        (f"{g}/raw-ring-2t", t["raw-ring-2t"], S, ratio(t["raw-ring"], t["raw-ring-2t"]), "raw-ring", None),
        (f"{g}/stream-1t", t["stream-1t"], S, ratio(t["raw-ring"], t["stream-1t"]), "raw-ring", 0.90),
        (f"{g}/stream-1t", t["stream-1t"], S, ratio(t["raw-ring-copy"], t["stream-1t"]), "raw-ring-copy", None),
        (f"{g}/engine/1t", t["engine/1t"], S, ratio(t["raw-ring"], t["engine/1t"]), "raw-ring", 0.90),
        (f"{g}/engine/2t", t["engine/2t"], S, ratio(t["stream-1t"], t["engine/2t"]), "stream-1t", 1.7),
        (f"{g}/engine/2t", t["engine/2t"], S, ratio(t["raw-ring-2t"], t["engine/2t"]), "raw-ring-2t (control)", None),
        (f"{g}/age-1t", t["age-1t"], S, ratio(t["raw-ring"], t["age-1t"]), "raw-ring", None),
        (f"engine-{op}/1t (256 MiB)", e["1t"], E, tratio(t["stream-1t"], S, e["1t"], E), "stream-1t", None),
        (f"engine-{op}/2t (256 MiB)", e["2t"], E, ratio(e["1t"], e["2t"]), "engine-1t (256 MiB)", 1.7),
        (f"engine-{op}/2t (256 MiB)", e["2t"], E, tratio(t["stream-1t"], S, e["2t"], E), "stream-1t", 1.7),
        (f"file-{op}/file/1t (64 MiB)", f["file/1t"], F, tratio(t["raw-ring"], S, f["file/1t"], F), "raw-ring", None),
        (f"file-{op}/file/2t (64 MiB)", f["file/2t"], F, ratio(f["file/1t"], f["file/2t"]), "file/1t", 1.7),
    ]
    for name, ns, kind, r, to, target in lines:
        if ns is None:
            continue
        g_ = gibs(ns, kind)
        print(f"{name:42} {('-' if g_ is None else f'{g_:.2f}'):>8} {fmt_ratio(r):>8}  {to:24} {verdict(r, target)}")

print()
print("Records (thousands of messages per second, one thread; ratio to the floor / to the peer)")
print(f"{'bench':42} {'k/s':>8} {'/floor':>8} {'/envelopers':>12} {'/kms-aead':>10}  targets")
for op in ("seal", "open"):
    for size in (64, 1024, 16384):
        g = f"record-{op}"
        names = ["raw-aead", "floor", "ours-cached", "ours-cached-hdr", "envelope-cached", "ours-fresh",
                 "envelopers-cached", "envelopers-fresh", "envelopers-cached-bytes",
                 "kms-aead-cached", "kms-aead-fresh", "esdk-committing", "esdk-default"]
        ns = {n: median_ns(g, f"{n}/{size}") for n in names}
        floor = ns["floor"] if op == "seal" else median_ns("record-seal", f"floor/{size}")
        for n in names:
            if ns[n] is None:
                continue
            kind = "cached" if "cached" in n else "fresh"
            if op == "open" and n == "ours-fresh":
                kind = "fresh"
            ours = n.startswith("ours") or n.startswith("envelope-")
            peer_e = ns.get(f"envelopers-{kind}") if ours else None
            peer_k = ns.get(f"kms-aead-{kind}") if ours else None
            r_floor = ratio(floor, ns[n])
            r_env = ratio(peer_e, ns[n])
            r_kms = ratio(peer_k, ns[n])
            targets = ""
            if size == 1024 and n in ("ours-cached", "envelope-cached") and op == "seal":
                targets = "; ".join([verdict(r_floor, 0.75) + " (floor)", verdict(r_env, 1.4) + " (envelopers)"])
            elif size == 1024 and ("cached" in n and ours) and op == "open":
                targets = verdict(r_env, 1.5) + " (envelopers)"
            print(f"{g + '/' + n + '/' + str(size):42} {1e6 / ns[n]:8.0f} {fmt_ratio(r_floor):>8} "
                  f"{fmt_ratio(r_env):>12} {fmt_ratio(r_kms):>10}  {targets}")
PY
