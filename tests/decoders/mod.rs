//! Every public decoder of a whole v1 message, given the DEK (or a key
//! provider that answers with it): the one rule of docs/FORMAT.md section 7.3
//! ("Decisions") says they all report the same outcome for the same bytes.
//!
//! - `message::open` (records in memory, DEK in hand);
//! - `Envelope::open` (records through a keyring);
//! - the streaming `Decryptor` (`Header::read_from`, `OpeningKey`);
//! - `Envelope::decryptor` (the same through a keyring);
//! - the `SeekableDecryptor`, read from the start;
//! - the file engine: `file::decrypt_with_key` on 1 and 3 threads, and
//!   `Envelope::decrypt_file` on 2 threads (which knows the file length);
//! - the tokio `AsyncDecryptor`.

#![allow(dead_code)]

use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::Arc;

use phi_envelope::file::{self, FileOptions};
use phi_envelope::message::{self, OpeningKey};
use phi_envelope::provider::{BoxFuture, KeyInfo, KeyProvider, KeyRef, Unwrapped};
use phi_envelope::{Dek, EncryptionContext, Envelope, Error, Header, Keyring, WrappedKey};

/// A provider for tests only: every entry of its id unwraps to one DEK.
#[derive(Debug)]
pub struct FixedDek {
    id: String,
    dek: Vec<u8>,
}

impl KeyProvider for FixedDek {
    fn id(&self) -> &str {
        &self.id
    }
    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        _: &'a Dek,
        _: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<WrappedKey>> {
        Box::pin(async move {
            Ok(WrappedKey {
                provider: self.id.clone(),
                key_ref: key.as_str().into(),
                key_version: 1,
                wrapped: vec![1],
            })
        })
    }
    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        _: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<Unwrapped>> {
        Box::pin(async move {
            if entry.provider != self.id {
                return Ok(Unwrapped::NotMine);
            }
            Ok(Unwrapped::Key(Dek::from_slice(&self.dek)?))
        })
    }
    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        Box::pin(async move { Ok(KeyInfo::new(key.clone(), None, Vec::new())) })
    }
}

/// An envelope whose keyring answers every entry of `providers` with `dek`.
pub fn envelope_for(dek: &[u8], providers: &[&str]) -> Envelope {
    let mut b = Keyring::builder();
    for id in providers {
        b = b.provider(Arc::new(FixedDek {
            id: (*id).to_owned(),
            dek: dek.to_vec(),
        }));
    }
    Envelope::new(b.build().unwrap())
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Reads `r` to its end or first error, in reads of `buf_len` bytes;
/// checks that a failed reader keeps failing.
fn drain<R: Read>(mut r: R, buf_len: usize) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; buf_len];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                assert!(
                    r.read(&mut buf).is_err(),
                    "a failed reader must keep failing"
                );
                return Err(Error::from(e));
            }
        }
    }
}

fn streaming(m: &[u8], dek: &Dek, ctx: &EncryptionContext, ad: &[u8]) -> Result<Vec<u8>, Error> {
    let mut r = m;
    let h = Header::read_from(&mut r)?;
    drain(OpeningKey::new(dek, &h)?.decryptor_with(r, ctx, ad)?, 4096)
}

fn seeking(m: &[u8], dek: &Dek, ctx: &EncryptionContext, ad: &[u8]) -> Result<Vec<u8>, Error> {
    let mut cur = Cursor::new(m);
    let h = Header::read_from(&mut cur)?;
    drain(
        OpeningKey::new(dek, &h)?.seekable_decryptor_with(cur, ctx, ad)?,
        5000,
    )
}

fn engine(
    m: &[u8],
    dek: &Dek,
    ctx: &EncryptionContext,
    ad: &[u8],
    threads: usize,
) -> Result<Vec<u8>, Error> {
    let mut r = m;
    let h = Header::read_from(&mut r)?;
    let key = OpeningKey::new(dek, &h)?;
    let mut out = Vec::new();
    let options = FileOptions::new().threads(threads).associated_data(ad);
    file::decrypt_with_key(&key, r, &mut out, ctx, &options)?;
    Ok(out)
}

fn decrypt_file(
    env: &Envelope,
    m: &[u8],
    ctx: &EncryptionContext,
    ad: &[u8],
) -> Result<Vec<u8>, Error> {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.phi"), dir.path().join("out"));
    std::fs::write(&input, m).unwrap();
    let options = FileOptions::new().threads(2).associated_data(ad);
    let r = block_on(env.decrypt_file(&input, &output, ctx, &options));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    match r {
        Ok(_) => Ok(std::fs::read(&output).unwrap()),
        Err(e) => {
            assert_eq!(left, [Path::new("in.phi").as_os_str()], "{e:?} left files");
            Err(e)
        }
    }
}

