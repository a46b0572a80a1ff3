//! How `popbridge migrate` prints the reports the library returns: one line per user on
//! stdout (and lines naming logins, unmatched UIDLs, conflicts), `note` and `DIFF` lines for
//! verify; warnings on stderr.

use popbridge::migrate::report::{
    ImportReport, LoginsUsed, SizeDiff, UidlsReport, UserOutcome, Verdict, VerifyReport, Warning,
};

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
        Verdict::Refused(n) => format!("REFUSED: {n} messages would show a changed UIDL (nothing stored; --accept-changed-uidls to store anyway)"),
    };
    println!(
        "user {}: legacy {}, new {}; matched {} ({} by size, {} by header); unmatched legacy {}, unmatched new {}; duplicates {}/{}; conflicts {}; stored {}; {verdict}",
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

/// Before `migrate verify` runs: the logins it uses.
pub fn verify_logins(l: &LoginsUsed) {
    logins(l);
}

/// During `migrate verify`: a message popbridge lists with another size than it delivers.
pub fn verify_size_diff(user: &str, d: &SizeDiff) {
    println!("DIFF {user}: {d}");
}

/// After `migrate verify`: notes, differences (the size differences were printed as found)
/// and the verdict; true when clean.
pub fn verify_report(r: &VerifyReport) -> bool {
    let user = &r.logins.user;
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
