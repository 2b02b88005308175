//! Rewrap without re-encrypting data: files (atomically) and batches of
//! records.
//!
//! A rewrap unwraps a message's DEK once, wraps it to the envelope's
//! recipients (the current primary versions of their keys, or a new
//! recipient set through [`Envelope::to_recipients`]) and re-tags the
//! header; the body is copied byte for byte. The encryption context is
//! required: providers bind it to the wrapped key, and the body is bound to
//! it. Associated data
//! ([`Envelope::seal_with`](crate::Envelope::seal_with)) binds only the
//! body, which a rewrap copies unread: records rewrap without it. A file
//! rewrap checks the rewritten body before it replaces the original, so a
//! file sealed with associated data is rewrapped with
//! [`Envelope::rewrap_file_with`], given it. The rewrapped message has only
//! the new wrapped-key entries: once the old key version is destroyed, a copy of the old message (a header kept
//! from before the rewrap) no longer opens, while the rewrapped one does.
//!
//! Every rewrap re-encrypts only what is known to hold the message's DEK:
//! the DEK itself (wrapped again by each new recipient's provider) or, where
//! a provider re-encrypts inside itself (AWS KMS ReEncrypt), the one entry
//! whose DEK verified the header tag, never merely the first entry of that
//! provider. Before a new header is returned it is checked without any
//! provider call: it reads back as built, has one entry per recipient, and
//! its tag verifies under the DEK that verified the old header. A message
//! that opened before a rewrap opens after it, or the rewrap fails and
//! nothing changes.
//!
//! - [`Envelope::rewrap`] and [`Envelope::rewrap_header`]: one record or
//!   one header in memory, always rewrapped (also when already current).
//! - [`Envelope::rewrap_batch`]: many records, with bounded concurrency and
//!   a [`RecordRewrap`] per record: unchanged, rewrapped or failed. Records
//!   already wrapped to the current primaries are reported unchanged with
//!   no provider call. Records that share a header (sealed through the
//!   data-key cache) and a context are unwrapped and wrapped once.
//! - [`Envelope::rewrap_file`]: one file, in place, atomically: the new
//!   header and the old body are written to a temporary file beside it,
//!   which is checked (every new entry unwraps, the header tag, the body's
//!   key commitment under the context and its final chunk), fsynced and
//!   renamed over the original, and the directory fsynced. At every instant
//!   the path holds either the complete old file or the complete new one; a
//!   failure at any step (provider down, disk full, crash) leaves the old
//!   file as it was. A file already wrapped to the current primaries is
//!   left untouched.
//!
//! Why one file of this size: rewrap of records, batches and files (one
//! pass, verified before commit) and its documentation; its tests are the
//! remainder.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::future::{poll_fn, Future};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;

use crate::atomic::AtomicFile;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::format::{EncryptionContext, Header};
use crate::message::OpeningKey;
use crate::provider::ProviderError;

/// How many distinct headers [`Envelope::rewrap_batch`] rewraps at once.
pub const DEFAULT_BATCH_CONCURRENCY: usize = 16;

/// What [`Envelope::rewrap_batch`] did with one record.
#[derive(Debug)]
#[non_exhaustive]
pub enum RecordRewrap {
    /// The record is already wrapped, in order, to exactly the envelope's
    /// recipients at their current primary versions: it was left as it is
    /// (keep the bytes you passed in). No key was used: no provider call, no
    /// policy check, no event, and so no check of the context either.
    Unchanged,
    /// The rewrapped record: the new header, then the old body byte for
    /// byte. Store it in place of the old one.
    Rewrapped(Vec<u8>),
    /// The record could not be rewrapped (malformed, wrong context, key
    /// destroyed, provider down, policy denial). Nothing was changed: the
    /// bytes you passed in are as valid, or invalid, as before.
    Failed(Error),
}

impl RecordRewrap {
    /// True for [`Unchanged`](Self::Unchanged).
    pub fn is_unchanged(&self) -> bool {
        matches!(self, RecordRewrap::Unchanged)
    }

    /// True for [`Rewrapped`](Self::Rewrapped).
    pub fn is_rewrapped(&self) -> bool {
        matches!(self, RecordRewrap::Rewrapped(_))
    }

