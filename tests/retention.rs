//! Retention of hidden mail (issue #15 item 3), against a private Dovecot and Cyrus: mail APPENDed with
//! old and new INTERNALDATEs, hidden or not (and one another client flagged `\Deleted`), then
//! a POP3 session (poplib) that QUITs. Hidden and old is removed (expunged, or moved to Trash),
//! in every served folder; hidden and new, and everything not hidden, is untouched; the
//! removals are bounded per commit and counted in `popbridge_retention_removed_total`.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::imap_raw::Imap;
use support::relay::{Fault, Relay, Trigger};
use support::*;

const PW: &str = "rpw";
const OLD: &str = "01-Jan-2020 10:00:00 +0000";

on_both_servers!(
    hidden_old_mail_is_expunged_and_nothing_else,
    hidden_old_mail_is_moved_to_trash,
    retention_is_bounded_per_commit,
    a_message_unhidden_after_the_search_is_left_alone,
);

fn msg(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nX-Id: {tag}\r\n\r\nbody {tag}\r\n").into_bytes()
}

/// APPEND `tag`'s message to `folder` with these flags and, if given, this INTERNALDATE.
fn append(c: &mut Imap, folder: &str, tag: &str, flags: &str, date: Option<&str>) {
    let date = date.map(|d| format!(" \"{d}\"")).unwrap_or_default();
    c.run(&format!("APPEND {folder} ({flags}){date}"), &msg(tag));
}

/// The X-Id of every message of `folder`, with whether it is hidden.
fn ids(c: &mut Imap, folder: &str) -> Vec<(String, bool)> {
    c.run(&format!("EXAMINE {folder}"), &[]);
    let lines = c.run("UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (X-Id)])", &[]);
    let mut out = Vec::new();
    let mut hidden = false;
    for l in lines {
        if l.starts_with("* ") && l.contains("FETCH") {
            hidden = l.contains("$POP3Deleted");
        } else if let Some(id) = l.strip_prefix("X-Id: ") {
            out.push((id.trim().to_owned(), hidden));
        }
    }
    out.sort();
    out
}

