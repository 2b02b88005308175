//! Backups on object storage: `s3://BUCKET/KEY` wherever a backup path
//! is (docs/CLI.md, "Object storage").
//!
//! - [`Upload`]: the writer `encrypt` streams into. Ciphertext is cut into
//!   parts that are uploaded in parallel as a multipart upload (at most
//!   [`Tuning::parallel`] parts in flight, so memory is bounded by part
//!   size × (parallel + 1) whatever the size of the backup); the object
//!   appears only when the upload is completed, and dropping an upload
//!   that was not completed (any failure, an interrupt) aborts it, so
//!   that no object and no parts remain.
//! - [`Download`]: the reader `decrypt` and `verify` feed the engine with:
//!   ranged GETs, several in flight, yielded in order, each pinned to the
//!   ETag seen first (`If-Match`), so that an object replaced mid-read
//!   fails instead of mixing two backups. The engine authenticates every
//!   chunk before it releases it, as for a file.
//! - [`header`]: only the header's bytes (`inspect`, `ls`, and the checks
//!   before any key is touched).
//! - [`rewrap`]: a new header and the unchanged body, copied inside the
//!   store (`UploadPartCopy`), completed only if the object is still the
//!   one that was read.
//!
//! Endpoint, region and credentials come from the standard AWS
//! configuration (environment, profiles, `AWS_ENDPOINT_URL`). The SDK
//! retries throttling, 5xx answers and dropped connections with
//! exponential backoff (`AWS_MAX_ATTEMPTS`, `AWS_RETRY_MODE`); a body cut
//! mid-transfer is retried here, within the same budget.
//!
//! Why one file of this size: the multipart upload, the ranged download, the
//! rewrap by copy and their retries and aborts share one client and one error
//! mapping; splitting upload and download apart is the next step if it grows.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockMode,
};
use aws_sdk_s3::Client;
use aws_smithy_types::error::display::DisplayErrorContext;
use bytes::Bytes;
use phi_envelope::Header;

use crate::{exit, CliError};

/// `s3://BUCKET/KEY`: where a backup is in object storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    pub key: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// The `s3://` prefix of an object-storage path.
pub const SCHEME: &str = "s3://";

/// `Some` when `path` is an `s3://` URL: its bucket and key, or a usage
/// error. `allow_empty_key`: `ls` takes a prefix, which may be empty.
pub fn parse(path: &Path, allow_empty_key: bool) -> Option<Result<Location, CliError>> {
    let s = path.to_str()?;
    let rest = s.strip_prefix(SCHEME)?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let bad = |why: &str| {
        Some(Err(CliError::usage(format!(
            "{s}: {why} (the form is s3://BUCKET/KEY)"
        ))))
    };
    if bucket.is_empty() {
        return bad("no bucket");
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        || bucket.len() < 3
        || bucket.len() > 63
    {
        return bad("not a valid bucket name (3 to 63 of a-z, 0-9, '-' and '.')");
    }
    if key.is_empty() && !allow_empty_key {
        return bad("no object key");
    }
    if key.len() > 1024 {
        return bad("the object key is longer than 1024 bytes");
    }
    Some(Ok(Location {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
    }))
}

/// True when `path` is an `s3://` URL.
pub fn is_s3(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.starts_with(SCHEME))
}

/// Part size and parallelism (docs/PERFORMANCE.md, "Object storage").
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// The size of the first parts; doubled every [`PARTS_PER_SIZE`] parts
    /// so that a stream of unknown size never runs out of the 10 000 parts
    /// S3 allows.
    pub part_size: usize,
    /// Parts (upload) and ranges (download) in flight.
    pub parallel: usize,
}

/// The default part size: 16 MiB (see docs/PERFORMANCE.md).
pub const DEFAULT_PART_SIZE: usize = 16 << 20;
/// The default number of parts or ranges in flight.
pub const DEFAULT_PARALLEL: usize = 4;
/// S3's smallest part (all but the last).
const MIN_PART_SIZE: usize = 5 << 20;
/// S3's largest part.
const MAX_PART_SIZE: usize = 5 << 30;
/// S3's most parts in one upload.
const MAX_PARTS: i32 = 10_000;
/// Parts of one size before the size doubles.
pub const PARTS_PER_SIZE: i32 = 1_000;

impl Tuning {
    /// From `PHI_ENVELOPE_S3_PART_SIZE` (bytes, at least 5 MiB) and
    /// `PHI_ENVELOPE_S3_PARALLEL` (1 to 64), else the defaults.
    pub fn from_env() -> Result<Tuning, CliError> {
        let num = |name: &str, default: usize, lo: usize, hi: usize| match std::env::var(name) {
            Err(_) => Ok(default),
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) if (lo..=hi).contains(&n) => Ok(n),
                _ => Err(CliError::usage(format!(
                    "{name}={v:?}: expected a number from {lo} to {hi}"
                ))),
            },
        };
        Ok(Tuning {
            part_size: num(
                "PHI_ENVELOPE_S3_PART_SIZE",
                DEFAULT_PART_SIZE,
                MIN_PART_SIZE,
                MAX_PART_SIZE,
            )?,
            parallel: num("PHI_ENVELOPE_S3_PARALLEL", DEFAULT_PARALLEL, 1, 64)?,
        })
    }

    /// The size of part `n` (from 1).
    fn part_size(&self, n: i32) -> usize {
        let doublings = ((n - 1) / PARTS_PER_SIZE).clamp(0, 20) as u32;
        self.part_size
            .saturating_mul(1usize << doublings)
            .min(MAX_PART_SIZE)
    }
}

