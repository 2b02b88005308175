//! The data commands: encrypt, decrypt, verify, inspect, rewrap, clean.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, IsTerminal, Seek, SeekFrom, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use phi_envelope::atomic::{sync_dir, AtomicFile};
use phi_envelope::envelope::inspect_reader;
use phi_envelope::file::{FileOptions, FileReport};
use phi_envelope::{EncryptionContext, Header, KeyRef};

use crate::archive::{self, Stats};
use crate::keys::{self, Keys, Local};
use crate::util::{
    self, human_bytes, human_duration, human_rate, is_std, json_str, shown, stdin_file,
    stdout_file, ExpectSize, Watch,
};
use crate::{exit, CliError, Global};

/// Parses `--context k=v` pairs.
pub fn context(pairs: &[String]) -> Result<EncryptionContext, CliError> {
    let mut ctx = EncryptionContext::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| CliError::usage(format!("--context {p:?} is not KEY=VALUE")))?;
        ctx.insert(k, v)
            .map_err(|e| CliError::usage(format!("--context {k:?}: {e}")))?;
    }
    Ok(ctx)
}

fn file_options(g: &Global, force: bool) -> FileOptions {
    FileOptions::new()
        .threads(g.threads.unwrap_or(0))
        .overwrite(force)
}

/// An existing output is refused before any key is touched (exit 5).
fn refuse_existing(output: &Path, force: bool) -> Result<(), CliError> {
    if !force && !is_std(output) && output.symlink_metadata().is_ok() {
        return Err(CliError::new(
            exit::EXISTS,
            format!(
                "{} already exists; refusing to overwrite it (pass --force to replace it once the new one is complete)",
                output.display()
            ),
        ));
    }
    Ok(())
}

/// The kind of a backup's plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Directory => "directory",
        }
    }
}

// ---------------------------------------------------------------------------
// encrypt

pub struct EncryptArgs {
    pub keys: Vec<String>,
    pub context: Vec<String>,
    pub output: PathBuf,
    pub input: PathBuf,
    pub force: bool,
    pub skip_outside_links: bool,
    /// `--expect-size`: the plaintext's exact length.
    pub expect_size: Option<u64>,
}

/// The `--expect-size` refusal.
fn size_mismatch(input: &Path, m: util::SizeMismatch) -> CliError {
    let what = if m.read > m.expected {
        format!("more than {} bytes (at least {})", m.expected, m.read)
    } else {
        format!("{} bytes", m.read)
    };
    CliError::integrity(format!(
        "{}: the input is {what} but --expect-size says {}: the producer stopped early or sent \
         something else; nothing was committed under the output name (a stream on stdout has no \
         final chunk and does not decrypt as complete)",
        shown(input, "stdin"),
        m.expected
    ))
}

