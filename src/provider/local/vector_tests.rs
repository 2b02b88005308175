//! The committed keystore vectors (tests/vectors/keystore-v1.json and
//! keystore-v2.json, docs/KEYSTORE.md section 7) checked value by value
//! against the library's own parser, KDF, table codec and wrap AAD. With
//! `PHI_ENVELOPE_WRITE_KEYSTORE_VECTORS=1` the vectors are made afresh and
//! written first (then checked like any other run).

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::format::EncryptionContext;

const PASSPHRASE: &str = "correct horse battery staple";
const PLAINTEXT: &[u8] = b"potassium 4.1 mmol/L";

fn vector_path(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/vectors/keystore-v{version}.json"))
}

fn hex_of(b: &[u8]) -> String {
    hex::encode(b)
}

fn unhex(s: &serde_json::Value) -> Vec<u8> {
    hex::decode(s.as_str().expect("a hex string")).expect("lowercase hex")
}

fn context_of(v: &serde_json::Value) -> EncryptionContext {
    let pairs: Vec<(String, String)> = v
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    EncryptionContext::from_pairs(pairs).unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// Makes both vectors: one keystore (key `local:records`, version 1
/// destroyed, version 2 primary), one message wrapped under version 2; the
/// version-1 file holds the same table, sealed the way version 1 was.
fn write_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keystore.json");
    let store = Arc::new(LocalKeystore::create(&path, SecretString::from(PASSPHRASE)).unwrap());
    let k: KeyRef = "local:records".parse().unwrap();
    store.add_key(&k).unwrap();
    store.rotate_sync(&k).unwrap();
    store.destroy_sync(&k, 1).unwrap();
    let ctx = EncryptionContext::from_pairs([("tenant", "st-mary"), ("record_type", "lab-result")])
        .unwrap();
    let keyring = crate::Keyring::builder()
        .provider(store.clone())
        .recipient(k.clone())
        .build()
        .unwrap();
    let env = crate::Envelope::new(keyring).as_caller("vector-maker", "test-vector");
    let message = block_on(env.seal(PLAINTEXT, &ctx)).unwrap();
    let info = crate::envelope::inspect(&message).unwrap();
    let entry = info.header.recipients()[0].clone();
    let Unwrapped::Key(dek) = store.unwrap_sync(&entry, &ctx).unwrap() else {
        panic!("the fresh message does not unwrap")
    };
    let cache = store.lock_cache();
    let Protection::Passphrase { kdf, key } = &cache.protection else {
        unreachable!()
    };
    let (version, kek) = cache.table.primary("records").unwrap();
    let v2_file = std::fs::read(&path).unwrap();
    let v1_file = file::seal_version(1, kdf, Some(key), &cache.table).unwrap();
    let context_json: serde_json::Map<String, serde_json::Value> = ctx
        .iter()
        .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
        .collect();
    for (format_version, file_bytes) in [(1u32, v1_file.to_vec()), (2, v2_file)] {
        let kdf_json = file::parse(&file_bytes).unwrap();
        let header = kdf_json.header_aad_for_tests().to_vec();
        let doc = serde_json::json!({
            "description": format!(
                "phi-envelope local keystore, file format version {format_version} (docs/KEYSTORE.md, section 7). \
                 Made by the library (src/provider/local/vector_tests.rs); every value is checked by that test \
                 and by tests/independent/keystore_recover.py. The passphrase is public: never use it."
            ),
            "format_version": format_version,
            "passphrase": PASSPHRASE,
            "passphrase_hex": hex_of(PASSPHRASE.as_bytes()),
            "passphrase_file_hex": hex_of(format!("{PASSPHRASE}\r\n").as_bytes()),
            "keystore_file": String::from_utf8(file_bytes.clone()).unwrap(),
            "header_aad_hex": hex_of(&header),
            "kdf_key_hex": hex_of(&key[..]),
            "table_plaintext": String::from_utf8(cache.table.to_json_for(format_version).to_vec()).unwrap(),
            "message": {
                "context": context_json,
                "key_ref": entry.key_ref,
                "key_version": version,
                "kek_hex": hex_of(kek),
                "wrap_aad_hex": hex_of(&wrap_aad(&entry.key_ref, version, &ctx)),
                "wrapped_dek_hex": hex_of(&entry.wrapped),
                "dek_hex": hex_of(dek.expose_secret()),
                "message_hex": hex_of(&message),
                "plaintext": std::str::from_utf8(PLAINTEXT).unwrap(),
                "plaintext_hex": hex_of(PLAINTEXT),
            }
        });
        let mut text = serde_json::to_string_pretty(&doc).unwrap();
        text.push('\n');
        std::fs::write(vector_path(format_version), text).unwrap();
    }
}

