//! Key-access monitoring (docs/CLI.md, "Monitoring"): the rules file
//! (`--rules`), `backup audit monitor` over a recorded trail, and the live
//! monitor of `--alerts` beside the audit trail of every command.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;

use phi_envelope::events::{EventSink, FanOut};
use phi_envelope::monitor::{
    ActorRate, Alert, AlertSink, DenialBurst, JsonLinesAlerts, KeyManagement, Monitor, NewActor,
    OutsideHours, ReplayStats,
};
use serde_json::{Map, Value};

use crate::{exit, CliError, Global};

/// `backup audit monitor [LOG] [--rules FILE] [--since TIME]`.
#[derive(Args, Debug)]
pub struct MonitorArgs {
    /// The log's first file (or none, with --audit-db)
    #[arg(value_name = "LOG")]
    log: Option<PathBuf>,
    /// The rules and their bounds (a JSON file; docs/CLI.md, "Monitoring")
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Alert only about events from TIME on (YYYY-MM-DD or
    /// YYYY-MM-DDTHH:MM:SSZ, UTC); the rules still learn from the earlier
    /// ones
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
}

/// `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ`.
fn parse_time(text: &str) -> Option<SystemTime> {
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z')?)),
        None => (text, None),
    };
    let num = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    if d.next().is_some() || !(1970..=9999).contains(&y) || !(1..=12).contains(&m) {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=month_days[(m - 1) as usize]).contains(&day) {
        return None;
    }
    let days: u64 = (1970..y)
        .map(|yy| {
            if (yy % 4 == 0 && yy % 100 != 0) || yy % 400 == 0 {
                366
            } else {
                365
            }
        })
        .sum::<u64>()
        + month_days[..(m - 1) as usize].iter().sum::<u64>()
        + (day - 1);
    let secs = match time {
        None => 0,
        Some(t) => {
            let mut p = t.split(':');
            let (h, mi, s) = (num(p.next()?, 2)?, num(p.next()?, 2)?, num(p.next()?, 2)?);
            if p.next().is_some() || h > 23 || mi > 59 || s > 59 {
                return None;
            }
            h * 3600 + mi * 60 + s
        }
    };
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(days * 86_400 + secs))
}

/// The longest rules file read (bytes).
const MAX_RULES_LEN: u64 = 64 * 1024;

/// Which rules run, and their bounds: the rules file, or the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    new_actor: bool,
    /// At most `max` key accesses per actor within the window.
    actor_rate: Option<(usize, Duration)>,
    /// Allowed UTC hours `start..end`.
    outside_hours: Option<(u8, u8)>,
    /// At most `max` refusals within the window.
    denial_burst: Option<(usize, Duration)>,
    key_management: bool,
}

impl Default for Rules {
    /// What runs without a rules file (docs/CLI.md).
    fn default() -> Rules {
        Rules {
            new_actor: true,
            actor_rate: Some((600, Duration::from_secs(60))),
            outside_hours: None,
            denial_burst: Some((5, Duration::from_secs(60))),
            key_management: true,
        }
    }
}

/// A member that is `true`/`false`.
fn flag(name: &str, v: &Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("\"{name}\" must be true or false"))
}

/// The members of a rule's object: exactly `names`, each an integer in
/// `range`; `false` turns the rule off (`None`).
fn bounds<const N: usize>(
    name: &str,
    v: &Value,
    names: [&str; N],
    range: [(u64, u64); N],
) -> Result<Option<[u64; N]>, String> {
    let obj = match v {
        Value::Bool(false) => return Ok(None),
        Value::Object(o) => o,
        _ => {
            return Err(format!(
                "\"{name}\" must be false or an object with {}",
                names.join(" and ")
            ))
        }
    };
    only(obj, &names, &format!("\"{name}\""))?;
    let mut out = [0u64; N];
    for (i, member) in names.iter().enumerate() {
        let (lo, hi) = range[i];
        out[i] = obj
            .get(*member)
            .ok_or_else(|| format!("\"{name}\" needs \"{member}\""))?
            .as_u64()
            .filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| {
                format!("\"{name}\".\"{member}\" must be an integer from {lo} to {hi}")
            })?;
    }
    Ok(Some(out))
}

