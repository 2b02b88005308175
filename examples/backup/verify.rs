//! `backup verify` (every backup decrypted and checked, nothing written)
//! and `backup inspect` (a header, no key needed).

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use phi_envelope::envelope::inspect_reader;
use phi_envelope::{EncryptionContext, Header};

use crate::archive::Stats;
use crate::commands::{
    context, file_options, open_any, open_input, remote_header, schemes_of_header, wrapped_to,
    Input, Kind,
};
use crate::connect::{self, Keys, Local};
use crate::decrypt::{Plan, Router};
use crate::output::{human_bytes, json_str, shown};
use crate::streams::{is_std, stdin_file, Watch};
use crate::{interrupt, output};
use crate::{CliError, Global};

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
        let o = open_any(p);
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
        Some(connect::connect(g, &schemes, Local::Open)?)
    };
    interrupt::install_signal_handlers();
    let mut first_failure: Option<u8> = None;
    let mut results = Vec::new();
    for (p, o) in a.inputs.iter().zip(opened) {
        let r = o.and_then(|(f, len, header)| {
            let keys = keys.as_ref().expect("keys are open when an input opened");
            verify_one(g, keys, f, len, header, &ctx)
        });
        if interrupt::interrupted() {
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
    input: Input,
    len: Option<u64>,
    header: Option<Header>,
    ctx: &EncryptionContext,
) -> Result<Verified, CliError> {
    let envelope = keys.envelope("backup-verify");
    let bar = output::progress(len, "verifying", g.quiet);
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
        recipients: header.as_ref().map(wrapped_to).unwrap_or_default(),
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
    let (info, file_len) = if let Some((header, size)) = remote_header(input)? {
        let body = size.saturating_sub(header.len() as u64);
        (
            phi_envelope::message::MessageInfo::new(header, Some(body))
                .map_err(|e| CliError::from_lib(e, input))?,
            size,
        )
    } else if is_std(input) {
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
