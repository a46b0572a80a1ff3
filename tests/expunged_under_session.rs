//! Another IMAP client removes mail while a POP3 session runs, at the moments that used to hurt:
//! right after the listing (before the server told popbridge's session of the expunge), while
//! the message is read ahead in the same FETCH as an earlier one, and while it is prefetched
//! behind the previous RETR. Every RETR/TOP then answers the exact bytes of the message the
//! session listed or `-ERR` naming it, and the session goes on; a QUIT whose marks include a
//! message someone else expunged still applies the others. Against Dovecot (which answers such
//! a FETCH with `BODY[] NIL` and `[EXPUNGEISSUED]`) and Cyrus (which serves the message until
//! the session is told). Raw sockets: the test needs exact control over when what is sent.

mod support;

use std::time::Duration;

use support::imap_do::imap_do;
use support::raw::RawPop3 as Raw;
use support::relay::{Fault, Relay, Trigger};
use support::*;

on_both_servers!(
    retr_and_top_right_after_another_client_expunged,
    messages_read_ahead_or_prefetched_then_expunged,
    quit_commits_the_marks_that_still_exist_in_every_mode,
    previews_from_a_window_asked_for_ahead_then_expunged,
    pending_fetches_of_a_distant_server_then_expunged,
);

fn message(i: usize) -> Vec<u8> {
    // Long enough for TOP to have something to cut, dot lines for the stuffer; from 9 on
    // too big to be read ahead (popbridge streams those alone, and prefetches them).
    let mut m = format!("Subject: {i}\r\nX-Model-Id: m{i}\r\n\r\n").into_bytes();
    let lines = if i >= 9 { 9000 } else { 40 };
    for l in 0..lines {
        m.extend_from_slice(format!("line {l} of message {i}\r\n").as_bytes());
        if l % 9 == 0 {
            m.extend_from_slice(b".dot line\r\n");
        }
    }
    m
}

fn setup<S: MailServer>(dc: &S, n: usize, extra: &str) -> Popbridge {
    dc.add_user("e", "epw");
    let msgs: Vec<Vec<u8>> = (1..=n).map(message).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    dc.seed("e", &refs);
    Popbridge::start(dc, extra)
}

/// Expunge UIDs through another IMAP client (UID STORE \Deleted + UID EXPUNGE).
fn expunge<S: MailServer>(dc: &S, uids: &str) {
    imap_do(
        dc.imap_port(),
        "e",
        "epw",
        "INBOX",
        &[
            &["uid", "STORE", uids, "+FLAGS", "(\\Deleted)"],
            &["uid", "EXPUNGE", uids],
        ],
    );
}

/// The answer to RETR/TOP `cmd` of message `i` is `-ERR` naming it, or `+OK` with exactly
/// `expected` (dot-stuffed on the wire); returns whether it was served.
fn exact_or_err(c: &mut Raw, cmd: &str, i: usize, expected: &[u8]) -> bool {
    let status = c.cmd(cmd);
    if status.starts_with("-ERR") {
        assert!(
            status.contains(&format!("message {i} ")),
            "{cmd}: the -ERR names the message: {status:?}"
        );
        return false;
    }
    assert!(status.starts_with("+OK"), "{cmd}: {status:?}");
    let got = dot_unstuff((c.multi().concat() + ".\r\n").as_bytes());
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected),
        "{cmd}: the bytes of message {i}, exactly"
    );
    true
}

fn retr_and_top_right_after_another_client_expunged<S: MailServer>(dc: S) {
    let pb = setup(&dc, 8, "");
    let mut c = Raw::ready(pb.pop3_port());
    c.login("e", "epw");
    assert!(c.cmd("STAT").starts_with("+OK 8 "));
    // The recipe: TOP 5 0, RETR 6, then another client expunges 5; 0.2 s later RETR 5.
    assert!(exact_or_err(
        &mut c,
        "TOP 5 0",
        5,
        &expected_top(&message(5), 0)
    ));
    assert!(exact_or_err(&mut c, "RETR 6", 6, &message(6)));
    expunge(&dc, "5,7");
    std::thread::sleep(Duration::from_millis(200));
    let mut served = 0;
    served += exact_or_err(&mut c, "RETR 5", 5, &message(5)) as u32;
    served += exact_or_err(&mut c, "TOP 5 0", 5, &expected_top(&message(5), 0)) as u32;
    served += exact_or_err(&mut c, "TOP 7 3", 7, &expected_top(&message(7), 3)) as u32;
    served += exact_or_err(&mut c, "RETR 7", 7, &message(7)) as u32;
    // Untouched messages are served whole, and the numbering never moved.
    for i in [8, 1, 6] {
        assert!(exact_or_err(&mut c, &format!("RETR {i}"), i, &message(i)));
    }
    assert!(c.cmd("STAT").starts_with("+OK 8 "), "the listing is fixed");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    report(&format!(
        "expunged right after the listing ({}): {served} of 4 answers served the listed bytes, the rest -ERR",
        std::any::type_name::<S>().rsplit("::").next().unwrap_or("?")
    ));
    let next = poplib(pb.pop3_port(), &["user e", "pass epw", "stat", "quit"]);
    next.assert_all_ok();
    assert!(
        next.step("stat").resp.starts_with("+OK 6 "),
        "5 and 7 are gone"
    );
}

