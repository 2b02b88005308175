//! Writes the seed corpus of every fuzz target from the committed vectors
//! (tests/vectors/phi-envelope-v1.json, the Wycheproof Cobblestone vectors),
//! messages sealed through the fuzz crate's provider, key references from
//! the tests, keystores and audit logs made by the library.
//!
//! `cargo run --release --example gen_corpus --features keystore,audit -- DIR`
//! (scripts/fuzz.sh seed). Existing files are kept; seeds are named by
//! content, so running it twice adds only what differs (fresh salts).

use std::path::{Path, PathBuf};

use phi_envelope_fuzz::kms::{block_on, contexts, envelope};
use phi_envelope_fuzz::vectors;

struct Out {
    root: PathBuf,
    count: usize,
}

impl Out {
    fn put(&mut self, target: &str, data: &[u8]) {
        use std::hash::{Hash, Hasher};
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        // A stable name from the content (not cryptographic: names only).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        data.hash(&mut h);
        let name = format!("seed-{:016x}", h.finish());
        std::fs::write(dir.join(name), data).unwrap();
        self.count += 1;
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn pseudo(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let mut out = Out { root, count: 0 };
    let v1 = vectors::v1();
    let keyings = vectors::keyings();

    // header_parse: whole v1 messages, headers alone, cut headers.
    for v in v1 {
        out.put(
            "header_parse",
            &v.message[..v.header_len.min(v.message.len())],
        );
        out.put(
            "header_parse",
            &v.message[..(v.header_len + 100).min(v.message.len())],
        );
        out.put("header_parse", &v.message[..v.header_len / 2]);
    }
    out.put("header_parse", b"PHIENV\x01\x01\x01");
    out.put("header_parse", b"PHIENV\x02\x01\x01");

    // record_open: selector + message (valid, cut, flipped).
    for (i, v) in v1.iter().enumerate() {
        let sel = [i as u8];
        out.put("record_open", &cat(&[&sel, &v.message]));
        out.put(
            "record_open",
            &cat(&[&sel, &v.message[..v.message.len() - 1]]),
        );
        let mut m = v.message.clone();
        let last = m.len() - 1;
        m[last] ^= 1;
        out.put("record_open", &cat(&[&sel, &m]));
    }

    // envelope_open: messages sealed through the fuzz provider.
    let env = envelope();
    let recipient_sets: [&[&str]; 4] = [
        &["fuzz:a"],
        &["fuzz-dr:b"],
        &["fuzz:a", "fuzz-dr:b"],
        &["fuzz:b", "fuzz-dr:a"],
    ];
    for (c, ctx) in contexts().iter().enumerate() {
        for (r, set) in recipient_sets.iter().enumerate() {
            let e = env.to_recipients(set.iter().map(|s| s.parse().unwrap()));
            for len in [0usize, 1, 100, 16384, 20_000] {
                if (len + r + c) % 3 != 0 && len > 100 {
                    continue;
                }
                let pt = pseudo(len, (len + 7 * r + 31 * c) as u64);
                let sealed = block_on(e.seal(&pt, ctx)).unwrap();
                out.put("envelope_open", &cat(&[&[c as u8], &sealed]));
            }
        }
    }
    out.put("envelope_open", &cat(&[&[1], &v1[0].message]));

    // stream_decrypt and seek_decrypt: keying selector, codes/ops, data.
    for (k, keying) in keyings.iter().enumerate() {
        let k = k as u8;
        if let Some(i) = keying.v1 {
            let v = &v1[i];
            let body = &v.message[v.header_len..];
            out.put(
                "stream_decrypt",
                &cat(&[&[k | 0x80, 3, 7, 200, 0], &v.message]),
            );
            out.put("stream_decrypt", &cat(&[&[k, 0], body]));
            out.put(
                "stream_decrypt",
                &cat(&[&[k, 1, 64], &body[..body.len() - 17]]),
            );
            // seek: SeekEnd(-3), Read, SeekStart(16380), Read(64), Position
            let ops: &[u8] = &[
                1, 0xfd, 0xff, 0xff, 0xff, 3, 40, 0, 0, 0, 0, 0xfc, 0x3f, 0, 0, 3, 64, 0, 0, 0, 5,
                0, 0, 0, 0,
            ];
            out.put("seek_decrypt", &cat(&[&[k | 0x80, 5], ops, &v.message]));
            out.put("seek_decrypt", &cat(&[&[k, 5], ops, body]));
        }
        for b in vectors::wycheproof(40_000) {
            if b.key == keying.key && b.context == keying.context {
                out.put("stream_decrypt", &cat(&[&[k, 2, 5, 130], &b.body]));
                let ops: &[u8] = &[
                    0, 0, 0x40, 0, 0, 3, 200, 0, 0, 0, 2, 0xf0, 0xff, 0xff, 0xff, 3, 9, 0, 0, 0,
                ];
                out.put("seek_decrypt", &cat(&[&[k, 4], ops, &b.body]));
            }
        }
    }

    // stream_mutate and round_trip: structured (arbitrary) inputs; any bytes
    // are valid, so seed a spread of lengths.
    for (i, len) in [0usize, 8, 40, 200, 1000, 5000, 20_000]
        .into_iter()
        .enumerate()
    {
        out.put("stream_mutate", &pseudo(len, 100 + i as u64));
        out.put("round_trip", &pseudo(len, 200 + i as u64));
        out.put("file_engine", &pseudo(len.min(400), 300 + i as u64));
    }

    // keyref_parse: references from the tests and docs.
    for r in [
        "local:backups",
        "local:phi-backups_2026.v1",
        "local:",
        "pkcs11:token=My%20Token;object=kek;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so",
        "pkcs11:token=phi;object=kek",
        "pkcs11:object=k;type=secret-key;slot-id=3?pin-source=/run/secrets/pin&module-name=softhsm2",
        "pkcs11:token=t;object=k?pin-value=1234",
        "pkcs11:manufacturer=SoftHSM%20project;serial=1234;model=SoftHSM%20v2;id=%ff%00",
        "pkcs11:library-manufacturer=x;object=o",
        "aws-kms:1234abcd-12ab-34cd-56ef-1234567890ab",
        "aws-kms:mrk-1234abcd12ab34cd56ef1234567890ab",
        "aws-kms:alias/phi-records",
        "aws-kms:arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "aws-kms:arn:aws:kms:us-east-1:111122223333:alias/phi-records",
        "aws-kms:arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/abc",
        "vault:transit/phi",
        "vault-sim:records",
        "hpke-recovery:28034461300cadbb6b51ab00ad114fcb",
        "hpke-recovery:28034461300CADBB6B51AB00AD114FCB",
        "hpke-recovery:28034461300cadbb6b51ab00ad114fc",
        "Vault:x",
    ] {
        out.put("keyref_parse", r.as_bytes());
    }

    #[cfg(feature = "recovery")]
    recovery_shares(&mut out);
    #[cfg(feature = "keystore")]
    keystores(&mut out);
    #[cfg(feature = "audit")]
    audit_logs(&mut out);

    eprintln!("wrote {} seeds under {}", out.count, out.root.display());
}

#[cfg(feature = "keystore")]
fn keystores(out: &mut Out) {
    use phi_envelope::provider::local::{LocalKeystore, SecretString};
    use phi_envelope::provider::{KeyProvider, KeyState};
    let dir = std::env::temp_dir().join(format!("phi-gen-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("empty.json");
    LocalKeystore::create_unprotected_for_tests(&p).unwrap();
    out.put("keystore_load", &std::fs::read(&p).unwrap());
    let p = dir.join("keys.json");
    let s = LocalKeystore::create_unprotected_for_tests(&p).unwrap();
    let a: phi_envelope::KeyRef = "local:records".parse().unwrap();
    let b: phi_envelope::KeyRef = "local:backups".parse().unwrap();
    s.add_key(&a).unwrap();
    out.put("keystore_load", &std::fs::read(&p).unwrap());
    s.add_key(&b).unwrap();
    block_on(s.rotate(&a)).unwrap();
    block_on(s.set_state(&a, 1, KeyState::Disabled)).unwrap();
    block_on(s.rotate(&b)).unwrap();
    block_on(s.destroy(&b, 1)).unwrap();
    out.put("keystore_load", &std::fs::read(&p).unwrap());
    let p = dir.join("protected.json");
    let s = LocalKeystore::create(&p, SecretString::from("fuzz passphrase")).unwrap();
    s.add_key(&a).unwrap();
    out.put("keystore_load", &std::fs::read(&p).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    // The published keystore vectors, format 1 (no generation) and 2.
    for name in ["keystore-v1.json", "keystore-v2.json"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/vectors")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let file = v["keystore_file"].as_str().unwrap();
        out.put("keystore_load", file.as_bytes());
    }
}

#[cfg(feature = "audit")]
fn audit_logs(out: &mut Out) {
    use phi_envelope::audit::{self, AuditKey, AuditLog};
    use phi_envelope::events::{Event, EventSink, Operation, Outcome};
    let dir = std::env::temp_dir().join(format!("phi-gen-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, key, max) in [
        ("unkeyed", None, 1 << 20),
        ("keyed", Some(AuditKey::new(&[7u8; 32]).unwrap()), 1 << 20),
        ("rotated", None, 900),
    ] {
        let path = dir.join(name);
        let mut b = AuditLog::builder().max_file_bytes(max);
        if let Some(k) = key {
            b = b.audit_key(k);
        }
        let log = b.open(&path).unwrap();
        for (i, (op, outcome)) in [
            (Operation::Generate, Outcome::Success),
            (Operation::Unwrap, Outcome::Rejected),
            (Operation::Unwrap, Outcome::Failed("unavailable".into())),
            (Operation::Rotate, Outcome::Denied),
        ]
        .into_iter()
        .enumerate()
        {
            log.record(
                &Event::new(op, "local", outcome)
                    .with_key("local:records", Some(i as u32 + 1))
                    .with_caller("fuzz", "seed")
                    .with_context_fingerprint("00112233445566778899aabbccddeeff"),
            )
            .unwrap();
        }
        drop(log);
        let files = audit::log_files(&path).unwrap();
        let mut data = Vec::new();
        for (i, f) in files.iter().enumerate() {
            if i > 0 {
                data.push(0xFF);
            }
            data.extend_from_slice(&std::fs::read(f).unwrap());
        }
        out.put("audit_verify", &data);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// recovery_share: the share texts and refused share sets of
/// tests/vectors/recovery-v1.json, one share a line.
#[cfg(feature = "recovery")]
fn recovery_shares(out: &mut Out) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/recovery-v1.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let lines = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_owned())
            .collect()
    };
    for v in doc["vectors"].as_array().unwrap() {
        let texts = lines(&v["split"]["share_texts"]);
        for t in &texts {
            out.put("recovery_share", t.as_bytes());
        }
        out.put("recovery_share", texts.join("\n").as_bytes());
    }
    for case in doc["invalid_shares"].as_array().unwrap() {
        out.put(
            "recovery_share",
            lines(&case["shares"]).join("\n").as_bytes(),
        );
    }
}
