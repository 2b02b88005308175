//! `backup audit report`: who used which key when. Counts the events of a
//! trail (a file log or the PostgreSQL table) by day, key, actor, purpose,
//! operation and outcome.
//!
//! The report reads the lines as they are: it does not verify the chain.
//! Verify first (`backup audit verify`) when the report is evidence.

use std::collections::BTreeMap;
use std::path::Path;

use super::line::{self, Body};
use crate::events::Event;
use crate::json::format_timestamp;

/// One row of a report: a group of events and how many there were.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct ReportKey {
    /// The UTC day of the events' timestamps, `YYYY-MM-DD`.
    pub day: String,
    /// The key reference (`-` when the event names none).
    pub key_ref: String,
    /// The actor (`-` when none).
    pub actor: String,
    /// The purpose (`-` when none).
    pub purpose: String,
    /// The operation (`unwrap`, `rotate`, ...).
    pub operation: String,
    /// The outcome (`success`, `denied`, `failed:<kind>`, ...).
    pub outcome: String,
}

/// The counts of a trail's events, and its other lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Events per group (an aggregated cache-hit event counts its uses).
    pub rows: BTreeMap<ReportKey, u64>,
    /// Event lines read.
    pub events: u64,
    /// Events the trail's `gap` lines say were lost.
    pub lost: u64,
    /// Lines that are not audit entries (the report skips them; verify
    /// says why).
    pub unreadable: u64,
}

impl Report {
    /// Adds one line of a trail (without its newline).
    pub fn add_line(&mut self, raw: &[u8]) {
        match line::decode(raw) {
            Ok((l, _)) => match l.body {
                Body::Event(e) => self.add_event(&e),
                Body::Gap { lost, .. } => self.lost += lost,
                Body::Header(_) => {}
            },
            Err(_) => self.unreadable += 1,
        }
    }

    /// Adds one event.
    pub fn add_event(&mut self, e: &Event) {
        let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
        let ts = format_timestamp(e.timestamp);
        let key = ReportKey {
            day: ts.get(..10).unwrap_or(&ts).to_owned(),
            key_ref: dash(&e.key_ref),
            actor: dash(&e.actor),
            purpose: dash(&e.purpose),
            operation: e.operation.as_str().to_owned(),
            outcome: e.outcome.as_string(),
        };
        let n = e.uses.map_or(1, |u| u.count.max(1));
        *self.rows.entry(key).or_insert(0) += n;
        self.events += 1;
    }
}

/// The report of the file log whose first file is `path` (and its rotated
/// files).
pub fn report_log(path: impl AsRef<Path>) -> Result<Report, super::checkpoint::CheckpointError> {
    let mut r = Report::default();
    for l in super::checkpoint::log_lines(path.as_ref())? {
        r.add_line(&l);
    }
    Ok(r)
}
