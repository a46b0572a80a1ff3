//! How `popbridge migrate` prints the reports the library returns: one line per user on
//! stdout (and lines naming logins, unmatched UIDLs, conflicts), `note` and `DIFF` lines for
//! verify; warnings on stderr.

use std::time::Duration;

use popbridge::migrate::report::{
    ImportReport, LoginsUsed, UidlsReport, UserOutcome, Verdict, VerifyReport, Warning,
};
use popbridge::migrate::summary::Tally;

/// At most this many unmatched UIDLs and conflicts are listed per user.
const LISTED: usize = 20;

pub fn warning(w: &Warning) {
    eprintln!("popbridge migrate: warning: {w}");
}

/// A line naming the logins used, when they differ from the client login.
fn logins(l: &LoginsUsed) {
    let parts: Vec<String> = l
        .differing()
        .iter()
        .map(|b| format!("{} as {}", b.backend, b.login))
        .collect();
    if !parts.is_empty() {
        println!("  user {}: logged in to {}", l.user, parts.join(", "));
    }
}

/// Prints one user of a `migrate uidls` wave; true when the user needs no attention.
pub fn uidls_user(o: &UserOutcome<UidlsReport>) -> bool {
    o.warnings.iter().for_each(warning);
    let r = match &o.result {
        Ok(r) => r,
        Err(e) => {
            println!("user {}: FAILED: {e}", o.user);
            return false;
        }
    };
    let verdict = match r.verdict {
        Verdict::Ok => "ok".to_string(),
        Verdict::Accepted(n) => format!("{n} changed UIDLs accepted"),
        Verdict::Refused(n) => format!("REFUSED: {n} messages would show a changed UIDL or have no counterpart (nothing stored; see --legacy-without-copy, --new-without-legacy, --accept-changed-uidls)"),
    };
    let x = if r.by_x_uidl > 0 {
        format!(", {} by X-UIDL", r.by_x_uidl)
    } else {
        String::new()
    };
    println!(
        "user {}: legacy {}, new {}; matched {} ({} by size, {} by header{x}); unmatched legacy {}, unmatched new {}; duplicates {}/{}; conflicts {}; stored {}; {verdict}",
        o.user,
        r.legacy,
        r.new,
        r.matched(),
        r.by_size,
        r.by_header,
        r.unmatched_legacy.len(),
        r.unmatched_new,
        r.duplicates.0,
        r.duplicates.1,
        r.conflicts.len(),
        r.stored,
    );
    logins(&r.logins);
    for u in r.unmatched_legacy.iter().take(LISTED) {
        println!(
            "  user {}: legacy UIDL {u} has no match in the new store",
            o.user
        );
    }
    if r.unmatched_new > 0 {
        println!(
            "  user {}: {} new-store messages have no legacy message (served as new mail if stored)",
            o.user, r.unmatched_new
        );
    }
    for c in r.conflicts.iter().take(LISTED) {
        println!("  user {}: {c}", o.user);
    }
    !matches!(r.verdict, Verdict::Refused(_))
}

/// Prints one user of `migrate import`; true when the user needs no attention.
pub fn import_user(o: &UserOutcome<ImportReport>) -> bool {
    o.warnings.iter().for_each(warning);
    let (user, r) = match &o.result {
        Ok(r) => (&o.user, r),
        Err(e) => {
            println!("user {}: FAILED: {e}", o.user);
            return false;
        }
    };
    let verdict = match r.verdict {
        Verdict::Ok => "ok".to_string(),
        Verdict::Accepted(n) => format!("{n} conflicts accepted"),
        Verdict::Refused(n) => {
            format!("REFUSED: {n} lines would change an existing mapping (nothing stored)")
        }
    };
    println!(
        "user {user}: imported {} lines; conflicts {}; stored {}; {verdict}",
        r.lines,
        r.conflicts.len(),
        r.stored
    );
    logins(&r.logins);
    for c in r.conflicts.iter().take(LISTED) {
        println!("  user {user}: {c}");
    }
    !matches!(r.verdict, Verdict::Refused(_))
}

/// Prints one user of `migrate verify`: the logins used, messages popbridge lists with
/// another size than it delivers, notes, differences and the verdict; true when clean.
pub fn verify_user(o: &UserOutcome<VerifyReport>) -> bool {
    o.warnings.iter().for_each(warning);
    let r = match &o.result {
        Ok(r) => r,
        Err(e) => {
            println!("verify {}: FAILED: {e}", o.user);
            return false;
        }
    };
    let user = &r.logins.user;
    logins(&r.logins);
    for d in &r.size_diffs {
        println!("DIFF {user}: {d}");
    }
    for n in &r.notes {
        println!("note {user}: {n}");
    }
    for d in &r.diffs {
        println!("DIFF {user}: {d}");
    }
    if r.clean() {
        println!(
            "verify {user}: clean ({} messages, same UIDLs and bytes)",
            r.legacy_messages
        );
    } else {
        println!("verify {user}: {} differences", r.differences());
    }
    r.clean()
}

/// The summary at the end of a wave: users clean, needing attention, failed (and skipped,
/// abandoned, not started), messages by how they were matched, time and rate.
pub fn summary(job: &str, t: &Tally, took: Duration, clock: &str) {
    let secs = took.as_secs_f64();
    let rate = if secs > 0.0 {
        t.done() as f64 / secs
    } else {
        0.0
    };
    println!(
        "summary {job}: {} users: {} clean ({} with changed UIDLs accepted), {} need attention, {} failed; {} skipped (done before), {} abandoned, {} not started; {} retried after throttling",
        t.done() + t.skipped + t.abandoned + t.not_started,
        t.clean,
        t.accepted,
        t.attention,
        t.failed,
        t.skipped,
        t.abandoned,
        t.not_started,
        t.retried,
    );
    match job {
        "uidls" => println!(
            "summary {job}: messages: {} legacy, {} matched by size, {} by header, {} by X-UIDL, {} legacy unmatched, {} new unmatched; {} conflicts",
            t.messages, t.by_size, t.by_header, t.by_x_uidl, t.unmatched_legacy, t.unmatched_new, t.conflicts
        ),
        "verify" => println!(
            "summary {job}: messages: {} legacy compared, {} differences",
            t.messages, t.differences
        ),
        _ => println!(
            "summary {job}: lines: {} imported, {} conflicts",
            t.messages, t.conflicts
        ),
    }
    println!("summary {job}: time {clock} ({secs:.2} s), {rate:.1} users/s");
}