/// Refuses a member of `obj` not in `allowed`.
fn only(obj: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<(), String> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "unknown member \"{k}\" in {what} (known: {})",
            allowed.join(", ")
        )),
        None => Ok(()),
    }
}

/// A day, the longest window.
const MAX_WINDOW_SECS: u64 = 86_400;

impl Rules {
    /// Parses a rules file: a JSON object whose members (each optional)
    /// change the defaults; anything else is refused.
    pub fn parse(text: &str) -> Result<Rules, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("the rules must be a JSON object")?;
        only(
            obj,
            &[
                "new_actor",
                "actor_rate",
                "outside_hours",
                "denial_burst",
                "key_management",
            ],
            "the rules",
        )?;
        let mut r = Rules::default();
        let window = |b: [u64; 2]| (b[0] as usize, Duration::from_secs(b[1]));
        let rate = [(0, u32::MAX as u64), (1, MAX_WINDOW_SECS)];
        for (name, v) in obj {
            match name.as_str() {
                "new_actor" => r.new_actor = flag(name, v)?,
                "key_management" => r.key_management = flag(name, v)?,
                "actor_rate" => {
                    r.actor_rate = bounds(name, v, ["max", "window_secs"], rate)?.map(window)
                }
                "denial_burst" => {
                    r.denial_burst = bounds(name, v, ["max", "window_secs"], rate)?.map(window)
                }
                "outside_hours" => {
                    r.outside_hours = bounds(name, v, ["start", "end"], [(0, 24), (0, 24)])?
                        .map(|[s, e]| (s as u8, e as u8))
                }
                // The members were checked above; an error, not a panic,
                // should that list and this one ever part.
                other => return Err(format!("the rules: unknown member {other:?}")),
            }
        }
        Ok(r)
    }

    /// The rules file at `path`.
    fn load(path: &Path) -> Result<Rules, CliError> {
        use std::io::Read;
        let mut text = String::new();
        fs::File::open(path)
            .and_then(|f| f.take(MAX_RULES_LEN + 1).read_to_string(&mut text))
            .map_err(|e| CliError::from_io(e, path))?;
        if text.len() as u64 > MAX_RULES_LEN {
            return Err(CliError::usage(format!(
                "the rules file {} is longer than {MAX_RULES_LEN} bytes",
                path.display()
            )));
        }
        Rules::parse(&text).map_err(|e| {
            CliError::usage(format!(
                "the rules file {}: {e} (docs/CLI.md, \"Monitoring\")",
                path.display()
            ))
        })
    }

    /// A monitor running these rules into `alerts`.
    fn monitor(&self, alerts: Arc<dyn AlertSink>) -> Monitor {
        let mut m = Monitor::new(alerts);
        if self.new_actor {
            m = m.rule(NewActor::new());
        }
        if let Some((max, window)) = self.actor_rate {
            m = m.rule(ActorRate::new(max, window));
        }
        if let Some((start, end)) = self.outside_hours {
            m = m.rule(OutsideHours::new(start, end));
        }
        if let Some((max, window)) = self.denial_burst {
            m = m.rule(DenialBurst::new(max, window));
        }
        if self.key_management {
            m = m.rule(KeyManagement);
        }
        m
    }
}

/// Alerts on stdout, one JSON object a line.
#[derive(Debug)]
struct StdoutAlerts;

impl AlertSink for StdoutAlerts {
    fn alert(&self, alert: &Alert) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", alert.to_json()).and_then(|()| out.flush());
    }
}

/// The alerts file of `--alerts` (appended, mode 0600).
fn alerts_file(path: &Path) -> Result<Arc<dyn AlertSink>, CliError> {
    let sink = JsonLinesAlerts::open(path).map_err(|e| {
        CliError::new(
            exit::IO,
            format!("cannot open the alerts file {}: {e}", path.display()),
        )
    })?;
    Ok(Arc::new(sink))
}

