//! Several folders in one maildrop (issue #15 item 1), against a private Dovecot and Cyrus
//! (which can give a new folder INBOX's UIDVALIDITY: the folder tag in later folders'
//! UIDLs is what keeps them apart) with real clients (poplib, curl) and a second IMAP client
//! changing the account meanwhile: INBOX keeps
//! the UIDLs it had before the option was on, byte for byte; Junk is listed after it with
//! UIDLs of its own form; Junk filled while sessions run; a message moved Junk -> INBOX by
//! another client; DELE in Junk applying each deletion mode in Junk; a missing folder and one
//! that vanishes during a session.

mod support;

use support::imap_raw::Imap;
use support::raw::RawPop3 as Raw;
use support::*;

const PW: &str = "fpw";

on_both_servers!(
    inbox_keeps_its_uidls_and_junk_follows_with_its_own,
    a_message_moved_from_junk_to_inbox_by_another_client,
    dele_in_junk_hides_there,
    dele_in_junk_expunges_there,
    dele_in_junk_moves_from_there,
    a_missing_folder_and_one_that_vanishes,
    moved_both_ways_keep_their_uidls_with_objectid,
);
const TWO: &str = "[imap]\nmailboxes = [\"INBOX\", \"Junk\"]\n";

fn msg(tag: &str, i: usize) -> Vec<u8> {
    format!("Subject: {tag} {i}\r\nX-Id: {tag}{i}\r\n\r\nbody of {tag} {i}\r\n").into_bytes()
}

/// APPEND each message to `folder` (created first if `create`).
fn fill<S: MailServer>(dc: &S, user: &str, folder: &str, create: bool, msgs: &[Vec<u8>]) {
    let mut c = Imap::login(dc.imap_port(), user, PW);
    if create {
        c.run(&format!("CREATE {folder}"), &[]);
    }
    for m in msgs {
        c.run(&format!("APPEND {folder}"), m);
    }
    c.run("LOGOUT", &[]);
}

/// The Junk-form UIDL of `uid` in a folder with this UIDVALIDITY (FNV-1a tag of "Junk").
fn junk_uidl(uid: u32, uidvalidity: u32) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in b"Junk" {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{uid:08x}{uidvalidity:08x}~{h:08x}")
}

/// UIDL and RETR of every message, in one poplib session: (UIDL, body) in listing order.
fn download(port: u16, user: &str) -> Vec<(String, Vec<u8>)> {
    let uidls = uidl_list(port, user, PW);
    let mut steps = vec![format!("user {user}"), format!("pass {PW}")];
    for i in 1..=uidls.len() {
        steps.push(format!("retr {i}"));
    }
    steps.push("quit".into());
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    let s = poplib(port, &refs);
    s.assert_all_ok();
    uidls
        .into_iter()
        .enumerate()
        .map(|(i, u)| (u, s.step(&format!("retr {}", i + 1)).data()))
        .collect()
}