/// The runtime that drives the S3 calls: its own threads (the engine's
/// workers block on I/O, and the calls make progress meanwhile), never
/// dropped (a reader or writer may be dropped inside another runtime,
/// where dropping a runtime is not allowed).
static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();

fn runtime() -> Result<&'static tokio::runtime::Runtime, CliError> {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("s3")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| CliError::new(exit::IO, format!("cannot start the S3 runtime: {e}")))
}

/// A client from the standard AWS configuration.
pub struct Store {
    rt: &'static tokio::runtime::Runtime,
    client: Client,
    pub tuning: Tuning,
}

impl Store {
    /// A client from the standard AWS configuration.
    pub fn connect() -> Result<Store, CliError> {
        let tuning = Tuning::from_env()?;
        let rt = runtime()?;
        let client = wait_on(rt.handle(), "loading the AWS configuration", async {
            let shared = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let mut b = aws_sdk_s3::config::Builder::from(&shared);
            if std::env::var("AWS_S3_FORCE_PATH_STYLE").is_ok_and(|v| v == "true" || v == "1") {
                b = b.force_path_style(true);
            }
            Client::from_conf(b.build())
        })?;
        Ok(Store { rt, client, tuning })
    }

    /// Runs `f` on the store's runtime and waits for it from any thread
    /// (also one inside another runtime, where `block_on` would panic).
    fn wait<T: Send + 'static>(
        &self,
        what: &str,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, CliError> {
        wait_on(self.rt.handle(), what, f)
    }

    /// Size and ETag of an object; `None` when there is none.
    pub fn head(&self, loc: &Location) -> Result<Option<(u64, String)>, CliError> {
        let c = self.client.clone();
        let l = loc.clone();
        let r = self.wait(&format!("{loc}: HeadObject"), async move {
            c.head_object().bucket(&l.bucket).key(&l.key).send().await
        })?;
        match r {
            // Every read and replace is pinned to this ETag (If-Match): a
            // store that sends none would silently unpin them all.
            Ok(o) => match o.e_tag().filter(|t| !t.is_empty()) {
                Some(tag) => Ok(Some((
                    o.content_length().unwrap_or(0).max(0) as u64,
                    tag.to_owned(),
                ))),
                None => Err(CliError::new(
                    exit::IO,
                    format!(
                        "{loc}: the store sent no ETag, so reads cannot be pinned to one version of the object"
                    ),
                )),
            },
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(s3_error(loc, "HeadObject", &e)),
        }
    }

    /// The object's size and ETag, or "not found" (exit 4).
    pub fn stat(&self, loc: &Location) -> Result<(u64, String), CliError> {
        self.head(loc)?.ok_or_else(|| {
            CliError::new(
                exit::IO,
                format!("{loc}: not found (no such object, or no permission to read it)"),
            )
        })
    }

    /// Refuses an existing object without `--force` (exit 5), before any
    /// key is touched.
    pub fn refuse_existing(&self, loc: &Location, force: bool) -> Result<(), CliError> {
        if !force && self.head(loc)?.is_some() {
            return Err(exists(loc));
        }
        Ok(())
    }

    /// A reader of the whole object, in ranges, from `offset`.
    pub fn download(&self, loc: &Location, size: u64, etag: &str, range: usize) -> Download {
        Download {
            handle: self.rt.handle().clone(),
            client: self.client.clone(),
            loc: loc.clone(),
            etag: etag.to_owned(),
            size,
            next: 0,
            range: range.max(1),
            depth: self.tuning.parallel,
            queue: VecDeque::new(),
            current: Bytes::new(),
        }
    }

    /// The object's header (read with small ranged GETs: the header only),
    /// its size and its ETag.
    pub fn header(&self, loc: &Location) -> Result<(Header, u64, String), CliError> {
        let (size, etag) = self.stat(loc)?;
        if size == 0 {
            return Err(CliError::integrity(format!(
                "{loc} is empty: not a phi-envelope backup"
            )));
        }
        let mut r = self.download(loc, size, &etag, HEADER_RANGE);
        r.depth = 1;
        let h = Header::read_from(&mut r).map_err(|e| CliError::from_lib(e, &loc_path(loc)))?;
        Ok((h, size, etag))
    }

    /// A multipart upload to `loc`, started (CreateMultipartUpload) when
    /// its first part is ready: a command that fails before it has a part
    /// of ciphertext (a refused key, a provider down) leaves nothing in
    /// the store, even if it is killed.
    pub fn upload(&self, loc: &Location, o: UploadOptions) -> Result<Upload, CliError> {
        let (tx, rx) = mpsc::channel();
        Ok(Upload {
            handle: self.rt.handle().clone(),
            client: self.client.clone(),
            loc: loc.clone(),
            id: String::new(),
            tuning: self.tuning,
            force: o.force,
            retain: o.retain_until,
            if_match: None,
            buf: Vec::new(),
            next_part: 1,
            in_flight: 0,
            tx,
            rx,
            done: Vec::new(),
            failed: None,
            finished: false,
            bytes: 0,
            #[cfg(test)]
            panic_part: None,
        })
    }

