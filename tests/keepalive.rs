//! `imap.keep_alive_secs`: a user's upstream connection kept after a clean POP3 session for the
//! user's next one. Real Dovecot (and Cyrus where the server's behaviour matters), real POP3
//! client (Python's poplib), another IMAP client (imaplib) changing the mailbox in between.
//! Counted on popbridge's `/metrics` (`popbridge_upstream_keepalive_total`,
//! `popbridge_upstream_logins_total`) and, on Dovecot, in Dovecot's own log.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::imap_do::imap_do;
use support::prometheus::metric_sum;
use support::*;

const PW: &str = "ka-pw";

fn msg(n: usize) -> Vec<u8> {
    format!("Subject: message {n}\r\n\r\nbody of message {n}\r\n").into_bytes()
}

fn b64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// popbridge with keep-alive at `keep` seconds and its `/metrics` on a free port.
struct Bridge {
    pb: Popbridge,
    metrics: u16,
}

impl Bridge {
    fn start<S: MailServer>(server: &S, keep: u64, extra: &str) -> Bridge {
        let metrics = free_ports(1)[0];
        let pb = Popbridge::start(
            server,
            &format!(
                "[imap]\nkeep_alive_secs = {keep}\n{extra}\n[metrics]\nlisten = \"127.0.0.1:{metrics}\""
            ),
        );
        Bridge { pb, metrics }
    }

    fn kept(&self, outcome: &str) -> f64 {
        metric_sum(
            self.metrics,
            "popbridge_upstream_keepalive_total",
            &[("outcome", outcome)],
        )
    }

    fn parked_now(&self) -> f64 {
        metric_sum(self.metrics, "popbridge_upstream_keepalive_parked", &[])
    }

    fn logins(&self) -> f64 {
        metric_sum(
            self.metrics,
            "popbridge_upstream_logins_total",
            &[("result", "ok")],
        )
    }

