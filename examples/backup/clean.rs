//! `backup clean`: the temporary files and directories a killed backup
//! left behind, listed and removed.

use std::fs;
use std::path::PathBuf;

use crate::commands::remove_tree;
use crate::CliError;

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