    /// Every object under `prefix`: key and size, in key order.
    pub fn list(&self, loc: &Location) -> Result<Vec<(String, u64)>, CliError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let c = self.client.clone();
            let l = loc.clone();
            let t = token.clone();
            let r = self.wait(&format!("{loc}: ListObjectsV2"), async move {
                c.list_objects_v2()
                    .bucket(&l.bucket)
                    .prefix(&l.key)
                    .set_continuation_token(t)
                    .send()
                    .await
            })?;
            let page = r.map_err(|e| s3_error(loc, "ListObjectsV2", &e))?;
            for o in page.contents() {
                out.push((
                    o.key().unwrap_or_default().to_owned(),
                    o.size().unwrap_or(0).max(0) as u64,
                ));
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Replaces the object with `new_header` followed by the body of the
    /// object as it is (`old_header_len` bytes skipped), atomically: a
    /// multipart upload whose first part is the new header and the body's
    /// first bytes, and whose other parts are copied inside the store
    /// (`UploadPartCopy`, pinned to `etag`). Completed only if the object
    /// is still `etag` (`If-Match`) where the store supports it.
    pub fn rewrap(
        &self,
        loc: &Location,
        size: u64,
        etag: &str,
        old_header_len: u64,
        new_header: &[u8],
    ) -> Result<(), CliError> {
        let body = size.saturating_sub(old_header_len);
        // The first part must be at least 5 MiB unless it is the only one:
        // it carries the header and up to `first` bytes of the body.
        let first = (self.tuning.part_size as u64).min(body);
        let mut head = Vec::with_capacity(new_header.len() + first as usize);
        head.extend_from_slice(new_header);
        if first > 0 {
            let mut r = self.download(loc, size, etag, self.tuning.part_size);
            r.next = old_header_len;
            (&mut r)
                .take(first)
                .read_to_end(&mut head)
                .map_err(|e| io_error(loc, e))?;
            if (head.len() - new_header.len()) as u64 != first {
                return Err(CliError::integrity(format!(
                    "{loc} is shorter than it said: it changed while it was rewrapped"
                )));
            }
        }
        let mut up = self.upload(
            loc,
            UploadOptions {
                force: true,
                retain_until: None,
            },
        )?;
        up.if_match = Some(etag.to_owned());
        up.buf = head;
        up.send_part().map_err(|e| io_error(loc, e))?;
        let mut at = old_header_len + first;
        while at < size {
            let len = (self.tuning.part_size as u64 * 64).min(size - at);
            up.copy_part(etag, at, at + len - 1)?;
            at += len;
        }
        up.complete()
    }
}

/// How big the ranged GETs are that read a header (headers are a few
/// hundred bytes per recipient).
const HEADER_RANGE: usize = 64 << 10;

/// Options of a new upload.
pub struct UploadOptions {
    /// Replace an existing object (else the completion is conditional on
    /// there being none, `If-None-Match: *`).
    pub force: bool,
    /// Object-lock retention: mode and date.
    pub retain_until: Option<(ObjectLockMode, aws_smithy_types::DateTime)>,
}

/// Parses `--retain-until`: `YYYY-MM-DD` (midnight UTC) or an RFC 3339
/// date and time.
pub fn retain_until(
    date: &str,
    mode: &str,
) -> Result<(ObjectLockMode, aws_smithy_types::DateTime), CliError> {
    use aws_smithy_types::date_time::Format;
    let full = if date.len() == 10 {
        format!("{date}T00:00:00Z")
    } else {
        date.to_owned()
    };
    let t = aws_smithy_types::DateTime::from_str(&full, Format::DateTime).map_err(|_| {
        CliError::usage(format!(
            "--retain-until {date:?}: expected YYYY-MM-DD or an RFC 3339 time such as 2033-01-01T00:00:00Z"
        ))
    })?;
    let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now());
    if t.secs() <= now.secs() {
        return Err(CliError::usage(format!(
            "--retain-until {date}: the date is in the past"
        )));
    }
    let mode = match mode {
        "governance" => ObjectLockMode::Governance,
        "compliance" => ObjectLockMode::Compliance,
        m => {
            return Err(CliError::usage(format!(
                "--retain-mode {m:?}: expected governance or compliance"
            )))
        }
    };
    Ok((mode, t))
}

/// A path that shows the location in library errors.
pub fn loc_path(loc: &Location) -> std::path::PathBuf {
    std::path::PathBuf::from(loc.to_string())
}

fn exists(loc: &Location) -> CliError {
    CliError::new(
        exit::EXISTS,
        format!(
            "{loc} already exists; refusing to overwrite it (write to another name, or pass --force to replace it once the new one is complete)"
        ),
    )
}