    fn session(&self, user: &str, pw: &str, steps: &[&str]) -> PopSession {
        let mut all = vec![format!("user {user}"), format!("pass {pw}")];
        all.extend(steps.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        poplib(self.pb.pop3_port(), &all)
    }

    fn poll(&self, user: &str) -> PopSession {
        let s = self.session(user, PW, &["stat", "uidl", "quit"]);
        s.assert_all_ok();
        s
    }
}

fn listing(s: &PopSession) -> (String, Vec<Vec<u8>>) {
    (
        s.step("stat").resp.clone(),
        s.step("uidl").lines.clone().unwrap_or_default(),
    )
}

/// Dovecot's log lines of IMAP logins of `user`.
fn dovecot_logins(dc: &Dovecot, user: &str) -> usize {
    let needle = format!("imap-login: Info: Login: user=<{user}>");
    dc.log().lines().filter(|l| l.contains(&needle)).count()
}

fn wait_until(what: &str, t: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + t;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn second_poll_reuses_the_connection_and_lists_the_same() {
    let dc = Dovecot::start();
    dc.add_user("k", PW);
    dc.seed("k", &[&msg(1), &msg(2), &msg(3)]);
    let b = Bridge::start(&dc, 120, "");
    let first = b.poll("k");
    assert_eq!(b.parked_now(), 1.0);
    let second = b.poll("k");
    assert_eq!(listing(&first), listing(&second));
    assert_eq!(listing(&second).1.len(), 3);
    assert_eq!(b.kept("reused"), 1.0);
    assert_eq!(b.kept("parked"), 2.0);
    assert_eq!(b.logins(), 1.0, "one upstream login for two polls");
    wait_until("Dovecot's login log line", Duration::from_secs(5), || {
        dovecot_logins(&dc, "k") >= 1
    });
    assert_eq!(dovecot_logins(&dc, "k"), 1, "{}", dc.log_tail(30));
    // A RETR in the reused session, and its \Seen flag stored before the connection is kept.
    let s = b.session("k", PW, &["retr 2", "quit"]);
    s.assert_all_ok();
    assert_eq!(s.step("retr 2").data(), msg(2));
    assert_eq!(b.kept("reused"), 2.0);
    let state = dc.imap_state("k", PW, "INBOX");
    assert!(state.message(2).unwrap().has_flag("\\Seen"), "{state:?}");
    assert!(!state.message(1).unwrap().has_flag("\\Seen"), "{state:?}");
}

on_both_servers!(changes_between_sessions_show_in_the_reused_session);

fn changes_between_sessions_show_in_the_reused_session<S: MailServer>(server: S) {
    server.add_user("c", PW);
    server.seed("c", &[&msg(1), &msg(2), &msg(3)]);
    let b = Bridge::start(&server, 120, "");
    let first = b.poll("c");
    let before = listing(&first).1;
    assert_eq!(before.len(), 3);
    // Another client appends one message and expunges the first.
    imap_do(
        server.imap_port(),
        "c",
        PW,
        "INBOX",
        &[
            &["append", "INBOX", &b64(&msg(4))],
            &["uid", "STORE", "1", "+FLAGS", "(\\Deleted)"],
            &["expunge"],
        ],
    );
    let s = b.session("c", PW, &["stat", "uidl", "retr 1", "retr 3", "quit"]);
    s.assert_all_ok();
    assert_eq!(b.kept("reused"), 1.0, "the second session reused");
    assert_eq!(b.logins(), 1.0);
    let after = s.step("uidl").lines.clone().unwrap();
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(
        s.step("stat").resp.starts_with("+OK 3 "),
        "{:?}",
        s.step("stat").resp
    );
    assert_eq!(s.step("retr 1").data(), msg(2));
    assert_eq!(s.step("retr 3").data(), msg(4));
    // Exactly what a fresh login lists: a popbridge without keep-alive, same server.
    let fresh = Bridge::start(&server, 0, "");
    let reference = fresh.session("c", PW, &["stat", "uidl", "quit"]);
    reference.assert_all_ok();
    assert_eq!(fresh.kept("parked"), 0.0);
    let mut after_set = s.step("uidl").lines.clone().unwrap();
    after_set.sort();
    let mut reference_set = reference.step("uidl").lines.clone().unwrap();
    reference_set.sort();
    assert_eq!(after_set, reference_set);
    // The expunged message's UIDL is gone; the others kept theirs.
    let uidl = |l: &Vec<u8>| {
        String::from_utf8_lossy(l)
            .split(' ')
            .nth(1)
            .unwrap()
            .to_owned()
    };
    let before: Vec<String> = before.iter().map(uidl).collect();
    let after: Vec<String> = after.iter().map(uidl).collect();
    assert_eq!(after[..2], before[1..], "{before:?} -> {after:?}");
    assert!(!after.contains(&before[0]));
}

/// DELE + QUIT, then a session over the kept connection, in each deletion mode.
#[test]
fn deletions_committed_before_keeping_are_gone_in_the_next_session() {
    let dc = Dovecot::start();
    let modes = ["hide", "expunge", "move"];
    for i in 0..modes.len() {
        dc.add_user(&format!("d{i}"), PW);
        dc.seed(&format!("d{i}"), &[&msg(1), &msg(2), &msg(3)]);
    }
    for (i, mode) in modes.into_iter().enumerate() {
        let user = format!("d{i}");
        let b = Bridge::start(
            &dc,
            120,
            &format!("[deletion]\nmode = \"{mode}\"\nmove_to = \"Trash\""),
        );
        let s = b.session(&user, PW, &["dele 2", "quit"]);
        s.assert_all_ok();
        let s = b.session(&user, PW, &["stat", "retr 1", "retr 2", "quit"]);
        s.assert_all_ok();
        assert_eq!(b.kept("reused"), 1.0, "{mode}");
        assert!(
            s.step("stat").resp.starts_with("+OK 2 "),
            "{mode}: {:?}",
            s.step("stat").resp
        );
        assert_eq!(s.step("retr 1").data(), msg(1), "{mode}");
        assert_eq!(s.step("retr 2").data(), msg(3), "{mode}");
        let inbox = dc.imap_state(&user, PW, "INBOX");
        match mode {
            "hide" => assert_eq!(inbox.uids(), vec![1, 2, 3]),
            _ => assert_eq!(inbox.uids(), vec![1, 3], "{mode}"),
        }
        if mode == "move" {
            assert_eq!(dc.imap_state(&user, PW, "Trash").messages.len(), 1);
        }
    }
}

#[test]
fn a_wrong_password_never_takes_a_kept_connection() {
    let dc = Dovecot::start();
    dc.add_user("w", PW);
    dc.seed("w", &[&msg(1)]);
    let b = Bridge::start(&dc, 120, "");
    b.poll("w");
    let bad = b.session("w", "not-the-password", &["stat"]);
    let pass = &bad.steps[1];
    assert!(!pass.ok);
    assert!(pass.resp.starts_with("-ERR [AUTH]"), "{:?}", pass.resp);
    assert_eq!(b.kept("reused"), 0.0);
    assert_eq!(b.parked_now(), 1.0, "the kept connection is untouched");
    let s = b.poll("w");
    assert_eq!(listing(&s).1.len(), 1);
    assert_eq!(b.kept("reused"), 1.0);
}

/// A password changed on the server takes effect within `keep_alive_secs` of the kept
/// connection's login, however often polls with the old password take it up again (each
/// session parks it anew; were its age counted from there, a client polling faster than the
/// keep-alive would keep the old password working for ever).
#[test]
fn a_password_changed_on_the_server_takes_effect_within_the_keep_alive() {
    let dc = Dovecot::start();
    dc.add_user("p", PW);
    dc.seed("p", &[&msg(1)]);
    let b = Bridge::start(&dc, 3, "");
    let start = Instant::now();
    b.poll("p");
    dc.add_user("p", "changed-pw");
    let mut refused_at = None;
    while start.elapsed() < Duration::from_secs(9) {
        std::thread::sleep(Duration::from_millis(400));
        let s = b.session("p", PW, &["stat", "quit"]);
        let pass = &s.steps[1];
        if !pass.ok {
            assert!(pass.resp.starts_with("-ERR [AUTH]"), "{:?}", pass.resp);
            refused_at = Some(start.elapsed());
            break;
        }
    }
    let at = refused_at.expect("the old password still worked 9 s after a 3 s keep-alive's login");
    assert!(
        at < Duration::from_secs(5),
        "the old password was refused only after {at:?}"
    );
    assert!(
        b.kept("reused") >= 2.0,
        "meanwhile the old password's polls took the kept connection up (the documented lag)"
    );
    assert!(b.kept("expired") >= 1.0);
    b.session("p", "changed-pw", &["stat", "quit"])
        .assert_all_ok();
}

/// The pids of the Dovecot processes holding a connection to its IMAP port.
fn imap_pids(port: u16) -> Vec<u32> {
    let out = Command::new("ss")
        .args([
            "-Htnp",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut pids: Vec<u32> = text
        .split("pid=")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    pids.sort();
    pids.dedup();
    pids
}

#[test]
fn a_kept_connection_the_server_closed_gives_way_to_a_fresh_login() {
    let dc = Dovecot::start();
    dc.add_user("s", PW);
    dc.seed("s", &[&msg(1), &msg(2)]);
    let b = Bridge::start(&dc, 120, "");
    let first = b.poll("s");
    let pids = imap_pids(dc.imap_port());
    assert_eq!(
        pids.len(),
        1,
        "one imap process serves the kept connection: {pids:?}"
    );
    let killed = Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_until(
        "the imap process to be gone",
        Duration::from_secs(5),
        || imap_pids(dc.imap_port()).is_empty(),
    );
    let second = b.poll("s");
    assert_eq!(listing(&first), listing(&second));
    assert_eq!(b.kept("stale"), 1.0);
    assert_eq!(b.kept("reused"), 0.0);
    assert_eq!(b.logins(), 2.0);
}

#[test]
fn kept_connections_expire_and_are_evicted_when_full() {
    let dc = Dovecot::start();
    for u in ["e1", "e2"] {
        dc.add_user(u, PW);
        dc.seed(u, &[&msg(1)]);
    }
    let b = Bridge::start(&dc, 1, "keep_alive_max = 1");
    b.poll("e1");
    assert_eq!(b.parked_now(), 1.0);
    // Full: the second user's connection pushes the first one's out.
    b.poll("e2");
    assert_eq!(b.kept("evicted"), 1.0);
    assert_eq!(b.parked_now(), 1.0);
    // The sweeper logs the kept connection out after keep_alive_secs.
    wait_until("expiry", Duration::from_secs(5), || {
        b.kept("expired") == 1.0
    });
    assert_eq!(b.parked_now(), 0.0);
    wait_until(
        "the kept connections' LOGOUT",
        Duration::from_secs(5),
        || imap_pids(dc.imap_port()).is_empty(),
    );
    b.poll("e2");
    assert_eq!(b.kept("reused"), 0.0);
    assert_eq!(b.logins(), 3.0, "a fresh login after expiry");
}

/// A kept connection that no longer answers (a silent network path: nothing closed, nothing
/// comes back) costs the next session the NOOP's short deadline, then a fresh login.
#[test]
fn a_kept_connection_that_does_not_answer_gives_way_to_a_fresh_login() {
    use support::relay::{Fault, Relay, Trigger};
    let dc = Dovecot::start();
    dc.add_user("n", PW);
    dc.seed("n", &[&msg(1), &msg(2)]);
    // Every upstream connection stalls once popbridge sends a NOOP on it, which only a
    // session taking a kept connection does.
    let relay = Relay::start(
        dc.imap_port(),
        Trigger::ClientSends("NOOP".into()),
        Fault::Stall,
    );
    let b = Bridge::start(&dc, 120, &format!("port = {}", relay.port()));
    let first = b.poll("n");
    // (popbridge's start-up probe of the upstream is a connection too)
    let before = relay.connections();
    let t = Instant::now();
    let second = b.poll("n");
    let took = t.elapsed();
    assert_eq!(listing(&first), listing(&second));
    assert_eq!(relay.fired(), 1, "the kept connection was tried");
    assert_eq!(relay.connections(), before + 1, "then a fresh one");
    assert_eq!(b.kept("stale"), 1.0);
    assert_eq!(b.logins(), 2.0);
    assert!(took < Duration::from_secs(10), "bounded: {took:?}");
}

/// A reload builds new backends: the kept connections of the old ones are logged out.
#[test]
fn a_reload_logs_the_kept_connections_out() {
    let dc = Dovecot::start();
    dc.add_user("r", PW);
    dc.seed("r", &[&msg(1)]);
    let b = Bridge::start(&dc, 120, "");
    b.poll("r");
    assert_eq!(b.parked_now(), 1.0);
    let logged_out = |dc: &Dovecot| {
        dc.log()
            .lines()
            .filter(|l| l.contains("imap(r)") && l.contains("Disconnected: Logged out"))
            .count()
    };
    assert_eq!(logged_out(&dc), 0, "{}", dc.log_tail(20));
    b.pb.signal("HUP");
    assert!(
        b.pb.wait_for_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        b.pb.log()
    );
    wait_until(
        "the kept connection's LOGOUT",
        Duration::from_secs(10),
        || logged_out(&dc) == 1,
    );
    assert_eq!(b.parked_now(), 0.0);
    b.poll("r");
    assert_eq!(b.kept("reused"), 0.0);
    assert_eq!(b.logins(), 2.0);
}

/// With a master user, the client's password is checked first at `verify_password_with`: both
/// the check's login and the master login are kept, and the next poll logs in nowhere. A
/// wrong password still reaches the checking server's login and is refused.
#[test]
fn master_logins_and_their_password_checks_are_both_kept() {
    let master = MasterPassdb::new("pbmaster", "master-secret");
    let dc = Dovecot::start_with_conf(&master.conf);
    dc.add_user("m", PW);
    dc.seed("m", &[&msg(1), &msg(2)]);
    let b = Bridge::start(
        &dc,
        120,
        &format!(
            "master_user = \"pbmaster\"\nmaster_password_file = \"{}\"\nverify_password_with = \"v\"\n\
             [backends.v]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nkeep_alive_secs = 120",
            master.password_file.display(),
            dc.imap_port()
        ),
    );
    let first = b.poll("m");
    let logins = |mechanism: &str| {
        metric_sum(
            b.metrics,
            "popbridge_upstream_logins_total",
            &[("mechanism", mechanism), ("result", "ok")],
        )
    };
    assert_eq!((logins("login"), logins("plain")), (1.0, 1.0));
    assert_eq!(
        b.parked_now(),
        2.0,
        "the check's connection and the session's"
    );
    let second = b.poll("m");
    assert_eq!(listing(&first), listing(&second));
    assert_eq!(b.kept("reused"), 2.0);
    assert_eq!((logins("login"), logins("plain")), (1.0, 1.0), "no login");
    let bad = b.session("m", "not-the-password", &["stat"]);
    assert!(
        bad.steps[1].resp.starts_with("-ERR [AUTH]"),
        "{:?}",
        bad.steps[1].resp
    );
    assert_eq!(b.kept("reused"), 2.0);
    assert_eq!(b.parked_now(), 2.0);
    let needle = "Master user logging in as m";
    assert_eq!(dc.log().matches(needle).count(), 1, "{}", dc.log_tail(20));
}

/// Over TLS to the store: the kept connection's socket check goes through the TLS layer.
#[test]
fn kept_connections_work_over_upstream_tls() {
    let dc = Dovecot::start();
    dc.add_user("t", PW);
    dc.seed("t", &[&msg(1), &msg(2)]);
    let b = Bridge::start(
        &dc,
        120,
        &format!(
            "port = {}\nsecurity = \"tls\"\nca_file = \"{}\"",
            dc.imaps_port(),
            dc.ca_pem_path().display()
        ),
    );
    let first = b.poll("t");
    let second = b.poll("t");
    assert_eq!(listing(&first), listing(&second));
    assert_eq!(b.kept("reused"), 1.0);
    // The server's end goes away (over TLS, Dovecot's imap-login holds the socket and proxies
    // to the imap process): the TLS stream reads its end, and a fresh login follows.
    for pid in imap_pids(dc.imaps_port()) {
        assert!(Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
    wait_until(
        "the imap process to be gone",
        Duration::from_secs(5),
        || imap_pids(dc.imaps_port()).is_empty(),
    );
    let third = b.poll("t");
    assert_eq!(listing(&first), listing(&third));
    assert_eq!(b.kept("stale"), 1.0);
    assert_eq!(b.logins(), 2.0);
}

/// A stopping server logs the kept connections out (bounded) before it exits.
#[test]
fn a_stopping_server_logs_the_kept_connections_out() {
    let dc = Dovecot::start();
    dc.add_user("x", PW);
    dc.seed("x", &[&msg(1)]);
    let mut b = Bridge::start(&dc, 120, "");
    b.poll("x");
    assert_eq!(b.parked_now(), 1.0);
    b.pb.signal("TERM");
    let status = b.pb.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        b.pb.log()
    );
    wait_until(
        "Dovecot's log of the LOGOUT",
        Duration::from_secs(5),
        || {
            dc.log()
                .lines()
                .any(|l| l.contains("imap(x)") && l.contains("Disconnected: Logged out"))
        },
    );
}
