//! `backup decrypt`, and the plaintext router it shares with `verify`:
//! authenticated plaintext goes to a file, a directory restored in a
//! temporary directory, a checker or stdout, and nothing is released under
//! the final name before the whole backup authenticated.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use phi_envelope::atomic::{sync_dir, AtomicFile};
use phi_envelope::file::FileReport;

use crate::archive::{self, Stats};
use crate::commands::{
    context, file_options, join, open_any, refuse_existing, remove_tree, schemes_of_header, Kind,
};
use crate::connect::{self, Local};
use crate::output::{human_bytes, human_duration, human_rate, shown};
use crate::streams::{is_std, named, stdout_file, Watch};
use crate::{exit, CliError, Global};
use crate::{interrupt, output, streams};

/// What the router does with the plaintext.
pub enum Plan {
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
        pipe: Option<streams::ChannelWriter>,
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
pub struct Router {
    plan: Plan,
    stage: Stage,
    kind: Option<Kind>,
}

const SNIFF: usize = 512;

impl Router {
    pub fn new(plan: Plan) -> Router {
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
                let temp = streams::sibling(target, "tmp");
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
    pub fn finish(
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
    let (reader, writer) = streams::channel();
    let d = dest.clone();
    let worker = std::thread::spawn(move || archive::read(reader, d.as_deref()));
    Ok(Stage::Tar {
        pipe: Some(writer),
        worker: Some(worker),
        temp: dest,
    })
}

/// Renames the complete temporary directory to `target`; with `force`, an
/// existing target is moved aside first and removed after.
fn release_dir(temp: &Path, target: &Path, force: bool) -> Result<(), CliError> {
    let parent = streams::parent_dir(target);
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
        let aside = streams::sibling(target, "old");
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

pub struct DecryptArgs {
    pub context: Vec<String>,
    pub output: PathBuf,
    pub input: PathBuf,
    pub force: bool,
    pub raw: bool,
}

pub fn decrypt(g: &Global, a: DecryptArgs) -> Result<(), CliError> {
    let ctx = context(&a.context)?;
    crate::commands::refuse_plaintext_in_s3(&a.output, "output of decrypt")?;
    refuse_existing(&a.output, a.force)?;
    let (input, len, header) = open_any(&a.input)?;
    let schemes = match &header {
        Some(h) => schemes_of_header(h),
        None => ["local".to_owned()].into_iter().collect(),
    };
    #[cfg(feature = "recovery")]
    let schemes = crate::recovery::restrict(schemes)?;
    let keys = connect::connect(g, &schemes, Local::Open)?;
    let envelope = keys.envelope("backup-restore");
    interrupt::install_signal_handlers();
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
    let bar = output::progress(len, "decrypting", g.quiet);
    let mut router = Router::new(plan);
    let r = keys.block_on(envelope.decrypt_stream_parallel(
        Watch::new(input, bar.clone()),
        &mut router,
        &ctx,
        &file_options(g, a.force),
    ));
    bar.finish_and_clear();
    let out_name = named(&a.output, "stdout");
    let in_name = named(&a.input, "stdin");
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