/// The condition a request carried: what a `412 Precondition Failed`
/// answer to it means.
#[derive(Clone, Copy, Debug)]
enum Cond<'a> {
    /// None: a 412 is not expected, and is reported as the store said it.
    None,
    /// `If-None-Match: *` on the completion of a new object: an object
    /// appeared under the key while the backup was uploaded.
    Absent,
    /// `If-Match` (completion) or `x-amz-copy-source-if-match` (a copied
    /// part) on the ETag a rewrap read: the object was replaced since.
    Unchanged(&'a str),
}

/// [`s3_error`] for a request that carried `cond`: a 412 says what the
/// condition found and what the operator can do (each command's own
/// options: `--force` is encrypt's, a rewrap is run again).
fn s3_error_if<E: ProvideErrorMetadata + std::error::Error + 'static>(
    loc: &Location,
    op: &str,
    cond: Cond<'_>,
    e: &SdkError<E>,
) -> CliError {
    let refused = status(e) == Some(412) || e.code() == Some("PreconditionFailed");
    match cond {
        Cond::Absent if refused => CliError::new(
            exit::EXISTS,
            format!(
                "{loc} already exists: another writer created it while this backup was uploaded ({op} refused by the store: 412 Precondition Failed), and it was left as it is; this backup was not stored (its upload was aborted). Write it to another name, or pass --force to replace that object (see what it is first: `backup inspect {loc}`)"
            ),
        ),
        Cond::Unchanged(etag) if refused => CliError::new(
            exit::IO,
            format!(
                "{loc}: {op} refused by the store (412 Precondition Failed): the object changed while it was rewrapped (another writer replaced it; its ETag is no longer {etag}), and it was left as it is; the rewrap's upload was aborted. See what it is now (`backup inspect {loc}`) and run the rewrap again to rewrap it as it is now"
            ),
        ),
        _ => s3_error(loc, op, e),
    }
}

/// Runs `f` on the S3 runtime and waits for it from any thread (also one
/// inside another runtime, where `block_on` would panic). A task that
/// panicked is an error naming `what` (the call, and its object), never a
/// panic here ([`spawn_reporting`]).
fn wait_on<T: Send + 'static>(
    h: &tokio::runtime::Handle,
    what: &str,
    f: impl Future<Output = T> + Send + 'static,
) -> Result<T, CliError> {
    let (tx, rx) = mpsc::sync_channel(1);
    spawn_reporting(h, f, move |r| {
        let _ = tx.send(r);
    });
    rx.recv()
        .unwrap_or_else(|_| Err(STOPPED.to_owned()))
        .map_err(|why| CliError::new(exit::IO, format!("{what} failed: {why}")))
}

/// Why a task gave no answer: its runtime is gone (never dropped, so not
/// expected).
const STOPPED: &str = "the S3 runtime stopped";

/// Every task of the S3 runtime is spawned here: `f` runs as a task, and
/// `done` gets its output, or, when the task panicked (a bug, in this code
/// or in the SDK; never what an input or a store's answer should cause),
/// why, as an error to report like any failed call. So a waiter is always
/// answered: a panicked part of an upload is a failed part (the upload is
/// then aborted), not a part waited for forever, nor a panic in the
/// waiting thread. (The panic hook of `main` leaves panics on the runtime's
/// threads to these reports.)
fn spawn_reporting<T: Send + 'static>(
    h: &tokio::runtime::Handle,
    f: impl Future<Output = T> + Send + 'static,
    done: impl FnOnce(Result<T, String>) + Send + 'static,
) {
    let task = h.spawn(f);
    h.spawn(async move {
        done(task.await.map_err(|e| {
            if e.is_panic() {
                let p = e.into_panic();
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                format!("its task panicked ({msg}); this is a bug, please report it")
            } else {
                "its task was cancelled".to_owned()
            }
        }))
    });
}

/// The HTTP status of a failed call, when there was an answer.
fn status<E>(e: &SdkError<E>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// One line for a failed call: the operation, the store's code and
/// message or the transport error, and a hint.
fn s3_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    loc: &Location,
    op: &str,
    e: &SdkError<E>,
) -> CliError {
    let code = e.code().unwrap_or_default().to_owned();
    let st = status(e);
    let what = match e {
        SdkError::ServiceError(s) if s.err().code().is_some() => format!(
            "{} {}",
            s.err().code().unwrap_or("error"),
            s.err().message().unwrap_or_default()
        ),
        // (Never the raw answer in a message: it may be a body of
        // ciphertext, and it is no use to an operator.)
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            "an answer that is not S3's (malformed or cut off)".to_owned()
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => format!(
            "the endpoint did not answer ({}); the SDK retried with backoff up to AWS_MAX_ATTEMPTS (default 3) times",
            DisplayErrorContext(e)
        ),
        _ => DisplayErrorContext(e).to_string(),
    };
    let what = match st {
        Some(s) if s >= 500 || s == 429 || code == "SlowDown" => format!(
            "{what} (HTTP {s}, still failing after the retries with backoff: AWS_MAX_ATTEMPTS, default 3)"
        ),
        Some(s) => format!("{what} (HTTP {s})"),
        None => what,
    };
    CliError::new(exit::IO, format!("{loc}: {op} failed: {}", what.trim()))
}

/// An I/O error for the engine from a message about `loc`, without the
/// location (the engine's error names it already).
fn bare(loc: &Location, message: &str) -> io::Error {
    let prefix = format!("{loc}: ");
    io::Error::other(message.strip_prefix(&prefix).unwrap_or(message).to_owned())
}

