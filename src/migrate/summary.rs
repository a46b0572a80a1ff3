//! What a wave adds up to, as data: the [`Tally`] of users and messages behind the summary at
//! the end, and one JSON object per user ([`user_json`]) for the ISP's own tools
//! (`--report-json`). The binary prints and writes them.

use serde_json::{json, Value};

use super::journal::Class;
use super::report::{ImportReport, UidlsReport, UserOutcome, Verdict, VerifyReport};

/// Reasons listed per user in a JSON line at most (the counts are always whole).
const REASONS: usize = 100;

/// The users and messages of a wave, added up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub clean: usize,
    pub attention: usize,
    pub failed: usize,
    /// Users in flight when the wave was stopped (not recorded: a re-run redoes them).
    pub abandoned: usize,
    /// Users the wave did not start (stopped).
    pub not_started: usize,
    /// Users the journal records as done (skipped).
    pub skipped: usize,
    /// Messages matched by size, by header hash; legacy messages with no match; new-store
    /// messages with no legacy one (`uidls`). Messages compared (`verify`), lines (`import`).
    pub by_size: usize,
    pub by_header: usize,
    pub by_x_uidl: usize,
    pub unmatched_legacy: usize,
    pub unmatched_new: usize,
    pub messages: usize,
    /// Differences a client would notice (`verify`), conflicts (`uidls`, `import`).
    pub differences: usize,
    pub conflicts: usize,
    /// Users tried again after a backend throttled.
    pub retried: usize,
    /// Clean users whose changed UIDLs were accepted (`--accept-changed-uidls`).
    pub accepted: usize,
}

impl Tally {
    /// Users with an outcome.
    pub fn done(&self) -> usize {
        self.clean + self.attention + self.failed
    }

    /// Adds one user's outcome.
    pub fn add<R: Described>(&mut self, outcome: &UserOutcome<R>, class: Class, attempts: u32) {
        match class {
            Class::Clean => self.clean += 1,
            Class::Attention => self.attention += 1,
            Class::Failed => self.failed += 1,
        }
        if attempts > 1 {
            self.retried += 1;
        }
        if let Ok(r) = &outcome.result {
            r.tally(self);
        }
    }
}

/// A job's report, described for the tally and the JSON lines.
pub trait Described {
    /// The counts of the JSON line.
    fn counts(&self) -> Value;
    /// Why the user needs attention, one sentence each.
    fn reasons(&self) -> Vec<String>;
    fn tally(&self, t: &mut Tally);
}

fn verdict(v: Verdict) -> Value {
    match v {
        Verdict::Ok => json!("ok"),
        Verdict::Accepted(n) => json!({ "accepted": n }),
        Verdict::Refused(n) => json!({ "refused": n }),
    }
}

impl Described for UidlsReport {
    fn counts(&self) -> Value {
        json!({
            "legacy": self.legacy,
            "new": self.new,
            "by_size": self.by_size,
            "by_header": self.by_header,
            "by_x_uidl": self.by_x_uidl,
            "unmatched_legacy": self.unmatched_legacy.len(),
            "unmatched_new": self.unmatched_new,
            "duplicates_legacy": self.duplicates.0,
            "duplicates_new": self.duplicates.1,
            "conflicts": self.conflicts.len(),
            "stored": self.stored.to_string(),
            "verdict": verdict(self.verdict),
        })
    }

    fn reasons(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .unmatched_legacy
            .iter()
            .map(|u| format!("legacy UIDL {u} has no match in the new store"))
            .collect();
        out.extend(self.conflicts.iter().map(|c| c.to_string()));
        out
    }

    fn tally(&self, t: &mut Tally) {
        t.by_size += self.by_size;
        t.by_header += self.by_header;
        t.by_x_uidl += self.by_x_uidl;
        t.unmatched_legacy += self.unmatched_legacy.len();
        t.unmatched_new += self.unmatched_new;
        t.messages += self.legacy;
        t.conflicts += self.conflicts.len();
        if let Verdict::Accepted(_) = self.verdict {
            t.accepted += 1;
        }
    }
}

impl Described for VerifyReport {
    fn counts(&self) -> Value {
        json!({
            "legacy": self.legacy_messages,
            "differences": self.differences(),
            "notes": self.notes.len(),
        })
    }

