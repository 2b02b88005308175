//! A backup cut short (a full disk, `head -c`, an interrupted copy) is
//! reported by `decrypt` and `verify` as truncated, with the advice that a
//! complete copy is needed, wherever the cut falls: inside the header, at a
//! chunk boundary, or inside a chunk (docs/FORMAT.md section 7.4). A cut
//! inside the first chunk is the one exception: it cannot be told from
//! tampering with a single-chunk message, and stays the opaque error.

mod cli_support;

use std::fs;

use cli_support::{code, Env};

const CHUNK: usize = 16 * 1024;
const CT_CHUNK: usize = CHUNK + 16;

/// Everything the command printed, stdout then stderr.
fn said(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_backup_cut_short_says_truncated_and_asks_for_a_complete_copy() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::write(env.path("f"), cli_bytes(5 * CHUNK + 1234)).unwrap();
    env.ok(&["encrypt", "-o", "f.phi", "f"]);
    let good = fs::read(env.path("f.phi")).unwrap();
    let o = env.ok(&["inspect", "--json", "f.phi"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let body = info["header_bytes"].as_u64().unwrap() as usize + 56;
    let chunk = |i: usize| body + i * CT_CHUNK;

    let cuts = [
        ("inside the header", 20),
        ("inside the body prefix", body - 10),
        ("at a chunk boundary", chunk(2)),
        ("at the final chunk", chunk(5)),
        ("just after a chunk boundary", chunk(3) + 9),
        ("inside a chunk", chunk(2) + 8000),
        ("inside the last full chunk", chunk(4) + CT_CHUNK - 1),
        ("inside the final chunk", good.len() - 1),
    ];
    for (what, len) in cuts {
        fs::write(env.path("cut.phi"), &good[..len]).unwrap();
        for args in [
            &["verify", "cut.phi"][..],
            &["decrypt", "-o", "out", "cut.phi"][..],
        ] {
            let o = env.run(args);
            let text = said(&o);
            assert_eq!(code(&o), 2, "{what}, {args:?}: {text}");
            assert!(
                text.contains("truncated") && text.contains("a complete copy is needed"),
                "{what}, {args:?}: {text}"
            );
            assert!(
                !text.contains("wrong key") && !text.contains("wrong --context"),
                "{what}, {args:?}: {text}"
            );
            cli_support::assert_friendly(&String::from_utf8_lossy(&o.stderr));
            assert!(!env.path("out").exists(), "{what}: output left behind");
        }
    }

    // A cut inside chunk 0: nothing but the commitment authenticated, so it
    // is the opaque error, which also mentions a damaged copy.
    fs::write(env.path("cut.phi"), &good[..chunk(0) + 5000]).unwrap();
    let o = env.run(&["verify", "cut.phi"]);
    assert_eq!(code(&o), 2, "{}", said(&o));
    assert!(said(&o).contains("authentication failed"), "{}", said(&o));

    // The complete copy still restores.
    env.ok(&["decrypt", "-o", "out", "f.phi"]);
    assert_eq!(
        fs::read(env.path("out")).unwrap(),
        fs::read(env.path("f")).unwrap()
    );
}

fn cli_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

/// docs/CLI.md, "Encryption context": `--context` splits at the first `=`,
/// keeps every other byte (spaces and `=` included) as given, and refuses
/// an argument without `=`, an empty key and a duplicate key.
#[test]
fn context_pairs_split_at_the_first_equals_sign_and_keep_spaces() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::write(env.path("f"), b"payload").unwrap();
    env.ok(&[
        "encrypt",
        "--context",
        "note= a=b ",
        "--context",
        "k=",
        "-o",
        "f.phi",
        "f",
    ]);
    // Exactly the same pairs (in any order) restore it.
    env.ok(&[
        "decrypt",
        "--context",
        "k=",
        "--context",
        "note= a=b ",
        "-o",
        "out",
        "f.phi",
    ]);
    assert_eq!(fs::read(env.path("out")).unwrap(), b"payload");
    // The value is " a=b " with its spaces: trimmed or split differently,
    // it is another context (exit 2).
    for other in ["note=a=b", "note= a=b", "note= a", " note= a=b "] {
        env.fails(
            &["verify", "--context", "k=", "--context", other, "f.phi"],
            2,
        );
    }
    // Refused as usage errors (exit 1), before any key is used.
    for bad in ["note", "=x", "k=1"] {
        let err = env.fails(&["verify", "--context", "k=", "--context", bad, "f.phi"], 1);
        assert!(err.contains("--context"), "{bad:?}: {err}");
    }
}