pub fn encrypt(g: &Global, a: EncryptArgs) -> Result<(), CliError> {
    let ctx = context(&a.context)?;
    let recipients: Vec<KeyRef> = if a.keys.is_empty() {
        vec![keys::key_ref(keys::DEFAULT_KEY)?]
    } else {
        a.keys
            .iter()
            .map(|k| keys::key_ref(k))
            .collect::<Result<_, _>>()?
    };
    // Everything that can be refused without keys is refused first.
    let kind = if is_std(&a.input) {
        Kind::File
    } else {
        let md = fs::metadata(&a.input).map_err(|e| CliError::from_io(e, &a.input))?;
        // A FIFO or a device (`<(pg_dump ...)`, /dev/fd/N) is read as a
        // stream, like stdin.
        if md.is_dir() {
            Kind::Directory
        } else {
            if let (Some(expected), true) = (a.expect_size, md.is_file()) {
                if expected != md.len() {
                    return Err(size_mismatch(
                        &a.input,
                        util::SizeMismatch {
                            expected,
                            read: md.len(),
                        },
                    ));
                }
            }
            Kind::File
        }
    };
    if a.expect_size.is_some() && kind == Kind::Directory {
        return Err(CliError::usage(format!(
            "--expect-size is for a file or stdin, not the directory {}: an archive's size is not known in advance",
            a.input.display()
        )));
    }
    refuse_existing(&a.output, a.force)?;
    if is_std(&a.output) && io::stdout().is_terminal() {
        return Err(CliError::usage(
            "refusing to write encrypted data to a terminal: redirect stdout or use -o FILE".into(),
        ));
    }
    if kind == Kind::Directory && !is_std(&a.output) {
        let out_dir = fs::canonicalize(util::parent_dir(&a.output))
            .map_err(|e| CliError::from_io(e, &a.output))?;
        let in_dir = fs::canonicalize(&a.input).map_err(|e| CliError::from_io(e, &a.input))?;
        if out_dir.starts_with(&in_dir) {
            return Err(CliError::usage(format!(
                "the output {} is inside the directory being backed up; write it elsewhere",
                a.output.display()
            )));
        }
    }
    let schemes: BTreeSet<String> = recipients.iter().map(|k| k.scheme().to_owned()).collect();
    let keys = keys::connect(g, &schemes, Local::Require)?;
    let envelope = keys.envelope("backup").to_recipients(recipients.clone());
    util::install_signal_handlers();
    let opts = file_options(g, a.force);
    let start = Instant::now();
    let out_name = if is_std(&a.output) {
        PathBuf::from("stdout")
    } else {
        a.output.clone()
    };
    let in_name = if is_std(&a.input) {
        PathBuf::from("stdin")
    } else {
        a.input.clone()
    };

    let mut out = if is_std(&a.output) {
        Output::Stdout(stdout_file().map_err(|e| CliError::from_io(e, &a.output))?)
    } else {
        Output::File(
            AtomicFile::create(&a.output, a.force).map_err(|e| CliError::from_lib(e, &a.output))?,
        )
    };
    let (report, stats) = match kind {
        Kind::File => {
            let (input, total) = if is_std(&a.input) {
                (
                    stdin_file().map_err(|e| CliError::from_io(e, &a.input))?,
                    None,
                )
            } else {
                let f = File::open(&a.input).map_err(|e| CliError::from_io(e, &a.input))?;
                let len = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
                // (A file that changed size since the check above is
                // caught by the ExpectSize reader below.)
                (f, len)
            };
            let bar = util::progress(total, "encrypting", g.quiet);
            let found = Arc::new(OnceLock::new());
            let r = keys.block_on(envelope.encrypt_stream_parallel(
                Watch::new(
                    ExpectSize::new(input, a.expect_size, found.clone()),
                    bar.clone(),
                ),
                out.writer(),
                &ctx,
                &opts,
            ));
            bar.finish_and_clear();
            if let (Err(_), Some(m)) = (&r, found.get()) {
                if !util::interrupted() {
                    return Err(size_mismatch(&a.input, *m));
                }
            }
            (
                r.map_err(|e| CliError::from_engine(e, &in_name, &out_name))?,
                None,
            )
        }
        Kind::Directory => {
            let total = if g.quiet || !io::stderr().is_terminal() {
                None
            } else {
                Some(archive::total_size(&a.input))
            };
            let bar = util::progress(total, "archiving and encrypting", g.quiet);
            let (reader, writer) = util::channel();
            let root = a.input.clone();
            let wopts = archive::WriteOptions {
                skip_outside_links: a.skip_outside_links,
                quiet: g.quiet,
            };
            let tbar = bar.clone();
            let tar = std::thread::spawn(move || archive::write(&root, writer, wopts, &tbar));
            let r = keys.block_on(envelope.encrypt_stream_parallel(
                Watch::new(reader, indicatif::ProgressBar::hidden()),
                out.writer(),
                &ctx,
                &opts,
            ));
            // The engine dropped the pipe's reader: a blocked archiver
            // sees a broken pipe and ends.
            let archived = join(tar);
            bar.finish_and_clear();
            let stats = match (r, archived) {
                (Ok(_), Err(e)) => return Err(e),
                (Err(e), Err(ae)) => {
                    // The archiver's own failure (unreadable file, unsafe
                    // link) explains a pipe error better.
                    let lib = CliError::from_engine(e, &in_name, &out_name);
                    return Err(
                        if ae.code == exit::IO && ae.message.contains("Broken pipe") {
                            lib
                        } else {
                            ae
                        },
                    );
                }
                (Err(e), Ok(_)) => return Err(CliError::from_engine(e, &in_name, &out_name)),
                (Ok(r), Ok(stats)) => (r, stats),
            };
            (stats.0, Some(stats.1))
        }
    };
    out.finish(&a.output)?;
    if !g.quiet {
        let what = match &stats {
            Some(s) => format!("directory {} ({})", a.input.display(), s.summary()),
            None => format!(
                "{} ({})",
                shown(&a.input, "stdin"),
                human_bytes(report.plaintext_len)
            ),
        };
        let took = start.elapsed();
        eprintln!(
            "encrypted {what} to {} ({}) in {}, {}, {} thread(s); keys: {}",
            shown(&a.output, "stdout"),
            human_bytes(report.ciphertext_len),
            human_duration(took),
            human_rate(report.plaintext_len, took),
            report.threads,
            recipients
                .iter()
                .map(KeyRef::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        );
        if stats.is_some_and(|s| s.skipped > 0) {
            eprintln!(
                "backup: warning: {} special file(s) or link(s) were skipped (see the warnings above)",
                stats.map_or(0, |s| s.skipped)
            );
        }
    }
    Ok(())
}

/// Where encrypted output goes.
enum Output {
    File(AtomicFile),
    Stdout(File),
}

impl Output {
    fn writer(&mut self) -> &mut File {
        match self {
            Output::File(f) => f.file(),
            Output::Stdout(f) => f,
        }
    }

    fn finish(self, target: &Path) -> Result<(), CliError> {
        // A signal after the last read: the end of input may be its doing
        // (Ctrl-C kills a pipeline's producer too, and its death closes the
        // pipe), so what was read may be short. Dropping the temporary
        // file removes it; nothing appears under the final name.
        if util::interrupted() {
            return Err(CliError::interrupted());
        }
        match self {
            Output::File(f) => f.commit().map_err(|e| CliError::from_lib(e, target)),
            Output::Stdout(mut f) => f.flush().map_err(|e| CliError::from_io(e, target)),
        }
    }
}

fn join<T>(h: JoinHandle<Result<T, CliError>>) -> Result<T, CliError> {
    h.join().unwrap_or_else(|_| {
        Err(CliError::new(
            exit::INTERNAL,
            "internal error: a worker thread panicked (this is a bug; please report it)".into(),
        ))
    })
}

// ---------------------------------------------------------------------------
// decrypt and verify: the plaintext router

/// What the router does with the plaintext.
enum Plan {
    /// Check everything, keep nothing.
    Verify,
    /// Restore to `target`: a file, or a directory for a directory backup
    /// (unless `raw`).
    Restore {
        target: PathBuf,
        force: bool,
        raw: bool,
    },
    /// Write the plaintext to stdout as it authenticates.
    Stdout(File),
}

enum Stage {
    /// The first bytes, held until the kind is known.
    /// (Wiped when dropped: it is plaintext. Its capacity is reserved up
    /// front, so it never reallocates and leaves no copy behind.)
    Sniff(zeroize::Zeroizing<Vec<u8>>),
    Null,
    File(AtomicFile),
    Stdout(File),
    Tar {
        pipe: Option<util::ChannelWriter>,
        worker: Option<JoinHandle<Result<Stats, CliError>>>,
        temp: Option<PathBuf>,
    },
    Gone,
}

/// The writer the decryption engine writes authenticated plaintext into:
/// it decides from the first 512 bytes whether the backup is a directory
/// (the marker entry of a tar stream), then routes the plaintext to a
/// file, a restore into a temporary directory, a checker, or stdout.
/// Nothing is released under the final name before [`Router::finish`].
struct Router {
    plan: Plan,
    stage: Stage,
    kind: Option<Kind>,
}

const SNIFF: usize = 512;

impl Router {
    fn new(plan: Plan) -> Router {
        Router {
            plan,
            stage: Stage::Sniff(zeroize::Zeroizing::new(Vec::with_capacity(SNIFF))),
            kind: None,
        }
    }

    fn decide(&mut self) -> io::Result<()> {
        let Stage::Sniff(first) = std::mem::replace(&mut self.stage, Stage::Gone) else {
            return Ok(());
        };
        let dir = archive::is_directory_backup(&first);
        self.kind = Some(if dir { Kind::Directory } else { Kind::File });
        self.stage = match &mut self.plan {
            Plan::Verify if dir => spawn_reader(None)?,
            Plan::Verify => Stage::Null,
            Plan::Stdout(f) => Stage::Stdout(f.try_clone()?),
            Plan::Restore { target, raw, .. } if dir && !*raw => {
                let temp = util::sibling(target, "tmp");
                fs::DirBuilder::new().mode(0o700).create(&temp)?;
                spawn_reader(Some(temp))?
            }
            Plan::Restore { target, force, .. } => {
                Stage::File(AtomicFile::create(&*target, *force).map_err(io::Error::from)?)
            }
        };
        self.forward(&first)
    }

    fn forward(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.stage {
            Stage::Null => Ok(()),
            Stage::File(f) => f.file().write_all(buf),
            Stage::Stdout(f) => f.write_all(buf),
            Stage::Tar { pipe: Some(p), .. } => p.write_all(buf),
            _ => Err(io::Error::other("internal error: no output")),
        }
    }

    /// After the engine returned: commit on success, clean up on failure.
    fn finish(
        mut self,
        result: Result<FileReport, phi_envelope::Error>,
        shown_in: &Path,
        shown_out: &Path,
    ) -> Result<(FileReport, Kind, Option<Stats>), CliError> {
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                let primary = CliError::from_engine(e, shown_in, shown_out);
                let stage = std::mem::replace(&mut self.stage, Stage::Gone);
                if let Stage::Tar { pipe, worker, temp } = stage {
                    drop(pipe);
                    let extracted = worker.map(join);
                    if let Some(t) = temp {
                        remove_tree(&t);
                    }
                    // A reader that refused the archive makes the engine
                    // fail with a broken pipe: report the refusal.
                    if let Some(Err(x)) = extracted {
                        if primary.message.contains("Broken pipe") || x.code == exit::INTERRUPTED {
                            return Err(x);
                        }
                    }
                }
                return Err(primary);
            }
        };
        if matches!(self.stage, Stage::Sniff(_)) {
            self.decide().map_err(|e| CliError::from_io(e, shown_out))?;
        }
        let kind = self.kind.unwrap_or(Kind::File);
        let stage = std::mem::replace(&mut self.stage, Stage::Gone);
        match stage {
            Stage::Null => Ok((report, kind, None)),
            Stage::File(f) => {
                f.commit().map_err(|e| CliError::from_lib(e, shown_out))?;
                Ok((report, kind, None))
            }
            Stage::Stdout(mut f) => {
                f.flush().map_err(|e| CliError::from_io(e, shown_out))?;
                Ok((report, kind, None))
            }
            Stage::Tar { pipe, worker, temp } => {
                drop(pipe);
                let stats = worker.map(join).transpose();
                let stats = match stats {
                    Ok(s) => s.unwrap_or_default(),
                    Err(e) => {
                        if let Some(t) = &temp {
                            remove_tree(t);
                        }
                        return Err(e);
                    }
                };
                if let (Some(t), Plan::Restore { target, force, .. }) = (&temp, &self.plan) {
                    if let Err(e) = release_dir(t, target, *force) {
                        remove_tree(t);
                        return Err(e);
                    }
                }
                Ok((report, kind, Some(stats)))
            }
            Stage::Sniff(_) | Stage::Gone => Err(CliError::new(
                exit::INTERNAL,
                "internal error: router state".into(),
            )),
        }
    }
}