fn inbox_keeps_its_uidls_and_junk_follows_with_its_own<S: MailServer>(dc: S) {
    dc.add_user("f1", PW);
    let inbox: Vec<Vec<u8>> = (1..=3).map(|i| msg("inbox", i)).collect();
    let refs: Vec<&[u8]> = inbox.iter().map(Vec::as_slice).collect();
    dc.seed("f1", &refs);
    // Before the option: one folder.
    let before = {
        let pb = Popbridge::start(&dc, "");
        uidl_list(pb.pop3_port(), "f1", PW)
    };
    assert_eq!(before.len(), 3);
    let junk: Vec<Vec<u8>> = (1..=2).map(|i| msg("junk", i)).collect();
    fill(&dc, "f1", "Junk", true, &junk);
    let junk_state = dc.imap_state("f1", PW, "Junk");

    let pb = Popbridge::start(&dc, TWO);
    let port = pb.pop3_port();
    let got = download(port, "f1");
    assert_eq!(got.len(), 5, "INBOX then Junk: {got:?}");
    let uidls: Vec<&str> = got.iter().map(|(u, _)| u.as_str()).collect();
    let distinct: std::collections::HashSet<&str> = uidls.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        5,
        "unique UIDLs, whatever the UIDVALIDITYs: {uidls:?}"
    );
    assert_eq!(
        &uidls[..3],
        &before.iter().map(String::as_str).collect::<Vec<_>>()[..],
        "INBOX UIDLs byte for byte as before the option"
    );
    for (k, uid) in junk_state.uids().into_iter().enumerate() {
        assert_eq!(uidls[3 + k], junk_uidl(uid, junk_state.uidvalidity));
        assert_eq!(got[3 + k].1, junk[k], "Junk message {k}: exact bytes");
    }
    for (k, m) in inbox.iter().enumerate() {
        assert_eq!(&got[k].1, m);
    }
    // curl agrees on the listing.
    let c = curl_pop3(
        &format!("pop3://f1:{PW}@127.0.0.1:{port}/"),
        &["-X", "UIDL"],
    );
    assert_eq!(c.code, 0, "{}", c.stderr);
    let text = String::from_utf8_lossy(&c.stdout).into_owned();
    assert!(text.contains(&format!("5 {}", uidls[4])), "{text}");
    let c = curl_pop3(&format!("pop3://f1:{PW}@127.0.0.1:{port}/4"), &[]);
    assert_eq!(c.stdout, junk[0], "curl RETR 4 is Junk's first message");

    // Junk filled by IMAP while a session runs: that session keeps its listing, the next
    // one lists the new message last, under a new UIDL.
    let mut s = Raw::ready(port);
    s.login("f1", PW);
    assert!(s.cmd("STAT").starts_with("+OK 5 "));
    fill(&dc, "f1", "Junk", false, &[msg("junk", 3)]);
    assert!(s.cmd("STAT").starts_with("+OK 5 "));
    let r = s.cmd("RETR 5");
    assert!(r.starts_with("+OK"), "{r}");
    let body = dot_unstuff((s.multi().concat() + ".\r\n").as_bytes());
    assert_eq!(body, junk[1]);
    // Back to INBOX after Junk: the folder switch is invisible to the client.
    let r = s.cmd("RETR 1");
    assert!(r.starts_with("+OK"), "{r}");
    let body = dot_unstuff((s.multi().concat() + ".\r\n").as_bytes());
    assert_eq!(body, inbox[0]);
    assert!(s.cmd("QUIT").starts_with("+OK"));
    let after = uidl_list(port, "f1", PW);
    assert_eq!(after.len(), 6);
    assert_eq!(
        &after[..5],
        &uidls.iter().map(|u| u.to_string()).collect::<Vec<_>>()[..]
    );
    let junk_state = dc.imap_state("f1", PW, "Junk");
    assert_eq!(
        after[5],
        junk_uidl(*junk_state.uids().last().unwrap(), junk_state.uidvalidity)
    );
    report(&format!(
        "folders: INBOX UIDLs unchanged ({}), Junk UIDLs e.g. {}",
        before[0], after[5]
    ));
}

fn a_message_moved_from_junk_to_inbox_by_another_client<S: MailServer>(dc: S) {
    dc.add_user("f2", PW);
    dc.seed("f2", &[&msg("inbox", 1)]);
    let junk: Vec<Vec<u8>> = (1..=3).map(|i| msg("junk", i)).collect();
    fill(&dc, "f2", "Junk", true, &junk);
    let pb = Popbridge::start(&dc, TWO);
    let port = pb.pop3_port();
    let first = download(port, "f2");
    assert_eq!(first.len(), 4);

    // Moved while a session runs: that session's RETR of it says the message is gone and
    // the session goes on; the next session lists it in INBOX (after INBOX's first), under
    // INBOX's UIDL form, and no longer in Junk.
    let mut s = Raw::ready(port);
    s.login("f2", PW);
    assert!(s.cmd("STAT").starts_with("+OK 4 "));
    let mut c = Imap::login(dc.imap_port(), "f2", PW);
    c.run("SELECT Junk", &[]);
    c.run("UID MOVE 2 INBOX", &[]);
    c.run("LOGOUT", &[]);
    let r = s.cmd("RETR 3");
    assert!(r.starts_with("-ERR") && r.contains("message 3"), "{r}");
    let r = s.cmd("RETR 4");
    assert!(r.starts_with("+OK"), "{r}");
    let body = dot_unstuff((s.multi().concat() + ".\r\n").as_bytes());
    assert_eq!(body, junk[2]);
    assert!(s.cmd("QUIT").starts_with("+OK"));

    let second = download(port, "f2");
    let inbox = dc.imap_state("f2", PW, "INBOX");
    assert_eq!(second.len(), 4);
    assert_eq!(second[0], first[0], "INBOX's first message unchanged");
    assert_eq!(
        second[1].1, junk[1],
        "the moved message is now INBOX's second"
    );
    if offers_objectid(&dc, "f2") {
        assert_eq!(second[1].0, first[2].0, "with OBJECTID it keeps its UIDL");
    } else {
        assert_eq!(
            second[1].0,
            inbox.uidl(inbox.uids()[1]),
            "with INBOX's UIDL form"
        );
        assert_ne!(second[1].0, first[2].0, "without OBJECTID its UIDL changed");
    }
    assert_eq!(second[2], first[1], "Junk's first unchanged");
    assert_eq!(second[3], first[3], "Junk's third unchanged");
}