fn io_error(loc: &Location, e: io::Error) -> CliError {
    CliError::new(exit::IO, format!("{loc}: {e}"))
}

// ---------------------------------------------------------------------------
// upload

/// The writer `encrypt` streams ciphertext into: a multipart upload.
/// [`complete`](Upload::complete) makes the object appear; dropping it
/// before aborts the upload (waiting for the parts in flight first, so
/// that none is stored after the abort).
pub struct Upload {
    handle: tokio::runtime::Handle,
    client: Client,
    loc: Location,
    /// The upload id; empty until the first part starts the upload.
    id: String,
    tuning: Tuning,
    force: bool,
    /// `--retain-until`: checked (and set where the store ignored it at
    /// creation) once the object exists.
    retain: Option<(ObjectLockMode, aws_smithy_types::DateTime)>,
    /// `rewrap`: complete only if the object is still this ETag.
    if_match: Option<String>,
    buf: Vec<u8>,
    next_part: i32,
    in_flight: usize,
    tx: mpsc::Sender<Result<CompletedPart, String>>,
    rx: mpsc::Receiver<Result<CompletedPart, String>>,
    done: Vec<CompletedPart>,
    failed: Option<String>,
    finished: bool,
    /// Bytes handed to parts so far.
    pub bytes: u64,
    /// Tests only: the part whose task panics (there is no way to make a
    /// real one panic from outside).
    #[cfg(test)]
    panic_part: Option<i32>,
}

impl Upload {
    /// CreateMultipartUpload, once.
    fn start(&mut self) -> Result<(), CliError> {
        if !self.id.is_empty() {
            return Ok(());
        }
        let (c, l, retain) = (self.client.clone(), self.loc.clone(), self.retain.clone());
        let what = format!("{}: CreateMultipartUpload", self.loc);
        let r = wait_on(&self.handle, &what, async move {
            let mut req = c
                .create_multipart_upload()
                .bucket(&l.bucket)
                .key(&l.key)
                .content_type("application/octet-stream")
                .checksum_algorithm(ChecksumAlgorithm::Crc32);
            if let Some((mode, date)) = retain {
                req = req
                    .object_lock_mode(mode)
                    .object_lock_retain_until_date(date);
            }
            req.send().await
        })?;
        let id = r
            .map_err(|e| s3_error(&self.loc, "CreateMultipartUpload", &e))?
            .upload_id()
            .unwrap_or_default()
            .to_owned();
        if id.is_empty() {
            return Err(CliError::new(
                exit::IO,
                format!(
                    "{}: the store answered CreateMultipartUpload without an upload id",
                    self.loc
                ),
            ));
        }
        self.id = id;
        Ok(())
    }

    /// Waits for one part in flight.
    fn wait_one(&mut self) -> io::Result<()> {
        let r = self
            .rx
            .recv()
            .map_err(|_| io::Error::other("internal error: the S3 runtime stopped"))?;
        self.in_flight -= 1;
        match r {
            Ok(p) => {
                self.done.push(p);
                Ok(())
            }
            Err(e) => {
                let err = bare(&self.loc, &e);
                self.failed.get_or_insert(e);
                Err(err)
            }
        }
    }

    fn check_failed(&self) -> io::Result<()> {
        match &self.failed {
            Some(e) => Err(bare(&self.loc, e)),
            None => Ok(()),
        }
    }

    fn reserve_part(&mut self) -> io::Result<i32> {
        self.check_failed()?;
        if let Err(e) = self.start() {
            let err = bare(&self.loc, &e.message);
            self.failed.get_or_insert(e.message);
            return Err(err);
        }
        while self.in_flight >= self.tuning.parallel {
            self.wait_one()?;
        }
        // Collect finished parts without waiting, so that a failure stops
        // the stream early.
        while let Ok(r) = self.rx.try_recv() {
            self.in_flight -= 1;
            match r {
                Ok(p) => self.done.push(p),
                Err(e) => {
                    let err = bare(&self.loc, &e);
                    self.failed.get_or_insert(e);
                    return Err(err);
                }
            }
        }
        let n = self.next_part;
        if n > MAX_PARTS {
            return Err(io::Error::other(format!(
                "the backup needs more than {MAX_PARTS} parts; raise PHI_ENVELOPE_S3_PART_SIZE"
            )));
        }
        self.next_part += 1;
        Ok(n)
    }

    /// Uploads the buffer as the next part.
    fn send_part(&mut self) -> io::Result<()> {
        let n = self.reserve_part()?;
        let body = Bytes::from(std::mem::take(&mut self.buf));
        self.bytes += body.len() as u64;
        let (c, l, id, tx) = (
            self.client.clone(),
            self.loc.clone(),
            self.id.clone(),
            self.tx.clone(),
        );
        self.in_flight += 1;
        #[cfg(test)]
        let panic_part = self.panic_part;
        let what = format!("{l}: UploadPart {n}");
        let part = async move {
            #[cfg(test)]
            if panic_part == Some(n) {
                panic!("part {n} panics, as the test asked");
            }
            let r = c
                .upload_part()
                .bucket(&l.bucket)
                .key(&l.key)
                .upload_id(&id)
                .part_number(n)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .body(ByteStream::from(body))
                .send()
                .await;
            match r {
                Ok(o) => Ok(CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(o.e_tag().map(str::to_owned))
                    .set_checksum_crc32(o.checksum_crc32().map(str::to_owned))
                    .build()),
                Err(e) => Err(s3_error(&l, &format!("UploadPart {n}"), &e).message),
            }
        };
        spawn_reporting(&self.handle, part, move |r| {
            let _ = tx.send(r.unwrap_or_else(|why| Err(format!("{what} failed: {why}"))));
        });
        Ok(())
    }