    /// The new record, when it was rewrapped.
    pub fn rewrapped(&self) -> Option<&[u8]> {
        match self {
            RecordRewrap::Rewrapped(m) => Some(m),
            _ => None,
        }
    }

    /// The error, when it failed.
    pub fn error(&self) -> Option<&Error> {
        match self {
            RecordRewrap::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// `Ok(None)` when unchanged, `Ok(Some(new record))` when rewrapped,
    /// the error when it failed.
    pub fn into_result(self) -> Result<Option<Vec<u8>>> {
        match self {
            RecordRewrap::Unchanged => Ok(None),
            RecordRewrap::Rewrapped(m) => Ok(Some(m)),
            RecordRewrap::Failed(e) => Err(e),
        }
    }
}

/// What [`Envelope::rewrap_file`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RewrapFileReport {
    /// The file.
    pub path: PathBuf,
    /// False when the file was already wrapped to the current primary
    /// versions of the recipients and was left untouched.
    pub changed: bool,
    /// The header before.
    pub old_header: Header,
    /// The header now (the old one when nothing changed).
    pub new_header: Header,
    /// Length of the body, copied byte for byte.
    pub body_len: u64,
}

/// A file rewrap whose provider work is done (old DEK unwrapped, wrapped to
/// the new recipients, new header verified), ready to be written with
/// [`commit`](Self::commit).
///
/// [`Envelope::rewrap_file`] is `prepare_rewrap_file` followed by `commit`.
/// The split lets an async service run the blocking file copy off its
/// executor:
///
/// ```
/// # async fn demo(envelope: phi_envelope::Envelope, ctx: phi_envelope::EncryptionContext) -> phi_envelope::Result<()> {
/// let prepared = envelope.prepare_rewrap_file("backup-2026-11-25.phi", &ctx).await?;
/// // e.g. tokio::task::spawn_blocking(move || prepared.commit())
/// let report = prepared.commit()?;
/// # let _ = report; Ok(()) }
/// ```
pub struct PreparedFileRewrap {
    path: PathBuf,
    context: EncryptionContext,
    /// The associated data the body is checked under (empty: none).
    associated_data: Vec<u8>,
    old_header: Header,
    /// `None` when the file is already current.
    new: Option<(Header, OpeningKey)>,
    file_len: u64,
    body_len: u64,
}

impl fmt::Debug for PreparedFileRewrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the context or the associated data: they can be PHI.
        f.debug_struct("PreparedFileRewrap")
            .field("path", &self.path)
            .field("old_header", &self.old_header)
            .field("new_header", &self.new.as_ref().map(|(h, _)| h))
            .field("body_len", &self.body_len)
            .finish_non_exhaustive()
    }
}

impl PreparedFileRewrap {
    /// True when the file is already wrapped to the current primaries and
    /// [`commit`](Self::commit) will not touch it.
    pub fn is_current(&self) -> bool {
        self.new.is_none()
    }

    /// The header the file will have.
    pub fn new_header(&self) -> &Header {
        self.new.as_ref().map_or(&self.old_header, |(h, _)| h)
    }

    /// Writes the new header and the old body to a temporary file beside
    /// the original, checks it, fsyncs it and renames it over the original
    /// (then fsyncs the directory). Blocking file I/O. On any error the
    /// original is untouched and the temporary file removed. Refused if the
    /// file changed since it was prepared.
    pub fn commit(self) -> Result<RewrapFileReport> {
        let Some((new_header, key)) = self.new else {
            return Ok(RewrapFileReport {
                path: self.path,
                changed: false,
                new_header: self.old_header.clone(),
                old_header: self.old_header,
                body_len: self.body_len,
            });
        };
        let mut src = File::open(&self.path)?;
        let meta = src.metadata()?;
        let on_disk = Header::read_from(&mut src)?;
        if meta.len() != self.file_len || on_disk.as_bytes() != self.old_header.as_bytes() {
            return Err(changed_meanwhile(&self.path));
        }
        let mut out = AtomicFile::create(&self.path, true)?;
        out.write_all(new_header.as_bytes())?;
        let copied = io::copy(&mut (&mut src).take(self.body_len), out.file())?;
        if copied != self.body_len || src.metadata()?.len() != self.file_len {
            return Err(changed_meanwhile(&self.path));
        }
        out.flush()?;
        out.file().sync_all()?;
        // Check what was written before it replaces the original: the
        // header as built, and the body's commitment (which binds the
        // context) and final chunk under the DEK.
        {
            let mut check = File::open(out.temp_path())?;
            let written = Header::read_from(&mut check)?;
            if written.as_bytes() != new_header.as_bytes() {
                return Err(Error::Io(io::Error::other(format!(
                    "{}: the rewrapped copy does not read back as written; the original is untouched",
                    self.path.display()
                ))));
            }
            let body = key.seekable_decryptor_with(check, &self.context, &self.associated_data)?;
            let expected = crate::cobblestone::plaintext_len(self.body_len)?;
            if body.plaintext_len() != expected {
                return Err(changed_meanwhile(&self.path));
            }
        }
        fs::set_permissions(out.temp_path(), meta.permissions())?;
        out.commit()?;
        Ok(RewrapFileReport {
            path: self.path,
            changed: true,
            old_header: self.old_header,
            new_header,
            body_len: self.body_len,
        })
    }
}