/// Whether the server offers OBJECTID after login (Cyrus 3.6 does, Dovecot 2.3 does not:
/// checked, so each server runs the branch it should).
fn offers_objectid<S: MailServer>(dc: &S, user: &str) -> bool {
    let mut c = Imap::login(dc.imap_port(), user, PW);
    let caps = c.run("CAPABILITY", &[]).concat();
    c.run("LOGOUT", &[]);
    let offered = caps.split_whitespace().any(|w| w == "OBJECTID");
    assert_eq!(offered, dc.name() == "cyrus", "{}: {caps}", dc.name());
    offered
}

fn dele_in_junk<S: MailServer>(dc: S, mode: &str) {
    let user = "f3";
    dc.add_user(user, PW);
    dc.seed(user, &[&msg("inbox", 1), &msg("inbox", 2)]);
    fill(&dc, user, "Junk", true, &[msg("junk", 1), msg("junk", 2)]);
    let pb = Popbridge::start(&dc, &format!("{TWO}[deletion]\nmode = \"{mode}\"\n"));
    let port = pb.pop3_port();
    // DELE INBOX's 2nd and Junk's 1st (message 3), reading Junk last.
    let s = poplib(
        port,
        &[
            &format!("user {user}"),
            &format!("pass {PW}"),
            "retr 3",
            "dele 2",
            "dele 3",
            "retr 4",
            "quit",
        ],
    );
    s.assert_all_ok();
    let inbox = dc.imap_state(user, PW, "INBOX");
    let junk = dc.imap_state(user, PW, "Junk");
    match mode {
        "hide" => {
            assert!(inbox.message(2).unwrap().has_flag("$POP3Deleted"));
            assert!(!inbox.message(1).unwrap().has_flag("$POP3Deleted"));
            assert!(
                junk.message(1).unwrap().has_flag("$POP3Deleted"),
                "{junk:?}"
            );
            assert!(!junk.message(2).unwrap().has_flag("$POP3Deleted"));
            assert!(
                junk.message(2).unwrap().has_flag("\\Seen"),
                "RETR 4 set \\Seen in Junk"
            );
        }
        "expunge" => {
            assert_eq!(inbox.uids(), vec![1]);
            assert_eq!(junk.uids(), vec![2]);
        }
        "move" => {
            assert_eq!(inbox.uids(), vec![1]);
            assert_eq!(junk.uids(), vec![2]);
            let trash = dc.imap_state(user, PW, "Trash");
            assert_eq!(trash.messages.len(), 2, "both moved to Trash: {trash:?}");
        }
        _ => unreachable!(),
    }
    let left = uidl_list(port, user, PW);
    assert_eq!(left.len(), 2, "{mode}: INBOX 1 and Junk 2 left: {left:?}");
}

fn dele_in_junk_hides_there<S: MailServer>(dc: S) {
    dele_in_junk(dc, "hide");
}

fn dele_in_junk_expunges_there<S: MailServer>(dc: S) {
    dele_in_junk(dc, "expunge");
}

fn dele_in_junk_moves_from_there<S: MailServer>(dc: S) {
    dele_in_junk(dc, "move");
}