fn metric(port: u16, series: &str) -> f64 {
    let out = Command::new("curl")
        .args(["-sS", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

fn quit_session(port: u16, user: &str) {
    let s = poplib(
        port,
        &[
            &format!("user {user}"),
            &format!("pass {PW}"),
            "list",
            "quit",
        ],
    );
    s.assert_all_ok();
}

fn start<S: MailServer>(dc: &S, extra: &str) -> (Popbridge, u16) {
    let mport = free_ports(1)[0];
    let pb = Popbridge::start(
        dc,
        &format!(
            "[imap]\nmailboxes = [\"INBOX\", \"Junk\"]\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\n{extra}"
        ),
    );
    (pb, mport)
}

/// The user must exist already (users are added before any login: Dovecot may not see a
/// passwd-file change made within the second of its previous read).
fn seed<S: MailServer>(dc: &S, user: &str) -> Imap {
    let mut c = Imap::login(dc.imap_port(), user, PW);
    c.run("CREATE Junk", &[]);
    append(&mut c, "INBOX", "hidden-old", "$POP3Deleted", Some(OLD));
    append(&mut c, "INBOX", "hidden-new", "$POP3Deleted", None);
    append(&mut c, "INBOX", "plain-old", "", Some(OLD));
    // Another client's \Deleted mail, not hidden: retention must not expunge it.
    append(&mut c, "INBOX", "deleted-old", "\\Deleted", Some(OLD));
    append(&mut c, "INBOX", "seen-old", "\\Seen", Some(OLD));
    append(
        &mut c,
        "Junk",
        "junk-hidden-old",
        "$POP3Deleted \\Seen",
        Some(OLD),
    );
    append(&mut c, "Junk", "junk-plain-old", "", Some(OLD));
    c
}

fn kept_inbox() -> Vec<(String, bool)> {
    let mut v = vec![
        ("deleted-old".to_owned(), false),
        ("hidden-new".to_owned(), true),
        ("plain-old".to_owned(), false),
        ("seen-old".to_owned(), false),
    ];
    v.sort();
    v
}

fn hidden_old_mail_is_expunged_and_nothing_else<S: MailServer>(dc: S) {
    dc.add_user("r1", PW);
    dc.add_user("r2", PW);
    let mut c = seed(&dc, "r1");
    let (pb, mport) = start(&dc, "[deletion]\nretention_days = 30\n");
    assert_eq!(
        metric(
            mport,
            "popbridge_retention_removed_total{action=\"expunge\"}"
        ),
        0.0
    );
    quit_session(pb.pop3_port(), "r1");
    assert_eq!(ids(&mut c, "INBOX"), kept_inbox());
    assert_eq!(
        ids(&mut c, "Junk"),
        vec![("junk-plain-old".to_owned(), false)]
    );
    assert_eq!(
        metric(
            mport,
            "popbridge_retention_removed_total{action=\"expunge\"}"
        ),
        2.0
    );
    assert!(
        pb.log().contains("retention removed hidden mail"),
        "{}",
        pb.log_tail(20)
    );
    // A second commit finds nothing more to do.
    quit_session(pb.pop3_port(), "r1");
    assert_eq!(ids(&mut c, "INBOX"), kept_inbox());
    assert_eq!(
        metric(
            mport,
            "popbridge_retention_removed_total{action=\"expunge\"}"
        ),
        2.0
    );
    // Without retention nothing hidden is ever removed (the default).
    let mut c2 = seed(&dc, "r2");
    let (pb2, _) = start(&dc, "");
    quit_session(pb2.pop3_port(), "r2");
    assert_eq!(ids(&mut c2, "INBOX").len(), 5);
    assert_eq!(ids(&mut c2, "Junk").len(), 2);
}

fn hidden_old_mail_is_moved_to_trash<S: MailServer>(dc: S) {
    dc.add_user("r3", PW);
    let mut c = seed(&dc, "r3");
    let (pb, mport) = start(
        &dc,
        "[deletion]\nretention_days = 30\nretention_action = \"move\"\n",
    );
    quit_session(pb.pop3_port(), "r3");
    assert_eq!(ids(&mut c, "INBOX"), kept_inbox());
    assert_eq!(
        ids(&mut c, "Junk"),
        vec![("junk-plain-old".to_owned(), false)]
    );
    let trash = ids(&mut c, "Trash");
    assert_eq!(
        trash,
        vec![
            ("hidden-old".to_owned(), true),
            ("junk-hidden-old".to_owned(), true)
        ]
    );
    assert_eq!(
        metric(mport, "popbridge_retention_removed_total{action=\"move\"}"),
        2.0
    );
}

fn retention_is_bounded_per_commit<S: MailServer>(dc: S) {
    dc.add_user("r4", PW);
    let mut c = Imap::login(dc.imap_port(), "r4", PW);
    for i in 0..13 {
        append(
            &mut c,
            "INBOX",
            &format!("h{i:02}"),
            "$POP3Deleted",
            Some(OLD),
        );
    }
    append(&mut c, "INBOX", "visible", "", Some(OLD));
    // retention_batch = 1: ten batches of one UID per folder and commit.
    let (pb, mport) = start(&dc, "[deletion]\nretention_days = 1\nretention_batch = 1\n");
    quit_session(pb.pop3_port(), "r4");
    assert_eq!(ids(&mut c, "INBOX").len(), 4, "13 hidden - 10 + visible");
    assert_eq!(
        metric(
            mport,
            "popbridge_retention_removed_total{action=\"expunge\"}"
        ),
        10.0
    );
    quit_session(pb.pop3_port(), "r4");
    assert_eq!(ids(&mut c, "INBOX"), vec![("visible".to_owned(), false)]);
    assert_eq!(
        metric(
            mport,
            "popbridge_retention_removed_total{action=\"expunge\"}"
        ),
        13.0
    );
}

/// The window between retention's SEARCH and its removal: another client un-hides a message
/// after the server answered the SEARCH (the relay holds that answer 2 s) and before
/// popbridge's STORE. With CONDSTORE (both servers offer it) the STORE carries
/// UNCHANGEDSINCE, the server names the message in [MODIFIED], and it stays, not hidden;
/// the other hidden, old message is removed. For both actions.
fn a_message_unhidden_after_the_search_is_left_alone<S: MailServer>(dc: S) {
    let cases = [("r7", "expunge"), ("r8", "move")];
    for (user, _) in cases {
        dc.add_user(user, PW);
    }
    for (user, action) in cases {
        let mut c = Imap::login(dc.imap_port(), user, PW);
        append(&mut c, "INBOX", "unhidden", "$POP3Deleted", Some(OLD));
        append(&mut c, "INBOX", "goes", "$POP3Deleted", Some(OLD));
        let relay = Relay::start(
            dc.imap_port(),
            Trigger::ClientSends("BEFORE".into()),
            Fault::Delay(Duration::from_secs(2)),
        );
        let pb = Popbridge::start(
            &dc,
            &format!(
                "[imap]\nport = {}\n[deletion]\nretention_days = 30\nretention_action = \"{action}\"\n",
                relay.port()
            ),
        );
        let port = pb.pop3_port();
        let session = std::thread::spawn(move || quit_session(port, user));
        let deadline = Instant::now() + Duration::from_secs(20);
        while relay.fired() == 0 {
            assert!(
                Instant::now() < deadline,
                "{action}: retention's SEARCH never came: {}",
                pb.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The SEARCH was answered (its answer is held in the relay): un-hide `unhidden`.
        c.run("SELECT INBOX", &[]);
        c.run("UID STORE 1 -FLAGS.SILENT ($POP3Deleted)", &[]);
        session.join().expect("the POP3 session");
        assert_eq!(
            ids(&mut c, "INBOX"),
            vec![("unhidden".to_owned(), false)],
            "{action}: {}",
            pb.log_tail(20)
        );
        if action == "move" {
            assert_eq!(
                ids(&mut c, "Trash"),
                vec![("goes".to_owned(), true)],
                "{action}"
            );
        }
        assert!(
            pb.log().contains("changed since the search are left alone"),
            "{action}: {}",
            pb.log_tail(20)
        );
    }
}