fn messages_read_ahead_or_prefetched_then_expunged<S: MailServer>(dc: S) {
    // 1-8 small (read ahead several per FETCH), 9-12 big (streamed, prefetched one by one).
    dc.add_user("e", "epw");
    let msgs: Vec<Vec<u8>> = (1..=12).map(message).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    dc.seed("e", &refs);
    let pb = Popbridge::start(&dc, "");
    let mut c = Raw::ready(pb.pop3_port());
    c.login("e", "epw");
    // Gone before anything was fetched: the FETCH after RETR 1 reads 2-8 ahead, 3 and 4 among
    // them, for which Dovecot sends `BODY[] NIL`.
    expunge(&dc, "3,4");
    for i in 1..=9 {
        let served = exact_or_err(&mut c, &format!("RETR {i}"), i, &message(i));
        assert!(served || i == 3 || i == 4, "message {i} was never touched");
    }
    // RETR 9 was handed out, so the FETCH of 10 is on its way (prefetch); 11 and 12 are not.
    expunge(&dc, "10,11");
    for i in 10..=12 {
        let served = exact_or_err(&mut c, &format!("RETR {i}"), i, &message(i));
        assert!(served || i != 12, "message {i} was never touched");
    }
    // A TOP of a message gone is -ERR (never an empty +OK), and the session goes on.
    exact_or_err(&mut c, "TOP 11 2", 11, &expected_top(&message(11), 2));
    assert!(exact_or_err(
        &mut c,
        "TOP 12 2",
        12,
        &expected_top(&message(12), 2)
    ));
    assert!(c.cmd("NOOP").starts_with("+OK"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

/// A message of about 20 KB: longer than TOP's first piece (8 KiB, or 16 KiB after a long
/// header), so a header preview of it comes from a window of pieces, not from a message read
/// ahead whole.
fn preview_message(i: usize) -> Vec<u8> {
    numbered_message("preview", 'p', i, 700, 50)
}

/// `Subject: <what> <i>`, `X-Model-Id: <id><i>`, then `lines` numbered lines with a
/// dot-stuffing line every `dot_every` of them.
fn numbered_message(what: &str, id: char, i: usize, lines: usize, dot_every: usize) -> Vec<u8> {
    let mut m = format!("Subject: {what} {i}\r\nX-Model-Id: {id}{i}\r\n\r\n").into_bytes();
    for l in 0..lines {
        m.extend_from_slice(format!("line {l} of {what} message {i}\r\n").as_bytes());
        if l % dot_every == 0 {
            m.extend_from_slice(b".dot line\r\n");
        }
    }
    m
}

fn previews_from_a_window_asked_for_ahead_then_expunged<S: MailServer>(dc: S) {
    // TOP n 0 on every message: the 8 KiB pieces come in windows of 16 (asked for when TOP 1
    // reaches it), then 32, 64 and 128 (1 MiB on loopback, and at most 128), each asked for
    // when the client uses the first piece of the one before: 1-16, 17-48, 49-112, 113-240,
    // 241-368, 369-496. After TOP 135, the FETCH of 241-368 is on its way; then another
    // client expunges 259 and 270 (in it) and 390 (in the one after).
    let n = 420;
    dc.add_user("e", "epw");
    let msgs: Vec<Vec<u8>> = (1..=n).map(preview_message).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    dc.seed("e", &refs);
    let pb = Popbridge::start(&dc, "");
    // A session with a RETR first: popbridge learns that the server sends UID before BODY[]
    // (pieces are then read undecoded, and asked for ahead).
    poplib(pb.pop3_port(), &["user e", "pass epw", "retr 1", "quit"]).assert_all_ok();
    let mut c = Raw::ready(pb.pop3_port());
    c.login("e", "epw");
    assert!(c.cmd("STAT").starts_with(&format!("+OK {n} ")));
    let top = |i: usize| expected_top(&preview_message(i), 0);
    for i in 1..=135 {
        assert!(exact_or_err(&mut c, &format!("TOP {i} 0"), i, &top(i)));
    }
    expunge(&dc, "259,270,390");
    std::thread::sleep(Duration::from_millis(200));
    let gone = [259, 270, 390];
    let mut served = 0;
    for i in 136..=n {
        let ok = exact_or_err(&mut c, &format!("TOP {i} 0"), i, &top(i));
        assert!(ok || gone.contains(&i), "message {i} was never touched");
        served += (ok && gone.contains(&i)) as u32;
    }
    // Other commands after a window asked for ahead: a RETR (drains it first), TOP again.
    for i in [395, 259, 3] {
        let ok = exact_or_err(&mut c, &format!("RETR {i}"), i, &preview_message(i));
        assert!(ok || gone.contains(&i), "message {i} was never touched");
    }
    assert!(exact_or_err(&mut c, "TOP 410 0", 410, &top(410)));
    assert!(exact_or_err(
        &mut c,
        "TOP 5 2",
        5,
        &expected_top(&preview_message(5), 2)
    ));
    assert!(
        c.cmd("STAT").starts_with(&format!("+OK {n} ")),
        "the listing is fixed"
    );
    assert!(c.cmd("QUIT").starts_with("+OK"));
    report(&format!(
        "previews from a window asked for ahead ({}): {served} of 3 expunged served the listed bytes, the rest -ERR",
        std::any::type_name::<S>().rsplit("::").next().unwrap_or("?")
    ));
    // Every window after the first was read from a FETCH sent ahead: 5 here, 3 where the
    // server's FETCH takes 5 ms or more (every window is then 128 pieces: 129-256, 257-384,
    // 385-420), as this Cyrus's may; 2 when the second window was asked for only when the
    // client reached it.
    let ahead = pb.log_count("first pieces read from a FETCH sent ahead");
    assert!(
        ahead >= 3,
        "windows asked for ahead: {ahead}\n{}",
        pb.log_tail(40)
    );
    let next = poplib(pb.pop3_port(), &["user e", "pass epw", "stat", "quit"]);
    next.assert_all_ok();
    assert!(
        next.step("stat")
            .resp
            .starts_with(&format!("+OK {} ", n - 3)),
        "259, 270 and 390 are gone"
    );
    // A client that alternates TOP and RETR (a filter looking at each header before the
    // download) across a window's end, with windows of pieces and RETR's FETCHes both sent
    // ahead: every answer exact.
    let mut c = Raw::ready(pb.pop3_port());
    c.login("e", "epw");
    for i in 1..=140 {
        assert!(exact_or_err(&mut c, &format!("TOP {i} 0"), i, &top(i)));
        assert!(exact_or_err(
            &mut c,
            &format!("RETR {i}"),
            i,
            &preview_message(i)
        ));
    }
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

fn quit_commits_the_marks_that_still_exist_in_every_mode<S: MailServer>(dc: S) {
    let modes = [
        ("h", "hide", ""),
        ("x", "expunge", ""),
        ("m", "move", "move_to = \"Trash\"\n"),
    ];
    // Every user before the first login (Dovecot re-reads its passwd-file at most once a second).
    let msgs: Vec<Vec<u8>> = (1..=4).map(message).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    for (user, _, _) in modes {
        dc.add_user(user, "pw");
        dc.seed(user, &refs);
    }
    for (user, mode, toml) in modes {
        let pb = Popbridge::start(&dc, &format!("[deletion]\nmode = \"{mode}\"\n{toml}"));
        let mut c = Raw::ready(pb.pop3_port());
        c.login(user, "pw");
        for n in 1..=3 {
            assert!(c.cmd(&format!("DELE {n}")).starts_with("+OK"));
        }
        // Another client expunges one of the marked messages before the QUIT.
        imap_do(
            dc.imap_port(),
            user,
            "pw",
            "INBOX",
            &[
                &["uid", "STORE", "2", "+FLAGS", "(\\Deleted)"],
                &["uid", "EXPUNGE", "2"],
            ],
        );
        let quit = c.cmd("QUIT");
        assert!(quit.starts_with("+OK"), "{mode}: QUIT commits: {quit:?}");
        let inbox = dc.imap_state(user, "pw", "INBOX");
        let next = poplib(
            pb.pop3_port(),
            &[&format!("user {user}"), "pass pw", "uidl", "quit"],
        );
        next.assert_all_ok();
        let shown = String::from_utf8_lossy(&next.step("uidl").data())
            .lines()
            .count();
        assert_eq!(shown, 1, "{mode}: only message 4 is left for POP3");
        match mode {
            "hide" => assert_eq!(inbox.uids(), vec![1, 3, 4], "{mode}: hidden, kept"),
            "expunge" => assert_eq!(inbox.uids(), vec![4], "{mode}"),
            _ => {
                assert_eq!(inbox.uids(), vec![4], "{mode}");
                let trash = dc.imap_state(user, "pw", "Trash");
                assert_eq!(trash.uids().len(), 2, "{mode}: 1 and 3 moved to Trash");
            }
        }
        drop(pb);
    }
}

/// Every third message too big for a read-ahead window (streamed, never held), the others
/// small.
fn distant_message(i: usize) -> Vec<u8> {
    let lines = if i % 3 == 0 { 12_000 } else { 60 };
    numbered_message("distant", 'd', i, lines, 40)
}

fn pending_fetches_of_a_distant_server_then_expunged<S: MailServer>(dc: S) {
    // A relay holds every answer to a UID FETCH 40 ms: the server looks distant (a window of
    // 2.5 MB), so once RETR 1 is handed out, up to 8 FETCHes are sent ahead: the big
    // messages' (3, 6, 9, ...) and windows of the small ones, a bandwidth-delay product's
    // worth, their answers left unread. Then another client expunges messages whose FETCHes
    // are pending: small ones of the first window (2, 10), big ones asked for ahead (6, 9,
    // 12), and one whose FETCH is not sent yet (42).
    let n = 45;
    dc.add_user("e", "epw");
    let msgs: Vec<Vec<u8>> = (1..=n).map(distant_message).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    dc.seed("e", &refs);
    let relay = Relay::start(
        dc.imap_port(),
        Trigger::ClientSends("UID FETCH".into()),
        Fault::Delay(Duration::from_millis(40)),
    );
    let pb = Popbridge::start(&dc, &format!("[imap]\nport = {}\n", relay.port()));
    // A session with a RETR first: popbridge learns that the server sends UID before BODY[].
    poplib(pb.pop3_port(), &["user e", "pass epw", "retr 1", "quit"]).assert_all_ok();
    let mut c = Raw::ready(pb.pop3_port());
    c.login("e", "epw");
    assert!(c.cmd("STAT").starts_with(&format!("+OK {n} ")));
    assert!(exact_or_err(&mut c, "RETR 1", 1, &distant_message(1)));
    let gone = [2, 6, 9, 10, 12, 42];
    expunge(&dc, "2,6,9,10,12,42");
    std::thread::sleep(Duration::from_millis(200));
    let mut served = 0;
    for i in 2..=n {
        let ok = exact_or_err(&mut c, &format!("RETR {i}"), i, &distant_message(i));
        assert!(ok || gone.contains(&i), "message {i} was never touched");
        served += (ok && gone.contains(&i)) as u32;
    }
    // The session goes on: again, out of order, after a command that drains what is pending.
    assert!(c.cmd("NOOP").starts_with("+OK"));
    for i in [3, 45, 7] {
        assert!(exact_or_err(
            &mut c,
            &format!("RETR {i}"),
            i,
            &distant_message(i)
        ));
    }
    assert!(
        c.cmd("STAT").starts_with(&format!("+OK {n} ")),
        "the listing is fixed"
    );
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let early = pb.log_count("came early");
    report(&format!(
        "pending FETCHes then expunged ({}): {served} of {} expunged served the listed bytes, the rest -ERR; {early} bodies came early (interleaved)",
        std::any::type_name::<S>().rsplit("::").next().unwrap_or("?"),
        gone.len()
    ));
    // Never out of step with the server: no response taken for another command's.
    assert_eq!(
        pb.log_count("cannot parse"),
        0,
        "every response reached its own command\n{}",
        pb.log_tail(40)
    );
    // Several FETCHes were pending at once.
    let queued = pb.log_count("more pending");
    assert!(
        queued >= 2,
        "bodies read from a queue of FETCHes sent ahead: {queued}\n{}",
        pb.log_tail(40)
    );
    // Nothing lost: only the expunged ones are gone.
    let next = poplib(pb.pop3_port(), &["user e", "pass epw", "stat", "quit"]);
    next.assert_all_ok();
    assert!(
        next.step("stat")
            .resp
            .starts_with(&format!("+OK {} ", n - gone.len())),
        "only the expunged messages are gone: {}",
        next.step("stat").resp
    );
}
