//! The commands that exist only for object storage (`backup ls`), and the
//! object-storage half of `backup rewrap`. Without the `s3` feature they
//! refuse `s3://` paths with a usage error.

use std::path::Path;

#[cfg(feature = "s3")]
use phi_envelope::{EncryptionContext, Envelope, Header};

#[cfg(feature = "s3")]
use crate::connect::Keys;
#[cfg(feature = "s3")]
use crate::output::{human_bytes, json_str};
use crate::CliError;

/// `backup ls s3://BUCKET/PREFIX`: every object under the prefix, with its
/// size and, for backups, the keys and key versions its header wraps the
/// data key to (read with a ranged GET of the header; no key is used).
/// Objects that are not backups are listed as such.
#[cfg(feature = "s3")]
pub fn ls(prefix: &Path, json: bool) -> Result<(), CliError> {
    let Some(loc) = crate::s3::parse(prefix, true) else {
        return Err(CliError::usage(format!(
            "{}: ls lists object storage: give s3://BUCKET/PREFIX",
            prefix.display()
        )));
    };
    let loc = loc?;
    let store = crate::s3::Store::connect()?;
    let objects = store.list(&loc)?;
    let mut items = Vec::new();
    for (key, size) in &objects {
        let here = crate::s3::Location {
            bucket: loc.bucket.clone(),
            key: key.clone(),
        };
        let h = if *size == 0 {
            Err("empty".to_owned())
        } else {
            store
                .header(&here)
                .map(|(h, _, _)| h)
                .map_err(|e| e.message.clone())
        };
        if json {
            items.push(match &h {
                Ok(h) => {
                    let recips: Vec<String> = h
                        .recipients()
                        .iter()
                        .map(|r| {
                            format!(
                                "{{\"provider\":{},\"key_ref\":{},\"key_version\":{}}}",
                                json_str(&r.provider),
                                json_str(&r.key_ref),
                                r.key_version
                            )
                        })
                        .collect();
                    format!(
                        "{{\"url\":{},\"key\":{},\"size\":{size},\"backup\":true,\"format_version\":{},\"header_bytes\":{},\"recipients\":[{}]}}",
                        json_str(&here.to_string()),
                        json_str(key),
                        h.version(),
                        h.len(),
                        recips.join(",")
                    )
                }
                Err(e) => format!(
                    "{{\"url\":{},\"key\":{},\"size\":{size},\"backup\":false,\"error\":{}}}",
                    json_str(&here.to_string()),
                    json_str(key),
                    json_str(e)
                ),
            });
        } else {
            match &h {
                Ok(h) => println!(
                    "{here}  {size} bytes ({})  keys {}",
                    human_bytes(*size),
                    crate::commands::wrapped_to(h).join(", ")
                ),
                Err(_) => println!("{here}  {size} bytes  not a backup"),
            }
        }
    }
    if json {
        println!(
            "{{\"prefix\":{},\"objects\":[{}]}}",
            json_str(&loc.to_string()),
            items.join(",")
        );
    } else {
        let backups = objects.len();
        println!("{backups} object(s)");
    }
    Ok(())
}

/// Without the `s3` feature: a usage error.
#[cfg(not(feature = "s3"))]
pub fn ls(prefix: &Path, _json: bool) -> Result<(), CliError> {
    crate::commands::no_s3(prefix)?;
    Err(CliError::usage(format!(
        "{}: ls lists object storage: give s3://BUCKET/PREFIX (and a build with --features s3)",
        prefix.display()
    )))
}

/// What a rewrap of an object did.
#[cfg(feature = "s3")]
pub struct Rewrapped {
    pub changed: bool,
    pub new_header: Header,
}

/// Rewraps the backup at `path` (an `s3://` URL whose header is
/// `old`): unchanged when it is already wrapped, in order, to the
/// envelope's recipients at their primary versions; else a new header
/// (checked by the library: every entry unwraps to the data key that
/// verifies its tag) and the body copied inside the store, replacing the
/// object atomically (see [`crate::s3::Store::rewrap`]).
#[cfg(feature = "s3")]
pub fn rewrap_object(
    keys: &Keys,
    envelope: &Envelope,
    path: &Path,
    ctx: &EncryptionContext,
) -> Result<Rewrapped, CliError> {
    let loc = crate::s3::parse(path, false).expect("an s3 path")?;
    let store = crate::s3::Store::connect()?;
    let (old, size, etag) = store.header(&loc)?;
    let shown = crate::s3::loc_path(&loc);
    if is_current(keys, envelope, &old) {
        return Ok(Rewrapped {
            changed: false,
            new_header: old,
        });
    }
    let new_header = keys
        .block_on(envelope.rewrap_header(&old, ctx))
        .map_err(|e| CliError::from_lib(e, &shown))?;
    store.rewrap(&loc, size, &etag, old.len() as u64, new_header.as_bytes())?;
    Ok(Rewrapped {
        changed: true,
        new_header,
    })
}

/// True when `h` names exactly the envelope's recipients, in order, by the
/// same text and at their primary versions.
#[cfg(feature = "s3")]
fn is_current(keys: &Keys, envelope: &Envelope, h: &Header) -> bool {
    let want = envelope.recipients();
    if h.recipients().len() != want.len() {
        return false;
    }
    let caller = keys.manager("backup-rewrap");
    h.recipients().iter().zip(want).all(|(entry, key)| {
        entry.key_ref == key.as_str()
            && keys
                .block_on(envelope.keyring().describe(key, &caller))
                .ok()
                .and_then(|i| i.primary_version)
                == Some(entry.key_version)
    })
}