fn changed_meanwhile(path: &Path) -> Error {
    Error::Io(io::Error::other(format!(
        "{} changed while it was being rewrapped; nothing was written, run the rewrap again",
        path.display()
    )))
}

impl Envelope {
    /// Rewraps an encrypted file in place to this envelope's recipients
    /// (the current primary versions of their keys), atomically: see the
    /// [module documentation](crate::rewrap). The body is copied, never
    /// decrypted; `context` must be the one the file was sealed under.
    ///
    /// The provider calls are async; the copy is blocking file I/O done
    /// inside this future. In a latency-sensitive async service use
    /// [`prepare_rewrap_file`](Self::prepare_rewrap_file) and run
    /// [`PreparedFileRewrap::commit`] on a blocking thread.
    ///
    /// A symlink is refused (rewrap the file it points to); other hard links
    /// to the file keep the old contents.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// use std::sync::Arc;
    /// use phi_envelope::provider::local::LocalKeystore;
    /// use phi_envelope::{Caller, EncryptionContext, Envelope, KeyRef, Keyring};
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let key: KeyRef = "local:backups".parse()?;
    /// store.add_key(&key)?;
    /// let envelope = Envelope::new(
    ///     Keyring::builder().provider(Arc::new(store)).recipient(key.clone()).build()?,
    /// );
    /// let ctx = EncryptionContext::new().with("backup", "2026-11-25")?;
    /// let path = dir.path().join("backup.phi");
    /// std::fs::write(&path, envelope.seal(b"nightly dump", &ctx).await?).unwrap();
    ///
    /// envelope.keyring().rotate(&key, &Caller::new("alice", "rotation")).await?;
    /// let report = envelope.rewrap_file(&path, &ctx).await?;
    /// assert!(report.changed);
    /// assert_eq!(report.new_header.recipients()[0].key_version, 2);
    /// // Run again: already current, not rewritten.
    /// assert!(!envelope.rewrap_file(&path, &ctx).await?.changed);
    /// let sealed = std::fs::read(&path).unwrap();
    /// assert_eq!(envelope.open(&sealed, &ctx).await?, b"nightly dump");
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn rewrap_file(
        &self,
        path: impl AsRef<Path>,
        context: &EncryptionContext,
    ) -> Result<RewrapFileReport> {
        self.prepare_rewrap_file(path, context).await?.commit()
    }

