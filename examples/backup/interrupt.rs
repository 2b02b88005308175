//! Interruption: SIGINT, SIGTERM, SIGHUP and SIGQUIT set a flag that the
//! pipelines' readers check, so that a command stops with its temporary
//! output removed and nothing under the final name.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// From now on, SIGINT and SIGTERM set a flag instead of killing the
/// process: the readers of the pipelines see it and fail, so every
/// temporary file or directory is removed on the way out and the process
/// exits with 130. A second signal exits at once (leaving at most a
/// temporary file beside the target, never the final name).
///
/// Installed only once the passphrase prompts are over, so that Ctrl-C at
/// a prompt behaves as usual.
pub fn install_signal_handlers() {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for (signal, status) in [
        (signal_hook::consts::SIGINT, 130),
        (signal_hook::consts::SIGTERM, 143),
        // A dropped terminal or ssh session, and Ctrl-\: the same, so that
        // no temporary file is left and no short input is committed.
        (signal_hook::consts::SIGHUP, 129),
        (signal_hook::consts::SIGQUIT, 131),
    ] {
        // Order matters: the conditional shutdown sees the flag set by the
        // first signal only when a second one arrives.
        let _ = signal_hook::flag::register_conditional_shutdown(signal, status, flag.clone());
        let _ = signal_hook::flag::register(signal, flag.clone());
    }
}

/// True once SIGINT, SIGTERM, SIGHUP or SIGQUIT arrived.
pub fn interrupted() -> bool {
    INTERRUPTED
        .get()
        .is_some_and(|flag| flag.load(Ordering::Relaxed))
}

/// An error when a signal asked us to stop.
pub fn check_interrupt() -> io::Result<()> {
    if interrupted() {
        Err(io::Error::other("interrupted by a signal"))
    } else {
        Ok(())
    }
}
