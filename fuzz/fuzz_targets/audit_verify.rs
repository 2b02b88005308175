//! Audit log verification on arbitrary files: `audit::verify_files` (and
//! `verify`, keyed and unkeyed, with and without anchors) never panics, and
//! a report is consistent with the files it read: line counts add up, the
//! last anchor is the last line, and verifying again against that anchor
//! succeeds.
//!
//! Input: up to four files separated by 0xFF bytes (never valid in a log),
//! written as `log`, `log.000002`, ...
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use phi_envelope::audit::{AuditKey, Verifier};

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("phi-fuzz-audit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    let mut files = Vec::new();
    for (i, part) in data.split(|&b| b == 0xFF).take(4).enumerate() {
        let name = if i == 0 {
            "log".to_owned()
        } else {
            format!("log.{:06}", i + 1)
        };
        let p = d.join(name);
        std::fs::write(&p, part).unwrap();
        files.push(p);
    }
    let key = AuditKey::new(&[7u8; 32]).unwrap();
    for v in [Verifier::new(), Verifier::new().key(key)] {
        let by_files = v.verify_files(&files);
        let by_path = v.verify(&files[0]);
        assert_eq!(
            by_files.as_ref().map_err(|e| e.to_string()),
            by_path.as_ref().map_err(|e| e.to_string()),
            "verify(path) and verify_files disagree"
        );
        match by_files {
            Ok(report) => {
                assert_eq!(report.files.len(), files.len());
                assert_eq!(
                    report.files.iter().map(|f| f.lines).sum::<u64>(),
                    report.lines
                );
                assert!(
                    report.entries + report.gaps.len() as u64 + files.len() as u64 <= report.lines
                );
                assert_eq!(report.last.seq + 1, report.lines);
                let again = v.clone().anchor(report.last.clone()).verify_files(&files);
                assert!(again.is_ok(), "fails against its own anchor: {again:?}");
            }
            Err(e) => {
                let _ = format!("{e} {e:?}");
                let _ = e.bad_line().map(|b| b.to_string());
            }
        }
    }
    if let Some(line) = data.split(|&b| b == b'\n').next() {
        if let Ok(s) = std::str::from_utf8(line) {
            if let Ok(anchor) = s.parse::<phi_envelope::audit::Anchor>() {
                assert_eq!(
                    anchor
                        .to_string()
                        .parse::<phi_envelope::audit::Anchor>()
                        .unwrap(),
                    anchor
                );
                let _ = Verifier::new().anchor(anchor.clone()).verify_files(&files);
                let _ = Verifier::new().start_after(anchor).verify_files(&files);
            }
        }
    }
});