#[cfg(feature = "tokio")]
fn async_reader(
    env: &Envelope,
    m: &[u8],
    ctx: &EncryptionContext,
    ad: &[u8],
) -> Result<Vec<u8>, Error> {
    use tokio::io::AsyncReadExt;
    block_on(async {
        let mut r = env.async_decryptor_with(m, ctx, ad).await?;
        let mut out = Vec::new();
        match r.read_to_end(&mut out).await {
            Ok(_) => Ok(out),
            Err(e) => Err(Error::from(e)),
        }
    })
}

/// The providers a header names, for [`envelope_for`].
pub fn provider_ids(m: &[u8]) -> Vec<String> {
    let mut ids: Vec<String> = match Header::parse(m) {
        Ok((h, _)) => h.recipients().iter().map(|r| r.provider.clone()).collect(),
        Err(_) => vec!["local".into()],
    };
    ids.sort();
    ids.dedup();
    ids
}

/// Every decoder on `m`, named.
pub fn open_every_way(
    m: &[u8],
    dek: &[u8],
    ctx: &EncryptionContext,
) -> Vec<(&'static str, Result<Vec<u8>, Error>)> {
    let ids = provider_ids(m);
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    open_every_way_with(m, dek, ctx, &ids, true)
}

/// Every decoder on `m`, named, each given the associated data `ad`.
pub fn open_every_way_ad(
    m: &[u8],
    dek: &[u8],
    ctx: &EncryptionContext,
    ad: &[u8],
) -> Vec<(&'static str, Result<Vec<u8>, Error>)> {
    let ids = provider_ids(m);
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    open_every_way_with_ad(m, dek, ctx, ad, &ids, true)
}

/// Every decoder on `m`: those that go through a keyring hold a provider
/// for each id in `providers` (each answers with `dek`); those given the
/// DEK directly run only when `with_dek` is set.
pub fn open_every_way_with(
    m: &[u8],
    dek: &[u8],
    ctx: &EncryptionContext,
    providers: &[&str],
    with_dek: bool,
) -> Vec<(&'static str, Result<Vec<u8>, Error>)> {
    open_every_way_with_ad(m, dek, ctx, &[], providers, with_dek)
}

/// [`open_every_way_with`], every decoder given the associated data `ad`
/// (the `_with` forms; empty `ad` is none).
pub fn open_every_way_with_ad(
    m: &[u8],
    dek: &[u8],
    ctx: &EncryptionContext,
    ad: &[u8],
    providers: &[&str],
    with_dek: bool,
) -> Vec<(&'static str, Result<Vec<u8>, Error>)> {
    let env = envelope_for(dek, providers);
    let d = Dek::from_slice(dek).unwrap();
    let mut out = Vec::new();
    if with_dek {
        out.extend([
            ("message::open_with", message::open_with(m, &d, ctx, ad)),
            ("Decryptor", streaming(m, &d, ctx, ad)),
            ("SeekableDecryptor", seeking(m, &d, ctx, ad)),
            ("decrypt_with_key/1", engine(m, &d, ctx, ad, 1)),
            ("decrypt_with_key/3", engine(m, &d, ctx, ad, 3)),
        ]);
    }
    out.extend([
        ("Envelope::open_with", block_on(env.open_with(m, ctx, ad))),
        (
            "Envelope::decryptor_with",
            block_on(env.decryptor_with(m, ctx, ad)).and_then(|r| drain(r, 1000)),
        ),
        (
            "Envelope::seekable_decryptor_with",
            block_on(env.seekable_decryptor_with(Cursor::new(m), ctx, ad))
                .and_then(|r| drain(r, 3000)),
        ),
        ("Envelope::decrypt_file", decrypt_file(&env, m, ctx, ad)),
    ]);
    #[cfg(feature = "tokio")]
    out.push(("AsyncDecryptor", async_reader(&env, m, ctx, ad)));
    if ad.is_empty() {
        // The forms without associated data, which must be the same.
        if with_dek {
            out.push(("message::open", message::open(m, &d, ctx)));
        }
        out.push(("Envelope::open", block_on(env.open(m, ctx))));
    }
    out
}

/// The error's kind as FORMAT.md section 8 names it: the variant, with
/// the value for `UnsupportedVersion(v)` and `UnsupportedSuite(s)`.
pub fn kind(e: &Error) -> String {
    let d = format!("{e:?}");
    match e {
        Error::UnsupportedVersion(_) | Error::UnsupportedSuite(_) => d,
        _ => d
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

/// Asserts that every decoder fails on `m` with the error kind `want`.
pub fn assert_every_decoder_fails(
    m: &[u8],
    dek: &[u8],
    ctx: &EncryptionContext,
    want: &str,
    what: &str,
) {
    let wrong: Vec<String> = open_every_way(m, dek, ctx)
        .into_iter()
        .filter_map(|(name, r)| match r {
            Ok(pt) => Some(format!("{name} opened it ({} bytes)", pt.len())),
            Err(e) if kind(&e) != want => Some(format!("{name} gave {e:?}")),
            Err(_) => None,
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{what}: want {want}, but {}",
        wrong.join("; ")
    );
}