    /// [`rewrap_file`](Self::rewrap_file) for a file whose body is bound to
    /// associated data (sealed with
    /// [`FileOptions::associated_data`](crate::file::FileOptions::associated_data)).
    ///
    /// The providers never need the associated data, but the check of the
    /// rewritten copy before it replaces the original opens the body's
    /// commitment and final chunk, which bind it. Without it (or with
    /// other associated data) such a file's rewrap fails with the opaque
    /// [`Error::Decrypt`] and the file is left as it was. Records in memory
    /// ([`rewrap`](Self::rewrap), [`rewrap_batch`](Self::rewrap_batch))
    /// need no associated data.
    pub async fn rewrap_file_with(
        &self,
        path: impl AsRef<Path>,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<RewrapFileReport> {
        self.prepare_rewrap_file_with(path, context, ad)
            .await?
            .commit()
    }

    /// The provider half of [`rewrap_file`](Self::rewrap_file): reads the
    /// header, rewraps it and verifies that every new entry unwraps to the
    /// DEK that verifies the new header tag. Nothing is written.
    pub async fn prepare_rewrap_file(
        &self,
        path: impl AsRef<Path>,
        context: &EncryptionContext,
    ) -> Result<PreparedFileRewrap> {
        self.prepare_rewrap_file_with(path, context, &[]).await
    }

    /// [`prepare_rewrap_file`](Self::prepare_rewrap_file) for a file whose
    /// body is bound to associated data; see
    /// [`rewrap_file_with`](Self::rewrap_file_with).
    pub async fn prepare_rewrap_file_with(
        &self,
        path: impl AsRef<Path>,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<PreparedFileRewrap> {
        crate::format::check_associated_data(ad)?;
        let path = path.as_ref().to_path_buf();
        let meta = fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            return Err(Error::InvalidArgument(format!(
                "{} is a symbolic link; rewrap the file it points to",
                path.display()
            )));
        }
        if !meta.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let mut file = File::open(&path)?;
        let old_header = Header::read_from(&mut file)?;
        let file_len = file.metadata()?.len();
        drop(file);
        let body_len = file_len
            .checked_sub(old_header.len() as u64)
            .ok_or(Error::Truncated)?;
        // A body that cannot be valid is refused before any provider call.
        crate::cobblestone::plaintext_len(body_len)?;

        let prepared = |new| PreparedFileRewrap {
            path: path.clone(),
            context: context.clone(),
            associated_data: ad.to_vec(),
            old_header: old_header.clone(),
            new,
            file_len,
            body_len,
        };
        if self.is_current(&old_header).await {
            return Ok(prepared(None));
        }
        let new_header = self.rewrap_header(&old_header, context).await?;
        let key = self
            .keyring()
            .verify_header(&new_header, context, self.caller())
            .await?;
        Ok(prepared(Some((new_header, key))))
    }

    /// True when `header` is wrapped, in order, to exactly this envelope's
    /// recipients at their current primary versions (from the keyring's
    /// describe cache; unknown counts as not current).
    async fn is_current(&self, header: &Header) -> bool {
        if header.recipients().len() != self.recipients().len() {
            return false;
        }
        let Some(primaries) = self.current_primaries().await else {
            return false;
        };
        self.keyring()
            .header_is_current(header, self.recipients(), &primaries)
            .await
    }

    /// The current primary version of every recipient, from the keyring's
    /// describe cache (a describe per recipient when it has none); `None`
    /// when one is unknown.
    async fn current_primaries(&self) -> Option<Vec<u32>> {
        self.keyring()
            .primary_versions(self.recipients(), self.caller())
            .await
    }

    /// Rewraps many records in memory, at most
    /// [`DEFAULT_BATCH_CONCURRENCY`] distinct headers at once; see
    /// [`rewrap_batch_with`](Self::rewrap_batch_with).
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::{Caller, EncryptionContext, Envelope, KeyRef, Keyring};
    /// use phi_envelope::rewrap::RecordRewrap;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// # let key: KeyRef = "local:records".parse()?;
    /// # store.add_key(&key)?;
    /// # let envelope = Envelope::new(Keyring::builder().provider(Arc::new(store)).recipient(key.clone()).build()?)
    /// #     .as_caller("migration-job", "rewrap");
    /// let contexts: Vec<EncryptionContext> = (0..3)
    ///     .map(|i| EncryptionContext::new().with("record_id", i.to_string()))
    ///     .collect::<Result<_, _>>()?;
    /// let mut sealed = Vec::new();
    /// for c in &contexts[..2] {
    ///     sealed.push(envelope.seal(b"chart note", c).await?);
    /// }
    /// envelope.keyring().rotate(&key, &Caller::new("alice", "rotation")).await?;
    /// sealed.push(envelope.seal(b"chart note", &contexts[2]).await?); // already current
    ///
    /// let items: Vec<(&[u8], &EncryptionContext)> =
    ///     sealed.iter().map(|m| m.as_slice()).zip(&contexts).collect();
    /// let report = envelope.rewrap_batch(&items).await; // one per record, in order
    /// assert_eq!(report.iter().filter(|r| r.is_rewrapped()).count(), 2);
    /// assert!(report[2].is_unchanged()); // no provider call for it
    /// for ((record, c), stored) in report.into_iter().zip(&contexts).zip(&mut sealed) {
    ///     match record {
    ///         RecordRewrap::Rewrapped(new) => *stored = new,
    ///         RecordRewrap::Unchanged => {}
    ///         RecordRewrap::Failed(e) => return Err(e),
    ///         _ => {}
    ///     }
    ///     assert_eq!(envelope.open(stored, c).await?, b"chart note");
    /// }
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn rewrap_batch(&self, items: &[(&[u8], &EncryptionContext)]) -> Vec<RecordRewrap> {
        self.rewrap_batch_with(items, DEFAULT_BATCH_CONCURRENCY)
            .await
    }

    /// Rewraps many records in memory, with at most `max_in_flight`
    /// distinct headers being rewrapped at once (at least 1). Returns one
    /// [`RecordRewrap`] per item, in order: a record that fails (wrong
    /// context, key destroyed, malformed) does not stop the others.
    ///
    /// A record already wrapped, in order, to exactly this envelope's
    /// recipients at their current primary versions is
    /// [`Unchanged`](RecordRewrap::Unchanged) and costs no provider call.
    /// The primary versions come from the keyring's describe cache (the
    /// lifecycle verbs of the same keyring refresh it; a rotation made
    /// elsewhere is seen within the keyring's
    /// [describe TTL](crate::keyring::KeyringBuilder::describe_ttl)); when
    /// one is unknown, one describe per recipient is made for the whole
    /// batch.
    ///
    /// Each other distinct (header, context) pair costs one unwrap and one
    /// wrap (or provider-side re-encryption) per recipient; records sealed
    /// through the data-key cache share a header, so their whole group costs
    /// that once (each record still gets a policy check and a `rewrap`
    /// event).
    pub async fn rewrap_batch_with(
        &self,
        items: &[(&[u8], &EncryptionContext)],
        max_in_flight: usize,
    ) -> Vec<RecordRewrap> {
        struct Group<'a> {
            header: Header,
            context: &'a EncryptionContext,
            /// (item index, old header length)
            members: Vec<(usize, usize)>,
        }
        let mut results: Vec<Option<RecordRewrap>> = (0..items.len()).map(|_| None).collect();
        let mut groups: Vec<Group<'_>> = Vec::new();
        let mut by_key: HashMap<(Vec<u8>, Vec<u8>), usize> = HashMap::new();
        for (i, (message, context)) in items.iter().enumerate() {
            let parsed = Header::parse(message).and_then(|(h, used)| {
                crate::cobblestone::plaintext_len((message.len() - used) as u64)?;
                Ok((h, used))
            });
            match parsed {
                Err(e) => results[i] = Some(RecordRewrap::Failed(e)),
                Ok((header, used)) => {
                    let key = (header.as_bytes().to_vec(), context.canonical_pairs());
                    let g = *by_key.entry(key).or_insert_with(|| {
                        groups.push(Group {
                            header,
                            context,
                            members: Vec::new(),
                        });
                        groups.len() - 1
                    });
                    groups[g].members.push((i, used));
                }
            }
        }
        // Records already current are left alone: no key is used for them.
        let could_be_current = groups
            .iter()
            .any(|g| g.header.recipients().len() == self.recipients().len());
        let primaries = if could_be_current {
            self.current_primaries().await
        } else {
            None
        };
        let mut current = Vec::with_capacity(groups.len());
        for g in &groups {
            current.push(match &primaries {
                Some(p) => {
                    self.keyring()
                        .header_is_current(&g.header, self.recipients(), p)
                        .await
                }
                None => false,
            });
        }
        let mut current = current.into_iter();
        groups.retain(|g| {
            if current.next().unwrap_or(false) {
                for &(i, _) in &g.members {
                    results[i] = Some(RecordRewrap::Unchanged);
                }
                false
            } else {
                true
            }
        });
        let work: Vec<_> = groups
            .iter()
            .map(|g| self.rewrap_header(&g.header, g.context))
            .collect();
        let outcomes = run_bounded(work, max_in_flight.max(1)).await;
        for (g, outcome) in groups.iter().zip(outcomes) {
            match outcome {
                Ok(new) => {
                    for (k, &(i, used)) in g.members.iter().enumerate() {
                        if k > 0 {
                            if let Err(e) = self
                                .keyring()
                                .record_rewrap_reuse(&new, g.context, self.caller())
                                .await
                            {
                                results[i] = Some(RecordRewrap::Failed(e));
                                continue;
                            }
                        }
                        let body = &items[i].0[used..];
                        let mut out = Vec::with_capacity(new.len() + body.len());
                        out.extend_from_slice(new.as_bytes());
                        out.extend_from_slice(body);
                        results[i] = Some(RecordRewrap::Rewrapped(out));
                    }
                }
                Err(e) => {
                    for &(i, _) in &g.members[1..] {
                        results[i] = Some(RecordRewrap::Failed(duplicate(&e)));
                    }
                    results[g.members[0].0] = Some(RecordRewrap::Failed(e));
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every item has a result"))
            .collect()
    }
}

/// Runs `futures` with at most `limit` in progress at once, on the calling
/// task (no spawning, no runtime needed); outputs in input order.
async fn run_bounded<F: Future>(futures: Vec<F>, limit: usize) -> Vec<F::Output> {
    let n = futures.len();
    let mut waiting = futures.into_iter().enumerate();
    let mut running: Vec<(usize, Pin<Box<F>>)> = Vec::new();
    let mut out: Vec<Option<F::Output>> = (0..n).map(|_| None).collect();
    poll_fn(move |cx| loop {
        while running.len() < limit {
            match waiting.next() {
                Some((i, f)) => running.push((i, Box::pin(f))),
                None => break,
            }
        }
        if running.is_empty() {
            // Nothing running and nothing left to start.
            return Poll::Ready(
                std::mem::take(&mut out)
                    .into_iter()
                    .map(|o| o.expect("every future ran to completion"))
                    .collect(),
            );
        }
        let mut finished = false;
        let mut k = 0;
        while k < running.len() {
            if let Poll::Ready(v) = running[k].1.as_mut().poll(cx) {
                let (i, _) = running.swap_remove(k);
                out[i] = Some(v);
                finished = true;
            } else {
                k += 1;
            }
        }
        // Something finished: start the next ones and poll them now, so
        // that they register their wakers.
        if !finished {
            return Poll::Pending;
        }
    })
    .await
}

/// The same error again, for every record of a batch group that failed
/// together (the source chain is not kept).
fn duplicate(e: &Error) -> Error {
    match e {
        Error::Decrypt => Error::Decrypt,
        Error::Provider(p) => ProviderError::new(p.provider(), p.kind(), p.message()).into(),
        Error::PolicyDenied(s) => Error::PolicyDenied(s.clone()),
        Error::Audit(s) => Error::Audit(s.clone()),
        Error::KeyLifecycle(s) => Error::KeyLifecycle(s.clone()),
        Error::NoMatchingKey(s) => Error::NoMatchingKey(s.clone()),
        Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
        Error::Malformed(s) => Error::Malformed(s),
        other => Error::Io(io::Error::other(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A future that is pending `n` times, counting how many run at once.
    struct Step {
        left: usize,
        live: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
        started: bool,
        value: usize,
    }

    impl Future for Step {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<usize> {
            if !self.started {
                self.started = true;
                let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(now, Ordering::SeqCst);
            }
            if self.left == 0 {
                self.live.fetch_sub(1, Ordering::SeqCst);
                return Poll::Ready(self.value);
            }
            self.left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn bounded_concurrency_and_order() {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let futs: Vec<Step> = (0..20)
            .map(|i| Step {
                left: (i * 7) % 5,
                live: live.clone(),
                peak: peak.clone(),
                started: false,
                value: i,
            })
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = rt.block_on(run_bounded(futs, 3));
        assert_eq!(out, (0..20).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(peak.load(Ordering::SeqCst) >= 2);
        assert!(rt.block_on(run_bounded(Vec::<Step>::new(), 3)).is_empty());
        // Every running future finishing in the same pass, with more left.
        let ready: Vec<Step> = (0..10)
            .map(|i| Step {
                left: 0,
                live: live.clone(),
                peak: peak.clone(),
                started: false,
                value: i,
            })
            .collect();
        assert_eq!(
            rt.block_on(run_bounded(ready, 4)),
            (0..10).collect::<Vec<_>>()
        );
    }
}