    /// `rewrap`: part `n` copied from bytes `from..=to` of the object
    /// itself as it is at `etag`.
    fn copy_part(&mut self, etag: &str, from: u64, to: u64) -> Result<(), CliError> {
        let n = self.reserve_part().map_err(|e| io_error(&self.loc, e))?;
        let (c, l, id, tx, etag) = (
            self.client.clone(),
            self.loc.clone(),
            self.id.clone(),
            self.tx.clone(),
            etag.to_owned(),
        );
        self.in_flight += 1;
        let what = format!("{l}: UploadPartCopy {n}");
        let part = async move {
            let source = format!("{}/{}", l.bucket, url_encode(&l.key));
            let r = c
                .upload_part_copy()
                .bucket(&l.bucket)
                .key(&l.key)
                .upload_id(&id)
                .part_number(n)
                .copy_source(source)
                .copy_source_range(format!("bytes={from}-{to}"))
                .copy_source_if_match(&etag)
                .send()
                .await;
            match r {
                Ok(o) => {
                    let cp = o.copy_part_result();
                    Ok(CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(cp.and_then(|p| p.e_tag()).map(str::to_owned))
                        .set_checksum_crc32(cp.and_then(|p| p.checksum_crc32()).map(str::to_owned))
                        .build())
                }
                Err(e) => Err(s3_error_if(
                    &l,
                    &format!("UploadPartCopy {n}"),
                    Cond::Unchanged(&etag),
                    &e,
                )
                .message),
            }
        };
        spawn_reporting(&self.handle, part, move |r| {
            let _ = tx.send(r.unwrap_or_else(|why| Err(format!("{what} failed: {why}"))));
        });
        Ok(())
    }

    /// Uploads what is left, waits for every part and completes the
    /// upload: the object appears now, whole. Without `--force` the
    /// completion is conditional (`If-None-Match: *`): an object that
    /// appeared meanwhile is not replaced (exit 5).
    pub fn complete(mut self) -> Result<(), CliError> {
        let loc = self.loc.clone();
        if !self.buf.is_empty() || self.next_part == 1 {
            self.send_part().map_err(|e| io_error(&loc, e))?;
        }
        while self.in_flight > 0 {
            self.wait_one().map_err(|e| io_error(&loc, e))?;
        }
        self.check_failed().map_err(|e| io_error(&loc, e))?;
        let mut parts = std::mem::take(&mut self.done);
        parts.sort_by_key(|p| p.part_number());
        let (c, id, force, if_match) = (
            self.client.clone(),
            self.id.clone(),
            self.force,
            self.if_match.clone(),
        );
        let read = if_match.clone().unwrap_or_default();
        let cond = match (&self.if_match, force) {
            (Some(_), _) => Cond::Unchanged(&read),
            (None, false) => Cond::Absent,
            (None, true) => Cond::None,
        };
        let l = loc.clone();
        let r = wait_on(
            &self.handle,
            &format!("{loc}: CompleteMultipartUpload"),
            async move {
                let mut req = c
                    .complete_multipart_upload()
                    .bucket(&l.bucket)
                    .key(&l.key)
                    .upload_id(&id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    );
                if let Some(m) = if_match {
                    req = req.if_match(m);
                } else if !force {
                    req = req.if_none_match("*");
                }
                req.send().await
            },
        )?;
        match r {
            Ok(_) => {
                self.finished = true;
                self.ensure_retention()
            }
            Err(e) if completed_anyway(&e) => {
                self.finished = true;
                self.ensure_retention()
            }
            // Dropped unfinished: aborted.
            Err(e) => Err(s3_error_if(&loc, "CompleteMultipartUpload", cond, &e)),
        }
    }
}

