//! popbridge refuses a POP3 login with `-ERR [SYS/PERM]` when the IMAP server lacks what the
//! configured `[deletion] mode` needs, and works with what is there otherwise. Checked against
//! Dovecots whose advertised capabilities were cut down with `imap_capability` (which replaces
//! the list Dovecot sends, before and after login, but leaves the commands working: so only
//! popbridge's own reading of CAPABILITY keeps it from using them). Every IMAP command
//! popbridge sends after login is read back from Dovecot's rawlog. Dovecot lists its
//! capabilities in the LOGIN answer; a relay that strips them checks the CAPABILITY fallback.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::relay::{Fault, Relay, Trigger};
use support::*;

const USER: &str = "u";
const PW: &str = "pw";

const MSGS: [&[u8]; 3] = [
    b"Subject: one\r\n\r\nfirst\r\n",
    b"Subject: two\r\n\r\nsecond\r\n",
    b"Subject: three\r\n\r\nthird\r\n",
];

/// The base of Dovecot 2.3's default list, without UIDPLUS, MOVE or any other extension.
const CAPS_BARE: &str = "IMAP4rev1 LITERAL+ SASL-IR LOGIN-REFERRALS ID ENABLE IDLE";

/// Starts Dovecot advertising exactly `caps` (plus pre-login STARTTLS/AUTH=), with a rawlog
/// of every post-login IMAP session of USER, who owns MSGS.
fn dovecot_advertising(caps: &str) -> Dovecot {
    let dc = Dovecot::start_with_conf(&format!(
        "imap_capability = {caps}\nrawlog_dir = %h/rawlog\n"
    ));
    dc.add_user(USER, PW);
    // Dovecot writes rawlogs only into a directory that exists (and that `mail` may write).
    let st = Command::new("install")
        .args(["-d", "-o", "mail", "-g", "mail"])
        .arg(rawlog_dir(&dc))
        .status()
        .expect("run install");
    assert!(st.success(), "cannot create the rawlog directory");
    dc.seed(USER, &MSGS);
    dc
}

fn rawlog_dir(dc: &Dovecot) -> PathBuf {
    dc.maildir(USER).join("rawlog")
}

