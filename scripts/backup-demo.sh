#!/usr/bin/env bash
# The main job of phi-envelope, end to end, on a fresh machine: build the
# `backup` CLI (release), create a keystore in a temporary directory, encrypt
# real directories, inspect and verify the backups, restore them into new
# directories, and compare every byte, mode and mtime with the originals.
#
#   scripts/backup-demo.sh               # backs up the repository's docs/ and src/
#   scripts/backup-demo.sh DIR [DIR...]  # backs up these directories instead
#
# Env:
#   PHI_ENVELOPE_PASSPHRASE  the demo keystore's passphrase. The default below
#                            is a DEMO value, public, for this throwaway keystore
#                            only: never use it (or this keystore) for real data.
#   PHI_BACKUP_BIN           use this backup binary instead of building one
#   KEEP=1                   keep the temporary directory (printed at the end)
#
# Exits non-zero if any step fails or any restored byte, mode or mtime differs.
set -euo pipefail
repo="$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [[ $# -gt 0 ]]; then
    inputs=("$@")
else
    inputs=("$repo/docs" "$repo/src")
fi
for d in "${inputs[@]}"; do
    [[ -d "$d" ]] || { echo "backup-demo: $d is not a directory" >&2; exit 1; }
done

say() { printf '\n== %s\n' "$*"; }

if [[ -n "${PHI_BACKUP_BIN:-}" ]]; then
    bin="$PHI_BACKUP_BIN"
else
    say "building the backup CLI (cargo build --release --example backup)"
    cargo build --release --locked --quiet --example backup
    bin="${CARGO_TARGET_DIR:-$repo/target}/release/examples/backup"
fi
[[ -x "$bin" ]] || { echo "backup-demo: no binary at $bin" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/phi-backup-demo.XXXXXX")"
cleanup() {
    if [[ "${KEEP:-0}" == "1" ]]; then
        echo "kept $work"
    else
        chmod -R u+w "$work" 2>/dev/null || true
        rm -rf "$work"
    fi
}
trap cleanup EXIT

export PHI_ENVELOPE_KEYSTORE="$work/keystore.json"
if [[ -z "${PHI_ENVELOPE_PASSPHRASE:-}" ]]; then
    # DEMO ONLY: a public passphrase for a throwaway keystore in a temp dir.
    export PHI_ENVELOPE_PASSPHRASE="phi-envelope DEMO passphrase - not for real data"
    echo "backup-demo: using the built-in DEMO passphrase (set PHI_ENVELOPE_PASSPHRASE to choose one)"
fi
export PHI_ENVELOPE_AUDIT_LOG="$work/audit.jsonl"
export PHI_ENVELOPE_ACTOR="backup-demo"
context=(--context "purpose=demo" --context "host=$(hostname 2>/dev/null || echo unknown)")

# What a tree holds, one line per entry: type, mode, mtime (seconds), path,
# link target. Sizes and contents are compared by diff -r.
listing() {
    (cd "$1" && find . -printf '%y %m %Ts %p %l\n' | LC_ALL=C sort)
}

say "create the keystore and its first key, local:backups (only \`keys init\` creates a keystore)"
"$bin" keys init --name backups

summary=()
status=0
for src in "${inputs[@]}"; do
    name="$(basename "$src")"
    backup="$work/$name.phi"
    restored="$work/restored-$name"

    say "encrypt $src -> $backup"
    "$bin" encrypt --key local:backups "${context[@]}" -o "$backup" "$src"

    say "inspect (no key needed)"
    "$bin" inspect "$backup"

    say "verify (decrypts and checks everything, writes nothing)"
    "$bin" verify "${context[@]}" "$backup"

    say "restore into $restored"
    "$bin" decrypt "${context[@]}" -o "$restored" "$backup"

    say "compare $src with $restored"
    if diff -r --no-dereference "$src" "$restored" \
        && diff <(listing "$src") <(listing "$restored"); then
        files=$(find "$src" -type f | wc -l)
        bytes=$(du -sb "$src" | cut -f1)
        summary+=("OK    $src: $files files, $bytes bytes, every byte, mode and mtime restored")
    else
        summary+=("DIFF  $src: the restore differs from the original")
        status=1
    fi
done

say "audit log"
"$bin" audit verify "$PHI_ENVELOPE_AUDIT_LOG"

say "summary"
"$bin" keys list
printf '%s\n' "${summary[@]}"
if [[ $status -ne 0 ]]; then
    echo "backup-demo: FAILED: a restore differs from its original" >&2
    exit 1
fi
echo "backup-demo: all backups restored identically"
