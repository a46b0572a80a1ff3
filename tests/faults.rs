//! Upstream faults injected by a relay between popbridge and Dovecot: the client gets a clear
//! error or a closed connection, never a lie, and nothing is deleted that a QUIT did not commit.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use support::raw::RawPop3;
use support::relay::{Fault, Relay, Trigger};
use support::*;

fn setup(trigger: Trigger, fault: Fault, extra: &str) -> (Dovecot, Relay, Popbridge) {
    let dc = Dovecot::start();
    dc.add_user("f", "fpw");
    let big = vec![b'x'; 3 * 1024 * 1024];
    let mut big_msg = b"Subject: big\r\n\r\n".to_vec();
    for line in big.chunks(76) {
        big_msg.extend_from_slice(line);
        big_msg.extend_from_slice(b"\r\n");
    }
    dc.seed(
        "f",
        &[
            b"Subject: 1\r\n\r\none\r\n",
            b"Subject: 2\r\n\r\ntwo\r\n",
            b"Subject: 3\r\n\r\nthree\r\n",
            &big_msg,
        ],
    );
    let relay = Relay::start(dc.imap_port(), trigger, fault);
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[imap]\nport = {}\ncommand_timeout_secs = 2\n[deletion]\nmode = \"expunge\"\n{extra}",
            relay.port()
        ),
    );
    (dc, relay, pb)
}

#[test]
fn cut_during_login_is_sys_temp() {
    // The greeting gets through, the LOGIN answer does not.
    let (_dc, relay, pb) = setup(Trigger::ClientSends("LOGIN".into()), Fault::Cut, "");
    let mut c = RawPop3::ready(pb.pop3_port());
    c.cmd("USER f");
    let r = c.cmd("PASS fpw");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert_eq!(relay.fired(), 1);
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

#[test]
fn cut_mid_retr_closes_the_session_and_deletes_nothing() {
    // Enough upstream bytes for login, listing and the first piece of the big message.
    let (dc, relay, pb) = setup(
        Trigger::UpstreamBytes(400_000),
        Fault::Cut,
        "[imap]\nfetch_chunk_bytes = 262144",
    );
    let mut c = RawPop3::ready(pb.pop3_port());
    c.cmd("USER f");
    assert!(c.cmd("PASS fpw").starts_with("+OK"));
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    let r = c.cmd("RETR 4");
    assert!(r.starts_with("+OK"), "{r}");
    // The body stops short and the connection closes: no terminating line ever comes.
    let mut rest = Vec::new();
    let _ = c.reader.read_to_end(&mut rest);
    assert!(
        !rest.ends_with(b"\r\n.\r\n"),
        "a truncated message must not look complete"
    );
    assert!(rest.len() < 3 * 1024 * 1024);
    assert_eq!(relay.fired(), 1);
    relay.set(Trigger::Never, Fault::Cut);
    assert_eq!(dc.imap_state("f", "fpw", "INBOX").uids(), vec![1, 2, 3, 4]);
    assert!(
        pb.wait_for_log("outcome=UpstreamError", Duration::from_secs(5)),
        "{}",
        pb.log()
    );
}

#[test]
fn a_silent_upstream_hits_the_deadline() {
    // Everything until the first FETCH of a message body, then silence.
    let (_dc, relay, pb) = setup(Trigger::ClientSends("BODY.PEEK".into()), Fault::Stall, "");
    let mut c = RawPop3::ready(pb.pop3_port());
    c.cmd("USER f");
    assert!(c.cmd("PASS fpw").starts_with("+OK"));
    let started = Instant::now();
    let r = c.cmd("RETR 1");
    let took = started.elapsed();
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert!(
        took >= Duration::from_secs(2),
        "answered before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_secs(20),
        "deadline not enforced: {took:?}"
    );
    assert_eq!(relay.fired(), 1);
}

#[test]
fn cut_during_update_never_reports_success_and_leaves_a_consistent_mailbox() {
    let (dc, relay, pb) = setup(Trigger::ClientSends("UID EXPUNGE".into()), Fault::Cut, "");
    let mut c = RawPop3::ready(pb.pop3_port());
    c.cmd("USER f");
    assert!(c.cmd("PASS fpw").starts_with("+OK"));
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    assert!(c.cmd("DELE 3").starts_with("+OK"));
    let r = c.cmd("QUIT");
    assert!(
        r.starts_with("-ERR [SYS/TEMP]"),
        "QUIT must not claim success: {r}"
    );
    assert_eq!(relay.fired(), 1);

    // A later session sees each marked message either gone or still there, and every
    // unmarked one untouched.
    relay.set(Trigger::Never, Fault::Cut);
    let uids = dc.imap_state("f", "fpw", "INBOX").uids();
    assert!(
        uids.contains(&2) && uids.contains(&4),
        "unmarked messages touched: {uids:?}"
    );
    assert!(uids.iter().all(|u| [1, 2, 3, 4].contains(u)), "{uids:?}");
    let s = poplib(pb.pop3_port(), &["user f", "pass fpw", "stat", "quit"]);
    s.assert_all_ok();
}

/// A session must list the mailbox as the last commit left it. The soak once found a session
/// whose upstream SELECT happened before another session's commit, and which took the IN-USE
/// lock after it, offering the message that commit hid (Dovecot's SEARCH runs on the view the
/// connection last synced). The SELECT now happens only under the lock: while A holds it, B's
/// login is refused without any SELECT upstream, and once A's QUIT committed, B's SELECT (held
/// back by the relay to widen any window) sees the commit.
#[test]
fn a_session_selects_only_under_the_lock_and_never_lists_what_a_commit_hid() {
    let dc = Dovecot::start();
    dc.add_user("r", "rpw");
    dc.seed(
        "r",
        &[
            b"Subject: 1\r\n\r\none\r\n",
            b"Subject: 2\r\n\r\ntwo\r\n",
            b"Subject: 3\r\n\r\nthree\r\n",
        ],
    );
    let relay = Relay::start(dc.imap_port(), Trigger::Never, Fault::Cut);
    let pb = Popbridge::start(&dc, &format!("[imap]\nport = {}", relay.port()));
    let uidls = uidl_list(pb.pop3_port(), "r", "rpw");
    assert_eq!(uidls.len(), 3);

    let mut a = RawPop3::ready(pb.pop3_port());
    a.login("r", "rpw");
    assert!(a.cmd("DELE 1").starts_with("+OK"));
    relay.set(
        Trigger::ClientSends(" SELECT ".into()),
        Fault::Delay(Duration::from_millis(500)),
    );
    let mut b = RawPop3::ready(pb.pop3_port());
    assert!(b.cmd("USER r").starts_with("+OK"));
    let pass = b.cmd("PASS rpw");
    assert!(pass.starts_with("-ERR [IN-USE]"), "B: {pass}");
    assert_eq!(relay.fired(), 0, "B sent SELECT without holding the lock");
    assert!(a.cmd("QUIT").starts_with("+OK"));

    assert!(b.cmd("USER r").starts_with("+OK"));
    let pass = b.cmd("PASS rpw");
    assert!(pass.starts_with("+OK"), "B: {pass}");
    assert_eq!(relay.fired(), 1, "B's SELECT went through the relay");
    assert!(b.cmd("UIDL").starts_with("+OK"));
    let listed: Vec<String> = b
        .multi()
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
        .collect();
    assert_eq!(listed, uidls[1..], "B lists the message A's QUIT hid");
    assert!(b.cmd("QUIT").starts_with("+OK"));
}
