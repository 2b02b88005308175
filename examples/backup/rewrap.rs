//! `backup rewrap`: backups re-wrapped in place to the current key
//! versions or to other keys, without re-encrypting the data.

use std::collections::BTreeSet;
use std::path::PathBuf;

use phi_envelope::KeyRef;

use crate::commands::{context, open_input, remote_header, schemes_of_header, wrapped_to};
use crate::connect::{self, Local};
use crate::streams::is_std;
use crate::{CliError, Global};

pub fn rewrap(
    g: &Global,
    key_args: &[String],
    context_args: &[String],
    inputs: &[PathBuf],
) -> Result<(), CliError> {
    let ctx = context(context_args)?;
    let new_keys: Vec<KeyRef> = key_args
        .iter()
        .map(|k| connect::key_ref(k))
        .collect::<Result<_, _>>()?;
    let mut headers = Vec::new();
    let mut schemes: BTreeSet<String> = new_keys.iter().map(|k| k.scheme().to_owned()).collect();
    for p in inputs {
        if is_std(p) {
            return Err(CliError::usage(
                "rewrap works in place on files, not on stdin".into(),
            ));
        }
        let h = match remote_header(p)? {
            Some((h, _)) => h,
            None => open_input(p)?.2.expect("a file has a header"),
        };
        schemes.extend(schemes_of_header(&h));
        headers.push(h);
    }
    let keys = connect::connect(g, &schemes, Local::Open)?;
    let base = keys.envelope("backup-rewrap");
    let mut first_failure = None;
    for (p, h) in inputs.iter().zip(headers) {
        let recipients: Vec<KeyRef> = if new_keys.is_empty() {
            let mut v: Vec<KeyRef> = Vec::new();
            for r in h.recipients() {
                let k = KeyRef::parse(&r.key_ref).map_err(CliError::from)?;
                if !connect::supported(k.scheme()) {
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
        let before = wrapped_to(&h);
        #[cfg(feature = "s3")]
        if crate::s3::is_s3(p) {
            match crate::s3cmd::rewrap_object(&keys, &envelope, p, &ctx) {
                Ok(r) if r.changed => println!(
                    "rewrapped {}: {} -> {}",
                    p.display(),
                    before.join(", "),
                    wrapped_to(&r.new_header).join(", ")
                ),
                Ok(r) => println!(
                    "unchanged {}: already wrapped to {}",
                    p.display(),
                    wrapped_to(&r.new_header).join(", ")
                ),
                Err(e) => {
                    println!("FAILED    {}: {}", p.display(), e.message);
                    first_failure.get_or_insert(e.code);
                }
            }
            continue;
        }
        match keys.block_on(envelope.rewrap_file(p, &ctx)) {
            Ok(report) => {
                let after = wrapped_to(&report.new_header);
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
