//! `backup encrypt`: a file, stdin or a directory (as a tar stream) into
//! one backup, committed under its name only when complete.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use phi_envelope::atomic::AtomicFile;
use phi_envelope::KeyRef;

use crate::archive;
use crate::commands::{context, file_options, join, refuse_existing, Kind};
use crate::connect::{self, Local};
use crate::output::{human_bytes, human_duration, human_rate, shown};
use crate::streams::{is_std, named, stdin_file, stdout_file, ExpectSize, Watch};
use crate::{exit, CliError, Global};
use crate::{interrupt, output, streams};

pub struct EncryptArgs {
    pub keys: Vec<String>,
    pub context: Vec<String>,
    pub output: PathBuf,
    pub input: PathBuf,
    pub force: bool,
    pub skip_outside_links: bool,
    /// `--expect-size`: the plaintext's exact length.
    pub expect_size: Option<u64>,
    /// `--retain-until` and `--retain-mode`: object-lock retention of an
    /// `s3://` output.
    pub retain_until: Option<String>,
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    pub retain_mode: String,
}

/// The `--expect-size` refusal.
fn size_mismatch(input: &Path, m: streams::SizeMismatch) -> CliError {
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
    // The context member that marks the trail's sealed secrets is
    // reserved: a backup made with it could be passed off as an audit key.
    if ctx.get(phi_envelope::audit::sealed::CONTEXT_KEY).is_some() {
        return Err(CliError::usage(format!(
            "--context {}=...: reserved for the audit trail's sealed keys (audit keygen)",
            phi_envelope::audit::sealed::CONTEXT_KEY
        )));
    }
    let recipients: Vec<KeyRef> = if a.keys.is_empty() {
        vec![connect::key_ref(connect::DEFAULT_KEY)?]
    } else {
        a.keys
            .iter()
            .map(|k| connect::key_ref(k))
            .collect::<Result<_, _>>()?
    };
    // Everything that can be refused without keys is refused first.
    crate::commands::refuse_plaintext_in_s3(&a.input, "input of encrypt")?;
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
                        streams::SizeMismatch {
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
    let remote = remote_output(&a)?;
    if remote.is_none() {
        if a.retain_until.is_some() {
            return Err(CliError::usage(
                "--retain-until is object-lock retention, for an s3:// output".into(),
            ));
        }
        refuse_existing(&a.output, a.force)?;
    }
    if is_std(&a.output) && io::stdout().is_terminal() {
        return Err(CliError::usage(
            "refusing to write encrypted data to a terminal: redirect stdout or use -o FILE".into(),
        ));
    }
    if kind == Kind::Directory && !is_std(&a.output) && remote.is_none() {
        let out_dir = fs::canonicalize(streams::parent_dir(&a.output))
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
    let keys = connect::connect(g, &schemes, Local::Require)?;
    let envelope = keys.envelope("backup").to_recipients(recipients.clone());
    interrupt::install_signal_handlers();
    let opts = file_options(g, a.force);
    let start = Instant::now();
    let out_name = named(&a.output, "stdout");
    let in_name = named(&a.input, "stdin");

    let mut out = if let Some(r) = remote {
        r.start()?
    } else if is_std(&a.output) {
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
            let bar = output::progress(total, "encrypting", g.quiet);
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
                if !interrupt::interrupted() {
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
            let bar = output::progress(total, "archiving and encrypting", g.quiet);
            let (reader, writer) = streams::channel();
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
    /// A multipart upload, aborted when dropped before it completed.
    #[cfg(feature = "s3")]
    S3(Box<crate::s3::Upload>),
}

impl Output {
    fn writer(&mut self) -> &mut (dyn Write + Send) {
        match self {
            Output::File(f) => f.file(),
            Output::Stdout(f) => f,
            #[cfg(feature = "s3")]
            Output::S3(u) => &mut **u,
        }
    }

    fn finish(self, target: &Path) -> Result<(), CliError> {
        // A signal after the last read: the end of input may be its doing
        // (Ctrl-C kills a pipeline's producer too, and its death closes the
        // pipe), so what was read may be short. Dropping the temporary
        // file removes it; nothing appears under the final name.
        if interrupt::interrupted() {
            return Err(CliError::interrupted());
        }
        match self {
            Output::File(f) => f.commit().map_err(|e| CliError::from_lib(e, target)),
            Output::Stdout(mut f) => f.flush().map_err(|e| CliError::from_io(e, target)),
            #[cfg(feature = "s3")]
            Output::S3(u) => u.complete(),
        }
    }
}

/// An `s3://` output, checked (existing object, retention date) before any
/// key is touched.
#[cfg(feature = "s3")]
struct Remote {
    store: crate::s3::Store,
    loc: crate::s3::Location,
    options: crate::s3::UploadOptions,
}

#[cfg(feature = "s3")]
impl Remote {
    fn start(self) -> Result<Output, CliError> {
        Ok(Output::S3(Box::new(
            self.store.upload(&self.loc, self.options)?,
        )))
    }
}

#[cfg(feature = "s3")]
fn remote_output(a: &EncryptArgs) -> Result<Option<Remote>, CliError> {
    let Some(loc) = crate::s3::parse(&a.output, false) else {
        return Ok(None);
    };
    let loc = loc?;
    let retain_until = a
        .retain_until
        .as_deref()
        .map(|d| crate::s3::retain_until(d, &a.retain_mode))
        .transpose()?;
    let store = crate::s3::Store::connect()?;
    store.refuse_existing(&loc, a.force)?;
    Ok(Some(Remote {
        store,
        loc,
        options: crate::s3::UploadOptions {
            force: a.force,
            retain_until,
        },
    }))
}

/// Without the `s3` feature there are no remote outputs.
#[cfg(not(feature = "s3"))]
enum Remote {}

#[cfg(not(feature = "s3"))]
impl Remote {
    fn start(self) -> Result<Output, CliError> {
        match self {}
    }
}

#[cfg(not(feature = "s3"))]
fn remote_output(a: &EncryptArgs) -> Result<Option<Remote>, CliError> {
    crate::commands::no_s3(&a.output)?;
    Ok(None)
}