#[test]
fn keystore_vectors_match_the_library_value_by_value() {
    if std::env::var_os("PHI_ENVELOPE_WRITE_KEYSTORE_VECTORS").is_some() {
        write_vectors();
    }
    for format_version in [1u32, 2] {
        let text = std::fs::read_to_string(vector_path(format_version))
            .unwrap_or_else(|e| panic!("keystore-v{format_version}.json: {e}"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let name = format!("keystore-v{format_version}");
        assert_eq!(v["format_version"], format_version, "{name}");
        let passphrase = v["passphrase"].as_str().unwrap();
        assert_eq!(unhex(&v["passphrase_hex"]), passphrase.as_bytes(), "{name}");
        let file_bytes = v["keystore_file"].as_str().unwrap().as_bytes();
        let parsed = file::parse(file_bytes).unwrap();
        assert_eq!(parsed.version, format_version, "{name}");
        assert_eq!(
            parsed.header_aad_for_tests(),
            &unhex(&v["header_aad_hex"])[..],
            "{name}"
        );
        assert!(file_bytes.starts_with(
            &parsed.header_aad_for_tests()[..parsed.header_aad_for_tests().len() - 1]
        ));
        let Kdf::Argon2id { params, salt } = parsed.kdf else {
            panic!("{name}: not protected")
        };
        let key = file::derive(&SecretString::from(passphrase), params, &salt).unwrap();
        assert_eq!(
            hex_of(&key[..]),
            v["kdf_key_hex"].as_str().unwrap(),
            "{name}"
        );
        let table = parsed.open(Some(&key)).unwrap();
        assert_eq!(
            table.to_json_for(format_version).as_slice(),
            v["table_plaintext"].as_str().unwrap().as_bytes(),
            "{name}"
        );
        let m = &v["message"];
        let ctx = context_of(&m["context"]);
        let key_ref = m["key_ref"].as_str().unwrap();
        let version = m["key_version"].as_u64().unwrap() as u32;
        assert_eq!(
            hex_of(&wrap_aad(key_ref, version, &ctx)),
            m["wrap_aad_hex"].as_str().unwrap(),
            "{name}"
        );
        let kek = table
            .versions("records")
            .unwrap()
            .iter()
            .find(|x| x.version == version)
            .and_then(|x| x.key.clone())
            .unwrap();
        assert_eq!(hex_of(&kek[..]), m["kek_hex"].as_str().unwrap(), "{name}");
        let wrapped = unhex(&m["wrapped_dek_hex"]);
        assert_eq!(wrapped.len(), WRAPPED_KEY_LEN);
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&wrapped[..12]);
        let mut buf = wrapped[12..].to_vec();
        let aad = unhex(&m["wrap_aad_hex"]);
        let n = Aes256Gcm::new(&kek[..])
            .unwrap()
            .open_in_place(nonce, &aad, &mut buf)
            .unwrap();
        assert_eq!(hex_of(&buf[..n]), m["dek_hex"].as_str().unwrap(), "{name}");
        let dek = Dek::from_slice(&buf[..n]).unwrap();
        let pt = crate::message::open(&unhex(&m["message_hex"]), &dek, &ctx).unwrap();
        assert_eq!(pt, unhex(&m["plaintext_hex"]), "{name}");
        assert_eq!(pt, m["plaintext"].as_str().unwrap().as_bytes(), "{name}");
        let header = crate::Header::parse(&unhex(&m["message_hex"])).unwrap().0;
        let e = &header.recipients()[0];
        assert_eq!(
            (e.provider.as_str(), e.key_ref.as_str(), e.key_version),
            ("local", key_ref, version)
        );
        assert_eq!(e.wrapped, wrapped, "{name}");
    }
}