/// `backup audit monitor`: the trail (LOG, or the table of `--audit-db`)
/// through the rules; alerts to `--alerts` (a file, or `-` and by default
/// stdout). Exit 7 when any alert fired.
pub fn run(g: &Global, args: MonitorArgs) -> Result<(), CliError> {
    let rules = match &args.rules {
        Some(p) => Rules::load(p)?,
        None => Rules::default(),
    };
    let since = match &args.since {
        Some(t) => Some(parse_time(t).ok_or_else(|| {
            CliError::usage(format!(
                "--since {t:?}: give YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)"
            ))
        })?),
        None => None,
    };
    let sink: Arc<dyn AlertSink> = match &g.alerts {
        Some(p) if p.as_os_str() != "-" => alerts_file(p)?,
        _ => Arc::new(StdoutAlerts),
    };
    let mut monitor = rules.monitor(sink);
    if let Some(t) = since {
        monitor = monitor.alert_from(t);
    }
    let monitor = Arc::new(monitor);
    let err = |e: &dyn std::fmt::Display| CliError::new(exit::AUDIT, e.to_string());
    let stats = match (&args.log, &g.audit_db) {
        (Some(log), _) => monitor.replay_log(log).map_err(|e| err(&e))?,
        (None, Some(url)) => replay_db(url, monitor)?,
        (None, None) => {
            return Err(CliError::usage(
                "audit monitor needs a LOG file or --audit-db URL".into(),
            ))
        }
    };
    // Alerts are the answer, on stdout or in the file; the summary and
    // exit 7 say that there are some.
    if stats.alerts > 0 {
        return Err(CliError::new(
            exit::ALERTS,
            format!("audit monitor: {}", summary(&stats)),
        ));
    }
    if !g.quiet {
        eprintln!("audit monitor: {}", summary(&stats));
    }
    Ok(())
}

/// What a replay read, for a person.
fn summary(s: &ReplayStats) -> String {
    let mut out = format!(
        "{} event(s) read, {} alert(s) (lines read as they are: run audit verify for evidence)",
        s.events, s.alerts
    );
    if s.lost > 0 {
        out.push_str(&format!(
            "; {} event(s) recorded as lost (gap lines) were never seen by the rules",
            s.lost
        ));
    }
    if s.unreadable > 0 {
        out.push_str(&format!("; {} unreadable line(s) skipped", s.unreadable));
    }
    out
}

#[cfg(feature = "postgres")]
fn replay_db(url: &str, monitor: Arc<Monitor>) -> Result<ReplayStats, CliError> {
    phi_envelope::audit::postgres::replay(url, monitor)
        .map_err(|e| CliError::new(exit::AUDIT, e.to_string()))
}

#[cfg(not(feature = "postgres"))]
fn replay_db(_url: &str, _monitor: Arc<Monitor>) -> Result<ReplayStats, CliError> {
    Err(CliError::usage(
        "this build has no PostgreSQL audit trail (build with --features postgres)".into(),
    ))
}

/// The keyring's event sink with the live monitor of `--alerts` beside
/// `trail` (the audit sink, if any): the default rules but `new-actor`
/// (a command knows no earlier use, so every actor would be new), their
/// alerts appended to the file.
pub fn live_sink(
    g: &Global,
    trail: Option<Arc<dyn EventSink>>,
) -> Result<Option<Arc<dyn EventSink>>, CliError> {
    let Some(path) = &g.alerts else {
        return Ok(trail);
    };
    if path.as_os_str() == "-" {
        return Err(CliError::usage(
            "--alerts - (stdout) is for audit monitor; a command's live alerts go to a file".into(),
        ));
    }
    let rules = Rules {
        new_actor: false,
        ..Rules::default()
    };
    let monitor: Arc<dyn EventSink> = Arc::new(rules.monitor(alerts_file(path)?));
    Ok(Some(match trail {
        Some(t) => Arc::new(FanOut(vec![t, monitor])),
        None => monitor,
    }))
}
