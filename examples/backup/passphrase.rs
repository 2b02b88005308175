//! The keystore's passphrases: the one that opens it (`--passphrase-file`,
//! `PHI_ENVELOPE_PASSPHRASE`, a prompt) and the new one of `keys passwd`
//! (`--new-passphrase-file`, `PHI_ENVELOPE_NEW_PASSPHRASE`, a prompt asked
//! twice). Never from the command line; only in zeroizing types.

use std::fs;
use std::io::{self, IsTerminal};
use std::path::Path;

use phi_envelope::provider::local::SecretString;
use secrecy::ExposeSecret;

use crate::{CliError, Global};

/// The environment variable holding the keystore passphrase.
pub const PASSPHRASE_ENV: &str = "PHI_ENVELOPE_PASSPHRASE";

/// The environment variable holding the new passphrase of `keys passwd`.
pub const NEW_PASSPHRASE_ENV: &str = "PHI_ENVELOPE_NEW_PASSPHRASE";

/// The passphrase in `file` (UTF-8, one trailing `\n` or `\r\n` removed,
/// nothing else changed, not empty), else in the environment variable
/// `env` when it is set and not empty; `None` when neither gives one.
/// `what` names it in errors ("passphrase", "new passphrase").
fn from_file_or_env(
    file: Option<&Path>,
    env: &str,
    what: &str,
) -> Result<Option<SecretString>, CliError> {
    if let Some(file) = file {
        let bytes = zeroize::Zeroizing::new(fs::read(file).map_err(|e| {
            CliError::usage(format!(
                "cannot read the {what} file {}: {e}",
                file.display()
            ))
        })?);
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            CliError::usage(format!("the {what} file {} is not UTF-8", file.display()))
        })?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        if text.is_empty() {
            return Err(CliError::usage(format!(
                "the {what} file {} is empty",
                file.display()
            )));
        }
        return Ok(Some(SecretString::from(text.to_owned())));
    }
    if let Ok(p) = std::env::var(env) {
        if !p.is_empty() {
            return Ok(Some(SecretString::from(p)));
        }
    }
    Ok(None)
}

/// Asks on the terminal, with `no_tty` as the refusal when there is no
/// terminal to ask on.
fn ask(prompt: &str, no_tty: &dyn Fn() -> CliError) -> Result<SecretString, CliError> {
    if !io::stdin().is_terminal() && !io::stderr().is_terminal() {
        return Err(no_tty());
    }
    Ok(SecretString::from(
        rpassword::prompt_password(prompt).map_err(|_| no_tty())?,
    ))
}

/// The passphrase: `--passphrase-file`, `PHI_ENVELOPE_PASSPHRASE`, or a
/// prompt on the terminal (asked twice when `confirm`). Never from the
/// command line.
pub fn passphrase(g: &Global, keystore: &Path, confirm: bool) -> Result<SecretString, CliError> {
    if let Some(p) = from_file_or_env(g.passphrase_file.as_deref(), PASSPHRASE_ENV, "passphrase")? {
        return Ok(p);
    }
    let no_tty = || {
        CliError::usage(format!(
            "the keystore {} needs its passphrase and there is no terminal to ask on: \
             set {PASSPHRASE_ENV} or pass --passphrase-file FILE",
            keystore.display()
        ))
    };
    let prompt = if confirm {
        format!("New passphrase for keystore {}: ", keystore.display())
    } else {
        format!("Passphrase for keystore {}: ", keystore.display())
    };
    let first = ask(&prompt, &no_tty)?;
    if first.expose_secret().is_empty() {
        return Err(CliError::usage("the passphrase must not be empty".into()));
    }
    if confirm {
        let again = ask("Repeat the passphrase: ", &no_tty)?;
        if again.expose_secret() != first.expose_secret() {
            return Err(CliError::usage(
                "the two passphrases differ; nothing was created, run the command again".into(),
            ));
        }
        if first.expose_secret().chars().count() < 12 {
            eprintln!(
                "backup: warning: a passphrase under 12 characters is weak for a keystore that protects PHI"
            );
        }
    }
    Ok(first)
}

/// The new passphrase: `--new-passphrase-file` (the rules of
/// `--passphrase-file`: UTF-8, one trailing `\n` or `\r\n` removed, nothing
/// else changed), `PHI_ENVELOPE_NEW_PASSPHRASE`, or a prompt asked twice.
pub fn new_passphrase(file: Option<&Path>, keystore: &Path) -> Result<SecretString, CliError> {
    if let Some(p) = from_file_or_env(file, NEW_PASSPHRASE_ENV, "new passphrase")? {
        return Ok(p);
    }
    let no_tty = || {
        CliError::usage(format!(
            "keys passwd needs the new passphrase and there is no terminal to ask on: \
             set {NEW_PASSPHRASE_ENV} or pass --new-passphrase-file FILE"
        ))
    };
    let first = ask(
        &format!("New passphrase for keystore {}: ", keystore.display()),
        &no_tty,
    )?;
    let again = ask("Repeat the new passphrase: ", &no_tty)?;
    if first.expose_secret().is_empty() {
        return Err(CliError::usage("the passphrase must not be empty".into()));
    }
    if again.expose_secret() != first.expose_secret() {
        return Err(CliError::usage(
            "the two passphrases differ; the passphrase was not changed".into(),
        ));
    }
    Ok(first)
}