impl Write for Router {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Stage::Sniff(first) = &mut self.stage {
            let take = (SNIFF - first.len()).min(buf.len());
            first.extend_from_slice(&buf[..take]);
            if first.len() < SNIFF {
                return Ok(buf.len());
            }
            self.decide()?;
            self.forward(&buf[take..])?;
            return Ok(buf.len());
        }
        self.forward(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stage {
            Stage::File(f) => f.flush(),
            Stage::Stdout(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

/// Starts the tar reader on a pipe: restoring into `dest`, or checking.
fn spawn_reader(dest: Option<PathBuf>) -> io::Result<Stage> {
    let (reader, writer) = util::channel();
    let d = dest.clone();
    let worker = std::thread::spawn(move || archive::read(reader, d.as_deref()));
    Ok(Stage::Tar {
        pipe: Some(writer),
        worker: Some(worker),
        temp: dest,
    })
}

/// Removes a temporary restore directory (never follows links; makes
/// read-only directories writable first).
fn remove_tree(p: &Path) {
    if fs::remove_dir_all(p).is_ok() {
        return;
    }
    fn unlock(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(md) = p.symlink_metadata() {
            if md.is_dir() {
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
                if let Ok(rd) = fs::read_dir(p) {
                    for e in rd.flatten() {
                        unlock(&e.path());
                    }
                }
            }
        }
    }
    unlock(p);
    let _ = fs::remove_dir_all(p);
}

/// Renames the complete temporary directory to `target`; with `force`, an
/// existing target is moved aside first and removed after.
fn release_dir(temp: &Path, target: &Path, force: bool) -> Result<(), CliError> {
    let parent = util::parent_dir(target);
    let exists = target.symlink_metadata().is_ok();
    if exists && !force {
        return Err(CliError::new(
            exit::EXISTS,
            format!(
                "{} appeared while restoring; refusing to overwrite it (pass --force)",
                target.display()
            ),
        ));
    }
    let aside = if exists {
        let aside = util::sibling(target, "old");
        fs::rename(target, &aside).map_err(|e| CliError::from_io(e, target))?;
        Some(aside)
    } else {
        None
    };
    if let Err(e) = fs::rename(temp, target) {
        if let Some(a) = &aside {
            let _ = fs::rename(a, target);
        }
        return Err(CliError::from_io(e, target));
    }
    sync_dir(&parent).map_err(|e| CliError::from_lib(e, &parent))?;
    if let Some(a) = aside {
        if a.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            remove_tree(&a);
        } else {
            let _ = fs::remove_file(&a);
        }
    }
    Ok(())
}

/// Opens an input and checks its header before any key is touched. A
/// seekable file is checked whole (length and header); stdin only by its
/// header, when read.
fn open_input(input: &Path) -> Result<(File, Option<u64>, Option<Header>), CliError> {
    if is_std(input) {
        return Ok((
            stdin_file().map_err(|e| CliError::from_io(e, input))?,
            None,
            None,
        ));
    }
    let mut f = File::open(input).map_err(|e| CliError::from_io(e, input))?;
    let md = f.metadata().map_err(|e| CliError::from_io(e, input))?;
    if md.is_dir() {
        return Err(CliError::usage(format!(
            "{} is a directory, not a backup file",
            input.display()
        )));
    }
    if md.len() == 0 {
        return Err(CliError::integrity(format!(
            "{} is empty: not a phi-envelope backup",
            input.display()
        )));
    }
    let info = inspect_reader(&mut f).map_err(|e| CliError::from_lib(e, input))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| CliError::from_io(e, input))?;
    Ok((f, Some(md.len()), Some(info.header)))
}

fn schemes_of_header(h: &Header) -> BTreeSet<String> {
    h.recipients().iter().map(|r| r.provider.clone()).collect()
}

pub struct DecryptArgs {
    pub context: Vec<String>,
    pub output: PathBuf,
    pub input: PathBuf,
    pub force: bool,
    pub raw: bool,
}

pub fn decrypt(g: &Global, a: DecryptArgs) -> Result<(), CliError> {
    let ctx = context(&a.context)?;
    refuse_existing(&a.output, a.force)?;
    let (input, len, header) = open_input(&a.input)?;
    let schemes = match &header {
        Some(h) => schemes_of_header(h),
        None => ["local".to_owned()].into_iter().collect(),
    };
    #[cfg(feature = "recovery")]
    let schemes = crate::recovery::restrict(schemes)?;
    let keys = keys::connect(g, &schemes, Local::Open)?;
    let envelope = keys.envelope("backup-restore");
    util::install_signal_handlers();
    let plan = if is_std(&a.output) {
        Plan::Stdout(stdout_file().map_err(|e| CliError::from_io(e, &a.output))?)
    } else {
        Plan::Restore {
            target: a.output.clone(),
            force: a.force,
            raw: a.raw,
        }
    };
    let start = Instant::now();
    let bar = util::progress(len, "decrypting", g.quiet);
    let mut router = Router::new(plan);
    let r = keys.block_on(envelope.decrypt_stream_parallel(
        Watch::new(input, bar.clone()),
        &mut router,
        &ctx,
        &file_options(g, a.force),
    ));
    bar.finish_and_clear();
    let out_name = if is_std(&a.output) {
        PathBuf::from("stdout")
    } else {
        a.output.clone()
    };
    let in_name = if is_std(&a.input) {
        PathBuf::from("stdin")
    } else {
        a.input.clone()
    };
    let (report, kind, stats) = router.finish(r, &in_name, &out_name)?;
    if !g.quiet {
        let took = start.elapsed();
        let what = match (kind, stats, is_std(&a.output) || a.raw) {
            (Kind::Directory, Some(s), false) => {
                format!("directory {} ({})", a.output.display(), s.summary())
            }
            (Kind::Directory, _, true) => format!(
                "{} (the tar stream of a directory backup)",
                shown(&a.output, "stdout")
            ),
            _ => format!(
                "{} ({})",
                shown(&a.output, "stdout"),
                human_bytes(report.plaintext_len)
            ),
        };
        eprintln!(
            "restored {what} from {}: authenticated, in {}, {}",
            shown(&a.input, "stdin"),
            human_duration(took),
            human_rate(report.plaintext_len, took)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// verify

pub struct VerifyArgs {
    pub context: Vec<String>,
    pub inputs: Vec<PathBuf>,
    pub json: bool,
}

struct Verified {
    kind: Kind,
    plaintext: u64,
    stats: Option<Stats>,
    recipients: Vec<String>,
}

pub fn verify(g: &Global, a: VerifyArgs) -> Result<(), CliError> {
    let ctx = context(&a.context)?;
    if a.inputs.iter().filter(|p| is_std(p)).count() > 1 {
        return Err(CliError::usage("stdin (-) can be verified once".into()));
    }
    // Headers first: every input that is not a backup fails without keys,
    // and the providers needed are known.
    let mut opened = Vec::new();
    let mut schemes = BTreeSet::new();
    for p in &a.inputs {
        let o = open_input(p);
        if let Ok((_, _, Some(h))) = &o {
            schemes.extend(schemes_of_header(h));
        } else if o.is_ok() {
            schemes.insert("local".to_owned());
        }
        opened.push(o);
    }
    let keys = if schemes.is_empty() {
        None
    } else {
        Some(keys::connect(g, &schemes, Local::Open)?)
    };
    util::install_signal_handlers();
    let mut first_failure: Option<u8> = None;
    let mut results = Vec::new();
    for (p, o) in a.inputs.iter().zip(opened) {
        let r = o.and_then(|(f, len, header)| {
            let keys = keys.as_ref().expect("keys are open when an input opened");
            verify_one(g, keys, f, len, header, &ctx)
        });
        if util::interrupted() {
            return Err(CliError::interrupted());
        }
        if let Err(e) = &r {
            first_failure.get_or_insert(e.code);
        }
        if !a.json {
            match &r {
                Ok(v) => println!("OK      {}  {}", shown(p, "stdin"), describe(v)),
                Err(e) => println!("FAILED  {}  {}", shown(p, "stdin"), e.message),
            }
        }
        results.push((p.clone(), r));
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if a.json {
        let items: Vec<String> = results.iter().map(|(p, r)| verified_json(p, r)).collect();
        println!(
            "{{\"ok\":{},\"verified\":{},\"failed\":{},\"results\":[{}]}}",
            failed == 0,
            results.len() - failed,
            failed,
            items.join(",")
        );
    } else if results.len() > 1 {
        println!("{} verified, {} failed", results.len() - failed, failed);
    }
    match first_failure {
        None => Ok(()),
        Some(code) => Err(CliError::reported(code)),
    }
}

fn verify_one(
    g: &Global,
    keys: &Keys,
    input: File,
    len: Option<u64>,
    header: Option<Header>,
    ctx: &EncryptionContext,
) -> Result<Verified, CliError> {
    let envelope = keys.envelope("backup-verify");
    let bar = util::progress(len, "verifying", g.quiet);
    let mut router = Router::new(Plan::Verify);
    let r = keys.block_on(envelope.decrypt_stream_parallel(
        Watch::new(input, bar.clone()),
        &mut router,
        ctx,
        &file_options(g, false),
    ));
    bar.finish_and_clear();
    let (report, kind, stats) = router.finish(r, Path::new(""), Path::new(""))?;
    Ok(Verified {
        kind,
        plaintext: report.plaintext_len,
        stats,
        recipients: header
            .map(|h| {
                h.recipients()
                    .iter()
                    .map(|r| format!("{} v{}", r.key_ref, r.key_version))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn describe(v: &Verified) -> String {
    let keys = if v.recipients.is_empty() {
        String::new()
    } else {
        format!("; keys {}", v.recipients.join(", "))
    };
    match (v.kind, &v.stats) {
        (Kind::Directory, Some(s)) => format!("directory, {}{keys}", s.summary()),
        _ => format!("file, {}{keys}", human_bytes(v.plaintext)),
    }
}

fn verified_json(p: &Path, r: &Result<Verified, CliError>) -> String {
    let path = json_str(&shown(p, "-"));
    match r {
        Ok(v) => {
            let (files, dirs, symlinks) =
                v.stats
                    .map_or(("null".into(), "null".into(), "null".into()), |s| {
                        (
                            (s.files + s.hardlinks).to_string(),
                            s.dirs.to_string(),
                            s.symlinks.to_string(),
                        )
                    });
            let keys: Vec<String> = v.recipients.iter().map(|k| json_str(k)).collect();
            format!(
                "{{\"path\":{path},\"ok\":true,\"kind\":{},\"plaintext_bytes\":{},\"files\":{files},\"dirs\":{dirs},\"symlinks\":{symlinks},\"keys\":[{}]}}",
                json_str(v.kind.as_str()),
                v.plaintext,
                keys.join(",")
            )
        }
        Err(e) => format!(
            "{{\"path\":{path},\"ok\":false,\"exit_code\":{},\"error\":{}}}",
            e.code,
            json_str(&e.message)
        ),
    }
}

// ---------------------------------------------------------------------------
// inspect

pub fn inspect(_g: &Global, input: &Path, json: bool) -> Result<(), CliError> {
    let (info, file_len) = if is_std(input) {
        let mut stdin = stdin_file().map_err(|e| CliError::from_io(e, input))?;
        let header = Header::read_from(&mut stdin).map_err(|e| CliError::from_lib(e, input))?;
        let body =
            io::copy(&mut stdin, &mut io::sink()).map_err(|e| CliError::from_io(e, input))?;
        let len = header.len() as u64 + body;
        (
            phi_envelope::message::MessageInfo::new(header, Some(body))
                .map_err(|e| CliError::from_lib(e, input))?,
            len,
        )
    } else {
        let (f, len, _) = open_input(input)?;
        (
            inspect_reader(f).map_err(|e| CliError::from_lib(e, input))?,
            len.unwrap_or(0),
        )
    };
    let h = &info.header;
    let suite = format!("{} (0x{:02x})", h.suite().name(), h.suite().id());
    if json {
        let recips: Vec<String> = h
            .recipients()
            .iter()
            .map(|r| {
                format!(
                    "{{\"provider\":{},\"key_ref\":{},\"key_version\":{},\"wrapped_len\":{}}}",
                    json_str(&r.provider),
                    json_str(&r.key_ref),
                    r.key_version,
                    r.wrapped.len()
                )
            })
            .collect();
        let opt = |v: Option<u64>| v.map_or("null".into(), |v| v.to_string());
        println!(
            "{{\"path\":{},\"format_version\":{},\"suite\":{},\"suite_id\":{},\"file_bytes\":{},\"header_bytes\":{},\"body_bytes\":{},\"chunks\":{},\"plaintext_bytes\":{},\"recipients\":[{}]}}",
            json_str(&shown(input, "-")),
            h.version(),
            json_str(h.suite().name()),
            h.suite().id(),
            file_len,
            h.len(),
            opt(info.body_len),
            opt(info.chunks),
            opt(info.plaintext_len),
            recips.join(",")
        );
        return Ok(());
    }
    println!("file:        {}", shown(input, "stdin"));
    println!("format:      phi-envelope v{}, suite {suite}", h.version());
    println!(
        "size:        {file_len} bytes (header {}, body {})",
        h.len(),
        info.body_len.unwrap_or(0)
    );
    if let (Some(pt), Some(chunks)) = (info.plaintext_len, info.chunks) {
        println!(
            "plaintext:   {pt} bytes ({}) in {chunks} chunk(s) of 16 KiB",
            human_bytes(pt)
        );
    }
    for (i, r) in h.recipients().iter().enumerate() {
        println!(
            "{}{} version {} (provider {})",
            if i == 0 {
                "wrapped to:  "
            } else {
                "             "
            },
            r.key_ref,
            r.key_version,
            r.provider
        );
    }
    println!("(file or directory, and the encryption context, are inside the ciphertext: run `backup verify` to check)");
    Ok(())
}

// ---------------------------------------------------------------------------
// rewrap

pub fn rewrap(
    g: &Global,
    key_args: &[String],
    context_args: &[String],
    inputs: &[PathBuf],
) -> Result<(), CliError> {
    let ctx = context(context_args)?;
    let new_keys: Vec<KeyRef> = key_args
        .iter()
        .map(|k| keys::key_ref(k))
        .collect::<Result<_, _>>()?;
    let mut headers = Vec::new();
    let mut schemes: BTreeSet<String> = new_keys.iter().map(|k| k.scheme().to_owned()).collect();
    for p in inputs {
        if is_std(p) {
            return Err(CliError::usage(
                "rewrap works in place on files, not on stdin".into(),
            ));
        }
        let (_, _, h) = open_input(p)?;
        let h = h.expect("a file has a header");
        schemes.extend(schemes_of_header(&h));
        headers.push(h);
    }
    let keys = keys::connect(g, &schemes, Local::Open)?;
    let base = keys.envelope("backup-rewrap");
    let mut first_failure = None;
    for (p, h) in inputs.iter().zip(headers) {
        let recipients: Vec<KeyRef> = if new_keys.is_empty() {
            let mut v: Vec<KeyRef> = Vec::new();
            for r in h.recipients() {
                let k = KeyRef::parse(&r.key_ref).map_err(CliError::from)?;
                if !keys::supported(k.scheme()) {
                    // Never drop a recipient (a disaster-recovery key)
                    // silently.
                    return Err(CliError::usage(format!(
                        "{} is also wrapped to {k}, which this build cannot wrap to;                          name every key to keep with --key, or use a build with that provider",
                        p.display()
                    )));
                }
                if !v.contains(&k) {
                    v.push(k);
                }
            }
            v
        } else {
            new_keys.clone()
        };
        let envelope = base.to_recipients(recipients);
        let before: Vec<String> = h
            .recipients()
            .iter()
            .map(|r| format!("{} v{}", r.key_ref, r.key_version))
            .collect();
        match keys.block_on(envelope.rewrap_file(p, &ctx)) {
            Ok(report) => {
                let after: Vec<String> = report
                    .new_header
                    .recipients()
                    .iter()
                    .map(|r| format!("{} v{}", r.key_ref, r.key_version))
                    .collect();
                if report.changed {
                    println!(
                        "rewrapped {}: {} -> {}",
                        p.display(),
                        before.join(", "),
                        after.join(", ")
                    );
                } else {
                    println!(
                        "unchanged {}: already wrapped to {}",
                        p.display(),
                        after.join(", ")
                    );
                }
            }
            Err(e) => {
                let e = CliError::from_lib(e, p);
                println!("FAILED    {}: {}", p.display(), e.message);
                first_failure.get_or_insert(e.code);
            }
        }
    }
    match first_failure {
        None => Ok(()),
        Some(code) => Err(CliError::reported(code)),
    }
}

// ---------------------------------------------------------------------------
// clean

/// Lists, and unless `dry_run` removes, the temporary files and directories
/// (`.NAME.<16 hex>.tmp`) that a killed `backup` left in `dirs`. Moved-aside
/// old restores (`.NAME.<16 hex>.old`) are listed, never removed.
pub fn clean(dirs: &[PathBuf], dry_run: bool) -> Result<(), CliError> {
    let mut found = 0;
    for d in dirs {
        let rd = fs::read_dir(d).map_err(|e| CliError::from_io(e, d))?;
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(kind) = temp_kind(name) else {
                continue;
            };
            let p = e.path();
            found += 1;
            if kind == "old" {
                println!("kept    {} (an old restore moved aside by --force; inspect it and remove it yourself)", p.display());
                continue;
            }
            if dry_run {
                println!("would remove {}", p.display());
                continue;
            }
            let is_dir = p.symlink_metadata().is_ok_and(|m| m.is_dir());
            if is_dir {
                remove_tree(&p);
            } else {
                fs::remove_file(&p).map_err(|e| CliError::from_io(e, &p))?;
            }
            println!("removed {}", p.display());
        }
    }
    if found == 0 {
        println!("no stale temporary files");
    }
    Ok(())
}

/// `tmp` or `old` for `.NAME.<16 hex>.tmp|old`.
fn temp_kind(name: &str) -> Option<&'static str> {
    let rest = name.strip_prefix('.')?;
    let (stem, kind) = if let Some(s) = rest.strip_suffix(".tmp") {
        (s, "tmp")
    } else if let Some(s) = rest.strip_suffix(".old") {
        (s, "old")
    } else {
        return None;
    };
    let (base, hex) = stem.rsplit_once('.')?;
    if base.is_empty() || hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(kind)
}