/// The commands of every IMAP session of USER so far (Dovecot's `.in` rawlogs), by rawlog
/// file name, each a list of `TAG COMMAND...` lines without the rawlog timestamps. Waits until
/// `sessions` sessions have logged out (LOGOUT written), so popbridge's last one is complete.
fn imap_sessions(dc: &Dovecot, sessions: usize) -> BTreeMap<String, Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all: BTreeMap<String, Vec<String>> = std::fs::read_dir(rawlog_dir(dc))
            .expect("read rawlog dir")
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "in"))
            .map(|p| {
                let lines = std::fs::read_to_string(&p)
                    .unwrap_or_default()
                    .lines()
                    .map(|l| l.split_once(' ').map_or(l, |(_, cmd)| cmd).to_string())
                    .collect();
                (p.file_name().unwrap().to_string_lossy().into_owned(), lines)
            })
            .collect();
        let done = all
            .values()
            .filter(|s| commands(s).last().is_some_and(|c| c == "LOGOUT"))
            .count();
        if done >= sessions {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "wanted {sessions} finished IMAP sessions in the rawlog, got: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The command names (after the tag, upper-case, `UID X` kept as two words) of `session`.
fn commands(session: &[String]) -> Vec<String> {
    session
        .iter()
        .map(|l| {
            let mut w = l.split(' ').skip(1).map(str::to_ascii_uppercase);
            let first = w.next().unwrap_or_default();
            if first == "UID" {
                format!("UID {}", w.next().unwrap_or_default())
            } else {
                first
            }
        })
        .collect()
}

/// The login is refused with `-ERR [SYS/PERM]`, popbridge logs `why`, nothing after PASS is
/// accepted, popbridge logged out right after LOGIN and the account is untouched.
fn assert_refused(dc: &Dovecot, pb: &Popbridge, why: &str) {
    // Dovecot lists its capabilities in the LOGIN answer, so no CAPABILITY command is needed.
    assert_refused_after(dc, pb, why, &["LOGOUT"]);
}

/// [`assert_refused`], with the commands popbridge sends after LOGIN.
fn assert_refused_after(dc: &Dovecot, pb: &Popbridge, why: &str, after_login: &[&str]) {
    let s = poplib(
        pb.pop3_port(),
        &["user u", "pass pw", "stat", "dele 1", "quit"],
    );
    let pass = s.step("pass pw");
    assert!(!pass.ok, "PASS must be refused: {}", pass.resp);
    assert!(
        pass.resp.starts_with("-ERR [SYS/PERM] "),
        "refusal must carry [SYS/PERM]: {}",
        pass.resp
    );
    // The client gets a generic text; the reason goes to popbridge's log.
    assert!(
        pb.wait_for_log(why, Duration::from_secs(5)),
        "popbridge should log why ({why:?}):\n{}",
        pb.log()
    );
    // Not in TRANSACTION state: whatever follows is refused (or the connection is gone).
    for name in ["stat", "dele 1"] {
        if let Some(step) = s.steps.iter().find(|st| st.step == name) {
            assert!(!step.ok, "{name} after a refused login: {}", step.resp);
        }
    }

    let sessions: Vec<Vec<String>> = imap_sessions(dc, 1).into_values().collect();
    assert_eq!(sessions.len(), 1, "one IMAP login: {sessions:?}");
    // The rawlog starts after LOGIN.
    assert_eq!(
        commands(&sessions[0]),
        after_login,
        "popbridge must stop right after LOGIN: {sessions:?}"
    );

    let imap = dc.imap_state(USER, PW, "INBOX");
    assert_eq!(imap.uids(), vec![1, 2, 3], "mailbox must be unchanged");
    assert!(
        imap.messages.iter().all(|m| m.flags.is_empty()),
        "no flags may change: {:?}",
        imap.messages
    );
    assert_eq!(
        imap.mailboxes.len(),
        1,
        "no folder created: {:?}",
        imap.mailboxes
    );
}

#[test]
fn expunge_mode_is_refused_without_uidplus() {
    let dc = dovecot_advertising(CAPS_BARE);
    let pb = Popbridge::start(&dc, "[deletion]\nmode = \"expunge\"");
    assert_refused(&dc, &pb, "\"expunge\" needs UIDPLUS");
}

#[test]
fn expunge_mode_is_refused_with_move_but_without_uidplus() {
    // MOVE alone is no help to expunge mode: it needs UID EXPUNGE.
    let dc = dovecot_advertising(&format!("{CAPS_BARE} MOVE"));
    let pb = Popbridge::start(&dc, "[deletion]\nmode = \"expunge\"");
    assert_refused(&dc, &pb, "\"expunge\" needs UIDPLUS");
}

/// popbridge in expunge mode, in front of `dc` through a relay that strips the capability
/// codes from the greeting and the LOGIN answer.
fn expunging_behind_capability_stripper(dc: &Dovecot) -> (Popbridge, Relay) {
    let relay = Relay::start(dc.imap_port(), Trigger::Never, Fault::HideCapabilityCodes);
    let pb = Popbridge::start(
        dc,
        &format!(
            "[imap]\nport = {}\n[deletion]\nmode = \"expunge\"",
            relay.port()
        ),
    );
    (pb, relay)
}

/// A server that does not list its capabilities in the LOGIN answer (the relay strips them):
/// popbridge asks with CAPABILITY, and refuses on what that answer lacks.
#[test]
fn expunge_mode_is_refused_without_uidplus_when_asked_with_capability() {
    let dc = dovecot_advertising(CAPS_BARE);
    let (pb, _relay) = expunging_behind_capability_stripper(&dc);
    assert_refused_after(
        &dc,
        &pb,
        "\"expunge\" needs UIDPLUS",
        &["CAPABILITY", "LOGOUT"],
    );
}

/// The same server with UIDPLUS: what CAPABILITY answers is used, and DELE + QUIT expunges.
#[test]
fn capabilities_asked_with_capability_are_used() {
    let dc = dovecot_advertising(&format!("{CAPS_BARE} UIDPLUS"));
    let (pb, _relay) = expunging_behind_capability_stripper(&dc);
    let s = poplib(
        pb.pop3_port(),
        &["user u", "pass pw", "stat", "retr 2", "dele 2", "quit"],
    );
    s.assert_all_ok();
    assert!(
        s.step("stat").resp.starts_with("+OK 3 "),
        "{}",
        s.step("stat").resp
    );
    assert_eq!(s.step("retr 2").data(), MSGS[1]);
    let sessions: Vec<Vec<String>> = imap_sessions(&dc, 1).into_values().collect();
    let cmds = commands(&sessions[0]);
    let at = |name: &str| {
        cmds.iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("no {name} in {cmds:?}"))
    };
    // The rawlog starts after LOGIN.
    assert_eq!(at("CAPABILITY"), 0, "{cmds:?}");
    assert!(at("UID EXPUNGE") > at("UID STORE"), "{cmds:?}");
    assert_eq!(dc.imap_state(USER, PW, "INBOX").uids(), vec![1, 3]);
}