fn a_missing_folder_and_one_that_vanishes<S: MailServer>(dc: S) {
    dc.add_user("f4", PW);
    dc.seed("f4", &[&msg("inbox", 1), &msg("inbox", 2)]);
    fill(&dc, "f4", "Junk", true, &[msg("junk", 1)]);
    let pb = Popbridge::start(&dc, "[imap]\nmailboxes = [\"INBOX\", \"Nope\", \"Junk\"]\n");
    let port = pb.pop3_port();
    let got = download(port, "f4");
    assert_eq!(got.len(), 3, "INBOX and Junk served, Nope skipped");
    assert_eq!(got[2].1, msg("junk", 1));
    assert!(
        pb.wait_for_log("cannot be served", std::time::Duration::from_secs(5)),
        "a clear log line: {}",
        pb.log_tail(20)
    );
    let line = pb
        .log()
        .lines()
        .find(|l| l.contains("cannot be served"))
        .unwrap()
        .to_owned();
    assert!(line.contains("Nope"), "names the folder: {line}");

    // Junk deleted by another client during a session: its message reads as gone, INBOX is
    // still served and its deletion committed.
    let mut s = Raw::ready(port);
    s.login("f4", PW);
    assert!(s.cmd("STAT").starts_with("+OK 3 "));
    let mut c = Imap::login(dc.imap_port(), "f4", PW);
    c.run("DELETE Junk", &[]);
    c.run("LOGOUT", &[]);
    let r = s.cmd("RETR 3");
    assert!(r.starts_with("-ERR") && r.contains("message 3"), "{r}");
    let r = s.cmd("RETR 1");
    assert!(r.starts_with("+OK"), "{r}");
    s.multi();
    assert!(s.cmd("DELE 1").starts_with("+OK"));
    let q = s.cmd("QUIT");
    assert!(q.starts_with("+OK"), "{q}");
    assert!(
        pb.log().contains("can no longer be selected"),
        "{}",
        pb.log_tail(20)
    );
    let left = download(port, "f4");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].1, msg("inbox", 2));
}