impl Upload {
    /// With `--retain-until`: S3 applies the retention asked for at
    /// CreateMultipartUpload, so the object is locked from its first
    /// instant; it is set again now (PutObjectRetention, the same mode and
    /// date: allowed on a locked object, since it shortens nothing) for a
    /// store that ignored it there (moto does), and read back
    /// (HeadObject). A store that refuses either fails the command (exit
    /// 4: the object exists, and the message says it is not locked).
    fn ensure_retention(&self) -> Result<(), CliError> {
        let Some((mode, until)) = self.retain.clone() else {
            return Ok(());
        };
        let unlocked = |message: String| {
            CliError::new(
                exit::IO,
                format!(
                    "{message}; the backup was written but is NOT under the retention asked for"
                ),
            )
        };
        let m = match mode {
            ObjectLockMode::Compliance => aws_sdk_s3::types::ObjectLockRetentionMode::Compliance,
            _ => aws_sdk_s3::types::ObjectLockRetentionMode::Governance,
        };
        let (c, l) = (self.client.clone(), self.loc.clone());
        let what = format!("{}: PutObjectRetention", self.loc);
        let put = wait_on(&self.handle, &what, async move {
            c.put_object_retention()
                .bucket(&l.bucket)
                .key(&l.key)
                .retention(
                    aws_sdk_s3::types::ObjectLockRetention::builder()
                        .mode(m)
                        .retain_until_date(until)
                        .build(),
                )
                .send()
                .await
        })
        .map_err(|e| unlocked(e.message))?;
        put.map_err(|e| unlocked(s3_error(&self.loc, "PutObjectRetention", &e).message))?;
        let (c, l) = (self.client.clone(), self.loc.clone());
        let what = format!("{}: HeadObject", self.loc);
        let head = wait_on(&self.handle, &what, async move {
            c.head_object().bucket(&l.bucket).key(&l.key).send().await
        })
        .map_err(|e| unlocked(e.message))?
        .map_err(|e| unlocked(s3_error(&self.loc, "HeadObject", &e).message))?;
        let locked = head.object_lock_mode() == Some(&mode)
            && head
                .object_lock_retain_until_date()
                .is_some_and(|d| d.secs() >= until.secs());
        if !locked {
            return Err(unlocked(format!(
                "{}: the store reports no retention until {} on the new object",
                self.loc,
                until
                    .fmt(aws_smithy_types::date_time::Format::DateTime)
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let size = self.tuning.part_size(self.next_part);
        if self.buf.capacity() < size {
            self.buf.reserve_exact(size - self.buf.len());
        }
        let n = data.len().min(size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == size {
            self.send_part()?;
        }
        Ok(n)
    }

    /// Parts are cut at their size, not at flushes; the last one is sent
    /// by [`Upload::complete`].
    fn flush(&mut self) -> io::Result<()> {
        self.check_failed()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.finished || self.id.is_empty() {
            return;
        }
        // Parts still in flight would be stored after an abort: wait.
        while self.in_flight > 0 && self.rx.recv().is_ok() {
            self.in_flight -= 1;
        }
        let (c, l, id) = (self.client.clone(), self.loc.clone(), self.id.clone());
        let what = format!("{}: AbortMultipartUpload {}", self.loc, self.id);
        let r = wait_on(&self.handle, &what, async move {
            c.abort_multipart_upload()
                .bucket(&l.bucket)
                .key(&l.key)
                .upload_id(&id)
                .send()
                .await
        });
        let failed = match r {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                Some(s3_error(&self.loc, &format!("AbortMultipartUpload {}", self.id), &e).message)
            }
            Err(e) => Some(e.message),
        };
        if let Some(why) = failed {
            eprintln!(
                "backup: warning: {why}; its parts stay billed until a lifecycle rule (AbortIncompleteMultipartUpload) removes them"
            );
        }
    }
}

/// A `200 OK` to CompleteMultipartUpload that the SDK could not parse
/// because its root element is `CompleteMultipartUploadResponse` (moto's
/// spelling; S3's is `CompleteMultipartUploadResult`), with an ETag and no
/// error in it: the upload did complete. (A 200 whose body is an
/// `<Error>`, which S3 sends when a completion fails late, stays a
/// failure.)
fn completed_anyway<E>(e: &SdkError<E>) -> bool {
    let Some(raw) = e.raw_response() else {
        return false;
    };
    let body = raw.body().bytes().map(String::from_utf8_lossy);
    raw.status().as_u16() == 200
        && body.is_some_and(|b| {
            b.contains("<CompleteMultipartUploadResponse")
                && b.contains("<ETag>")
                && !b.contains("<Error>")
        })
}

/// Percent-encodes a key for `x-amz-copy-source` (`/` kept).
fn url_encode(key: &str) -> String {
    let mut s = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

// ---------------------------------------------------------------------------
// download

/// Reads an object with ranged GETs, `depth` in flight, in order.
pub struct Download {
    handle: tokio::runtime::Handle,
    client: Client,
    loc: Location,
    etag: String,
    size: u64,
    /// The next offset to request.
    next: u64,
    range: usize,
    depth: usize,
    queue: VecDeque<mpsc::Receiver<Result<Bytes, String>>>,
    current: Bytes,
}

/// Attempts at one range whose body was cut mid-transfer (each attempt's
/// request has the SDK's own retries too).
const BODY_ATTEMPTS: u32 = 4;

impl Download {
    fn fill(&mut self) {
        while self.queue.len() < self.depth && self.next < self.size {
            let from = self.next;
            let to = (from + self.range as u64).min(self.size) - 1;
            self.next = to + 1;
            let (tx, rx) = mpsc::sync_channel(1);
            let (c, l, etag) = (self.client.clone(), self.loc.clone(), self.etag.clone());
            let what = format!("{l}: GetObject of bytes {from}-{to}");
            let range = async move {
                let want = (to - from + 1) as usize;
                let mut last = String::new();
                for attempt in 0..BODY_ATTEMPTS {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    }
                    let r = c
                        .get_object()
                        .bucket(&l.bucket)
                        .key(&l.key)
                        .range(format!("bytes={from}-{to}"))
                        .if_match(&etag)
                        .send()
                        .await;
                    let o = match r {
                        Ok(o) => o,
                        Err(e) => {
                            let msg = if status(&e) == Some(412) {
                                format!("{l}: the object changed while it was read (its ETag is no longer {etag})")
                            } else {
                                s3_error(&l, "GetObject", &e).message
                            };
                            return Err(msg);
                        }
                    };
                    match o.body.collect().await {
                        Ok(b) => {
                            let b = b.into_bytes();
                            if b.len() == want {
                                return Ok(b);
                            }
                            last = format!(
                                "{l}: GetObject of bytes {from}-{to} returned {} bytes",
                                b.len()
                            );
                        }
                        Err(e) => {
                            last = format!(
                                "{l}: GetObject of bytes {from}-{to} was cut mid-transfer ({e})"
                            )
                        }
                    }
                }
                Err(format!("{last}; gave up after {BODY_ATTEMPTS} attempts"))
            };
            spawn_reporting(&self.handle, range, move |r| {
                let _ = tx.send(r.unwrap_or_else(|why| Err(format!("{what} failed: {why}"))));
            });
            self.queue.push_back(rx);
        }
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.current.is_empty() {
            self.fill();
            let Some(rx) = self.queue.pop_front() else {
                return Ok(0);
            };
            let r = rx
                .recv()
                .map_err(|_| io::Error::other("internal error: the S3 runtime stopped"))?;
            self.current = r.map_err(|m| bare(&self.loc, &m))?;
            self.fill();
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        let p = |s: &str| parse(Path::new(s), false);
        assert!(p("/tmp/x").is_none());
        assert_eq!(
            p("s3://my-bucket/a/b.phi").unwrap().unwrap(),
            Location {
                bucket: "my-bucket".into(),
                key: "a/b.phi".into()
            }
        );
        assert!(p("s3://my-bucket").unwrap().is_err());
        assert!(p("s3://my-bucket/").unwrap().is_err());
        assert!(p("s3:///key").unwrap().is_err());
        assert!(p("s3://My_Bucket/key").unwrap().is_err());
        assert!(parse(Path::new("s3://my-bucket/"), true).unwrap().is_ok());
    }

    /// A part task that panics (a bug, here or in the SDK: never what an
    /// input or a store's answer may cause) is a clear error of the
    /// upload, never a panic or a hang: the upload is aborted and nothing
    /// is left under the final name, nor any part. Against moto (run by
    /// scripts/test.sh).
    #[test]
    fn a_panicking_part_task_aborts_the_upload_and_leaves_nothing() {
        assert!(
            std::env::var_os("PHI_MOTO_URL").is_some(),
            "run with scripts/test.sh (it starts moto)"
        );
        let store = Store::connect().unwrap();
        let loc = Location {
            bucket: format!("phi-panic-part-{}", std::process::id()),
            key: "x.phi".into(),
        };
        let (c, b) = (store.client.clone(), loc.bucket.clone());
        store
            .wait("CreateBucket", async move {
                c.create_bucket().bucket(b).send().await
            })
            .unwrap()
            .unwrap();
        let part = 5 << 20;
        let mut up = store
            .upload(
                &loc,
                UploadOptions {
                    force: false,
                    retain_until: None,
                },
            )
            .unwrap();
        up.tuning = Tuning {
            part_size: part,
            parallel: 2,
        };
        up.panic_part = Some(2);
        let chunk = vec![7u8; part];
        let mut failed = None;
        for _ in 0..4 {
            if let Err(e) = up.write_all(&chunk) {
                failed = Some(io_error(&loc, e));
                break;
            }
        }
        let err = match failed {
            Some(e) => {
                drop(up);
                e
            }
            None => up
                .complete()
                .expect_err("an upload with a failed part completed"),
        };
        assert_eq!(err.code, exit::IO, "{}", err.message);
        assert!(err.message.contains("UploadPart 2"), "{}", err.message);
        assert!(err.message.contains("panicked"), "{}", err.message);
        let (c, l) = (store.client.clone(), loc.clone());
        let head = store
            .wait("HeadObject", async move {
                c.head_object().bucket(&l.bucket).key(&l.key).send().await
            })
            .unwrap();
        assert_eq!(
            head.err().and_then(|e| status(&e)),
            Some(404),
            "an object was left"
        );
        let (c, b) = (store.client.clone(), loc.bucket.clone());
        let uploads = store
            .wait("ListMultipartUploads", async move {
                c.list_multipart_uploads().bucket(b).send().await
            })
            .unwrap()
            .unwrap();
        assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());
    }

    #[test]
    fn part_sizes_grow() {
        let t = Tuning {
            part_size: DEFAULT_PART_SIZE,
            parallel: 4,
        };
        assert_eq!(t.part_size(1), DEFAULT_PART_SIZE);
        assert_eq!(t.part_size(PARTS_PER_SIZE), DEFAULT_PART_SIZE);
        assert_eq!(t.part_size(PARTS_PER_SIZE + 1), 2 * DEFAULT_PART_SIZE);
        assert_eq!(
            t.part_size(MAX_PARTS),
            MAX_PART_SIZE.min(DEFAULT_PART_SIZE << 9)
        );
    }
}