    fn reasons(&self) -> Vec<String> {
        let mut out: Vec<String> = self.size_diffs.iter().map(|d| d.to_string()).collect();
        out.extend(self.diffs.iter().map(|d| d.to_string()));
        out
    }

    fn tally(&self, t: &mut Tally) {
        t.messages += self.legacy_messages;
        t.differences += self.differences();
    }
}

impl Described for ImportReport {
    fn counts(&self) -> Value {
        json!({
            "lines": self.lines,
            "conflicts": self.conflicts.len(),
            "stored": self.stored.to_string(),
            "verdict": verdict(self.verdict),
        })
    }

    fn reasons(&self) -> Vec<String> {
        self.conflicts.iter().map(|c| c.to_string()).collect()
    }

    fn tally(&self, t: &mut Tally) {
        t.messages += self.lines;
        t.conflicts += self.conflicts.len();
        if let Verdict::Accepted(_) = self.verdict {
            t.accepted += 1;
        }
    }
}

/// One user's JSON line (without the line end): `job`, `login`, `outcome` (`clean`,
/// `attention`, `failed`), `attempts`, `counts` (null when the work failed), `reasons` (at
/// most [`REASONS`], `reasons_total` says how many there were), `warnings`, and `error` when
/// the work failed.
pub fn user_json<R: Described>(
    job: &str,
    outcome: &UserOutcome<R>,
    class: Class,
    attempts: u32,
) -> String {
    let (counts, reasons, error) = match &outcome.result {
        Ok(r) => (r.counts(), r.reasons(), None),
        Err(e) => (Value::Null, vec![e.to_string()], Some(e.to_string())),
    };
    let warnings: Vec<String> = outcome.warnings.iter().map(|w| w.to_string()).collect();
    let mut v = json!({
        "job": job,
        "login": outcome.user,
        "outcome": class.as_str(),
        "attempts": attempts,
        "counts": counts,
        "reasons_total": reasons.len(),
        "reasons": reasons.into_iter().take(REASONS).collect::<Vec<_>>(),
        "warnings": warnings,
    });
    if let Some(e) = error {
        v["error"] = json!(e);
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::report::{BackendLogin, LoginsUsed, Stored};
    use crate::migrate::MigrateError;

    fn report() -> UidlsReport {
        UidlsReport {
            logins: LoginsUsed {
                user: "al".into(),
                legacy: None,
                new: BackendLogin {
                    backend: "imap".into(),
                    login: "al".into(),
                },
            },
            legacy: 5,
            new: 4,
            by_size: 3,
            by_header: 1,
            by_x_uidl: 0,
            unmatched_legacy: vec!["X1".into()],
            unmatched_new: 0,
            duplicates: (0, 0),
            conflicts: vec![],
            stored: Stored::Nowhere,
            verdict: Verdict::Refused(1),
        }
    }

    #[test]
    fn json_lines_and_the_tally_count_what_the_reports_say() {
        let o = UserOutcome {
            user: "al".into(),
            warnings: vec![],
            result: Ok(report()),
        };
        let line = user_json("uidls", &o, Class::Attention, 2);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["login"], "al");
        assert_eq!(v["outcome"], "attention");
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["counts"]["by_size"], 3);
        assert_eq!(v["counts"]["verdict"]["refused"], 1);
        assert_eq!(
            v["reasons"][0],
            "legacy UIDL X1 has no match in the new store"
        );
        let mut t = Tally::default();
        t.add(&o, Class::Attention, 2);
        let failed: UserOutcome<UidlsReport> = UserOutcome {
            user: "bo".into(),
            warnings: vec![],
            result: Err(MigrateError::Usage("no credentials".into())),
        };
        t.add(&failed, Class::Failed, 1);
        let v: Value =
            serde_json::from_str(&user_json("uidls", &failed, Class::Failed, 1)).unwrap();
        assert_eq!(v["error"], "no credentials");
        assert!(v["counts"].is_null());
        assert_eq!(
            (
                t.attention,
                t.failed,
                t.by_size,
                t.by_header,
                t.unmatched_legacy
            ),
            (1, 1, 3, 1, 1)
        );
        assert_eq!((t.retried, t.done()), (1, 2));
    }
}