#[test]
fn move_mode_is_refused_without_move_and_uidplus() {
    let dc = dovecot_advertising(CAPS_BARE);
    let pb = Popbridge::start(&dc, "[deletion]\nmode = \"move\"");
    assert_refused(&dc, &pb, "\"move\" needs MOVE or UIDPLUS");
}

#[test]
fn move_mode_with_uidplus_but_no_move_copies_then_expunges() {
    let dc = dovecot_advertising(&format!("{CAPS_BARE} UIDPLUS"));
    let pb = Popbridge::start(&dc, "[deletion]\nmode = \"move\"\nmove_to = \"Trash\"");
    // Another client's \Deleted mark on UID 3 must survive: UID EXPUNGE, not EXPUNGE.
    support::imap_do::imap_do(
        dc.imap_port(),
        USER,
        PW,
        "INBOX",
        &[&["uid", "STORE", "3", "+FLAGS", "(\\Deleted)"]],
    );
    let before = imap_sessions(&dc, 1);

    let s = poplib(pb.pop3_port(), &["user u", "pass pw", "dele 1", "quit"]);
    s.assert_all_ok();
    // popbridge's IMAP session: the one new rawlog (read before imap_state adds its own).
    let mut new: Vec<Vec<String>> = imap_sessions(&dc, before.len() + 1)
        .into_iter()
        .filter(|(name, _)| !before.contains_key(name))
        .map(|(_, cmds)| cmds)
        .collect();
    assert_eq!(
        new.len(),
        1,
        "one IMAP session for one POP3 session: {new:?}"
    );
    let pb_session = commands(&new.remove(0));

    let inbox = dc.imap_state(USER, PW, "INBOX");
    assert_eq!(inbox.uids(), vec![2, 3], "UID 1 must have left INBOX");
    assert!(inbox.message(3).unwrap().has_flag("\\Deleted"));
    let trash = dc.imap_state(USER, PW, "Trash");
    assert_eq!(trash.messages.len(), 1, "Trash: {:?}", trash.messages);
    assert_eq!(trash.messages[0].size, MSGS[0].len() as u64);
    assert!(
        !trash.messages[0].has_flag("\\Deleted"),
        "the copy must not carry the \\Deleted mark: {:?}",
        trash.messages[0].flags
    );

    // How it got there: COPY + STORE \Deleted + UID EXPUNGE, never the unadvertised MOVE.
    assert!(
        !pb_session.iter().any(|c| c == "UID MOVE" || c == "MOVE"),
        "MOVE was not advertised: {pb_session:?}"
    );
    let pos = |name: &str| {
        pb_session
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("no {name} in {pb_session:?}"))
    };
    assert!(
        pos("UID COPY") < pos("UID STORE") && pos("UID STORE") < pos("UID EXPUNGE"),
        "{pb_session:?}"
    );
    assert!(!pb_session.iter().any(|c| c == "EXPUNGE"), "{pb_session:?}");
}

#[test]
fn hide_mode_needs_neither_uidplus_nor_move() {
    let dc = dovecot_advertising(CAPS_BARE);
    let pb = Popbridge::start(&dc, "[deletion]\nmode = \"hide\"");
    let s = poplib(
        pb.pop3_port(),
        &["user u", "pass pw", "stat", "dele 2", "quit"],
    );
    s.assert_all_ok();
    assert!(
        s.step("stat").resp.starts_with("+OK 3 "),
        "{}",
        s.step("stat").resp
    );

    let imap = dc.imap_state(USER, PW, "INBOX");
    assert_eq!(imap.uids(), vec![1, 2, 3], "hide removes nothing upstream");
    assert!(imap.message(2).unwrap().has_flag("$POP3Deleted"));
    assert!(!imap.message(1).unwrap().has_flag("$POP3Deleted"));
    assert!(!imap.message(3).unwrap().has_flag("$POP3Deleted"));

    let s = poplib(pb.pop3_port(), &["user u", "pass pw", "stat", "quit"]);
    s.assert_all_ok();
    assert!(
        s.step("stat").resp.starts_with("+OK 2 "),
        "the hidden message stays hidden: {}",
        s.step("stat").resp
    );
}