/// Messages moved Junk -> INBOX and INBOX -> Junk by another IMAP client between sessions.
/// With OBJECTID (Cyrus) each keeps the UIDL it was first listed with, for poplib and curl,
/// and DELE removes it from the folder it is in now; without (Dovecot) the moved ones get
/// the UIDL of where they are (the README's documented behaviour) and the rest is the same.
fn moved_both_ways_keep_their_uidls_with_objectid<S: MailServer>(dc: S) {
    let user = "f5";
    dc.add_user(user, PW);
    let inbox: Vec<Vec<u8>> = (1..=2).map(|i| msg("inbox", i)).collect();
    let junk: Vec<Vec<u8>> = (1..=2).map(|i| msg("junk", i)).collect();
    dc.seed(user, &[&inbox[0], &inbox[1]]);
    fill(&dc, user, "Junk", true, &junk);
    let objectid = offers_objectid(&dc, user);
    let pb = Popbridge::start(
        &dc,
        &format!("{TWO}[deletion]\nmode = \"expunge\"\n[views]\nrecent_days = 30\n"),
    );
    let port = pb.pop3_port();
    let first = download(port, user);
    let bodies: Vec<&[u8]> = first.iter().map(|(_, b)| b.as_slice()).collect();
    assert_eq!(bodies, [&inbox[0], &inbox[1], &junk[0], &junk[1]]);
    let uidl_of = |body: &[u8]| first.iter().find(|(_, b)| b == body).unwrap().0.clone();
    // EMAILIDs are asked for only of new or moved messages: a session with nothing new asks
    // nothing (popbridge's debug log, on unless the environment's RUST_LOG turns it off).
    let asked = |pb: &Popbridge| pb.log().matches("asking the server for EMAILIDs").count();
    let before = asked(&pb);
    assert_eq!(
        before > 0,
        objectid && pb.log().contains("DEBUG"),
        "{}",
        pb.log_tail(30)
    );
    assert_eq!(uidl_list(port, user, PW).len(), 4);
    assert_eq!(asked(&pb), before, "nothing new, nothing asked");

    // Another client moves Junk's first to INBOX and INBOX's first to Junk.
    let (i_state, j_state) = (
        dc.imap_state(user, PW, "INBOX"),
        dc.imap_state(user, PW, "Junk"),
    );
    let mut c = Imap::login(dc.imap_port(), user, PW);
    c.run(&format!("UID MOVE {} Junk", i_state.uids()[0]), &[]);
    c.run("SELECT Junk", &[]);
    c.run(&format!("UID MOVE {} INBOX", j_state.uids()[0]), &[]);
    c.run("LOGOUT", &[]);

    let second = download(port, user);
    let bodies: Vec<&[u8]> = second.iter().map(|(_, b)| b.as_slice()).collect();
    assert_eq!(
        bodies,
        [&inbox[1], &junk[0], &junk[1], &inbox[0]],
        "INBOX then Junk, each where it is now"
    );
    for (uidl, body) in &second {
        let was = uidl_of(body);
        let moved = body == &junk[0] || body == &inbox[0];
        if objectid || !moved {
            assert_eq!(*uidl, was, "{}: same UIDL", String::from_utf8_lossy(body));
        } else {
            assert_ne!(*uidl, was, "without OBJECTID a moved message is new mail");
        }
    }
    // A per-device view (`recent:`) serves the same UIDLs as the normal login.
    let phone = uidl_list(port, &format!("recent:{user}"), PW);
    assert_eq!(
        phone,
        second.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>()
    );
    let distinct: std::collections::HashSet<&String> = second.iter().map(|(u, _)| u).collect();
    assert_eq!(distinct.len(), 4, "unique UIDLs: {second:?}");
    // curl sees the same UIDLs.
    let c = curl_pop3(
        &format!("pop3://{user}:{PW}@127.0.0.1:{port}/"),
        &["-X", "UIDL"],
    );
    assert_eq!(c.code, 0, "{}", c.stderr);
    let text = String::from_utf8_lossy(&c.stdout).into_owned();
    for (k, (uidl, _)) in second.iter().enumerate() {
        assert!(text.contains(&format!("{} {uidl}\r\n", k + 1)), "{text}");
    }
    // A third session lists the same (the map does not drift), and asks no EMAILID: where
    // the moved ones are now was remembered too.
    let before = asked(&pb);
    assert_eq!(download(port, user), second);
    assert_eq!(asked(&pb), before, "moved messages are not asked for again");

    // The state directory lost (it is a cache; or another node of a fleet): the moved
    // messages get the UIDL of where they are, as without OBJECTID, and nothing is lost.
    let mut pb = pb;
    pb.kill();
    std::fs::remove_dir_all(pb.state_dir()).unwrap();
    pb.restart();
    let port = pb.pop3_port();
    let after_loss = download(port, user);
    let (i_now, j_now) = (
        dc.imap_state(user, PW, "INBOX"),
        dc.imap_state(user, PW, "Junk"),
    );
    let expected = vec![
        second[0].clone(),
        (i_now.uidl(i_now.uids()[1]), junk[0].clone()),
        second[2].clone(),
        (
            junk_uidl(j_now.uids()[1], j_now.uidvalidity),
            inbox[0].clone(),
        ),
    ];
    assert_eq!(after_loss, expected);
    let second = after_loss;

    // DELE of both moved messages applies in the folder each is in now.
    let s = poplib(
        port,
        &[
            &format!("user {user}"),
            &format!("pass {PW}"),
            "dele 2",
            "dele 4",
            "quit",
        ],
    );
    s.assert_all_ok();
    let (i_now, j_now) = (
        dc.imap_state(user, PW, "INBOX"),
        dc.imap_state(user, PW, "Junk"),
    );
    assert_eq!(i_now.messages.len(), 1, "{i_now:?}");
    assert_eq!(j_now.messages.len(), 1, "{j_now:?}");
    let left = download(port, user);
    assert_eq!(
        left,
        vec![second[0].clone(), second[2].clone()],
        "INBOX's second and Junk's second left, UIDLs unchanged"
    );
    report(&format!(
        "folders on {}: moved messages {} their UIDL (OBJECTID {})",
        dc.name(),
        if objectid { "keep" } else { "change" },
        if objectid { "offered" } else { "not offered" }
    ));
}
