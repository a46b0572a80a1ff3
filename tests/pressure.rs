//! Upstream pressure (RFC 5530): a private Dovecot behind the fault relay, which answers
//! chosen commands itself with `NO [THROTTLED]`, `NO [INUSE]` or `NO [UNAVAILABLE]`. Real POP3
//! clients (poplib, curl) see the RFC 2449/3206 code that fits, never `[AUTH]`; a throttled
//! user or an unavailable backend backs off, and during the backoff logins are answered at
//! once: the relay counts no new upstream connection.

mod support;

use std::time::{Duration, Instant};

use support::prometheus::metric_sum;
use support::raw::RawPop3;
use support::relay::{Fault, Relay, Trigger};
use support::*;

struct Setup {
    _dc: Dovecot,
    relay: Relay,
    pb: Popbridge,
    metrics: u16,
}

/// Users `f` and `g`, three messages each; popbridge behind the relay with a 2 s backoff
/// (4 s at most) and a 3 s login penalty base (a charged penalty would show as a delay).
fn setup(trigger: Trigger, fault: Fault) -> Setup {
    let dc = Dovecot::start();
    for user in ["f", "g"] {
        dc.add_user(user, &format!("{user}pw"));
        dc.seed(
            user,
            &[
                b"Subject: 1\r\n\r\none\r\n",
                b"Subject: 2\r\n\r\ntwo\r\n",
                b"Subject: 3\r\n\r\nthree\r\n",
            ],
        );
    }
    let relay = Relay::start(dc.imap_port(), trigger, fault);
    let metrics = free_ports(1)[0];
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[imap]\nport = {}\ncommand_timeout_secs = 5\n\
             [limits]\nauth_penalty_base_ms = 3000\nbackoff_base_secs = 2\nbackoff_max_secs = 4\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"",
            relay.port()
        ),
    );
    Setup {
        _dc: dc,
        relay,
        pb,
        metrics,
    }
}

/// One login with Python's poplib: the PASS answer.
fn poplib_login(port: u16, user: &str) -> String {
    let s = poplib(port, &[&format!("user {user}"), &format!("pass {user}pw")]);
    s.step(&format!("pass {user}pw")).resp.clone()
}

#[test]
fn a_throttled_login_is_login_delay_not_auth_charges_no_penalty_and_backs_the_user_off() {
    let s = setup(
        Trigger::ClientSends(" LOGIN ".into()),
        Fault::Answer("NO [THROTTLED] Too many logins, slow down"),
    );
    let port = s.pb.pop3_port();
    let r = poplib_login(port, "f");
    assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
    assert_eq!(s.relay.fired(), 1);
    let upstream_connections = s.relay.connections();

    // During the backoff the same user is answered at once: no upstream connection.
    let started = Instant::now();
    let r = poplib_login(port, "f");
    assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
    assert!(started.elapsed() < Duration::from_secs(2), "not at once");
    assert_eq!(s.relay.connections(), upstream_connections);
    let curl = curl_pop3(&format!("pop3://f:fpw@127.0.0.1:{port}/"), &[]);
    assert_eq!(curl.code, 67, "curl: login denied ({})", curl.stderr);
    assert_eq!(s.relay.connections(), upstream_connections);

    // Another user is not held back (the user is throttled, not the backend).
    s.relay.set(Trigger::Never, Fault::Cut);
    assert!(poplib_login(port, "g").starts_with("+OK"));

    let m = s.metrics;
    let imap = ("backend", "imap");
    assert_eq!(
        metric_sum(
            m,
            "popbridge_upstream_pressure_total",
            &[imap, ("code", "throttled")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(m, "popbridge_backoffs_total", &[imap, ("scope", "user")]),
        1.0
    );
    assert_eq!(
        metric_sum(
            m,
            "popbridge_logins_refused_early_total",
            &[imap, ("reason", "backoff")]
        ),
        2.0
    );
    assert_eq!(
        metric_sum(m, "popbridge_logins_total", &[("result", "upstream_busy")]),
        3.0
    );
    assert_eq!(
        metric_sum(
            m,
            "popbridge_logins_total",
            &[("result", "bad_credentials")]
        ),
        0.0
    );

    // After the backoff: no login penalty was charged for the throttled logins, so a wrong
    // password now is the first failure (answered without delay) ...
    std::thread::sleep(Duration::from_millis(2100));
    let mut c = RawPop3::ready(port);
    c.cmd("USER f");
    let started = Instant::now();
    let r = c.cmd("PASS wrong");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "a penalty was charged: {:?}",
        started.elapsed()
    );
    // ... and the right one logs in and serves the mailbox.
    c.cmd("USER f");
    assert!(c.cmd("PASS fpw").starts_with("+OK"));
    assert!(c.cmd("STAT").starts_with("+OK 3 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

#[test]
fn select_in_use_upstream_is_in_use_not_sys_perm_and_does_not_back_off() {
    let s = setup(
        Trigger::ClientSends(" SELECT ".into()),
        Fault::Answer("NO [INUSE] Mailbox is locked by another process"),
    );
    let port = s.pb.pop3_port();
    let r = poplib_login(port, "f");
    assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
    // A lock upstream is not load: the next login is asked upstream again.
    let before = s.relay.connections();
    let r = poplib_login(port, "f");
    assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
    assert_eq!(s.relay.connections(), before + 1);
    s.relay.set(Trigger::Never, Fault::Cut);
    assert!(poplib_login(port, "f").starts_with("+OK"));
    let imap = ("backend", "imap");
    assert_eq!(
        metric_sum(
            s.metrics,
            "popbridge_upstream_pressure_total",
            &[imap, ("code", "inuse")]
        ),
        2.0
    );
    assert_eq!(
        metric_sum(s.metrics, "popbridge_backoffs_total", &[imap]),
        0.0
    );
}

#[test]
fn an_unavailable_backend_backs_off_for_every_user_then_recovers() {
    let s = setup(
        Trigger::ClientSends(" LOGIN ".into()),
        Fault::Answer("NO [UNAVAILABLE] Backend overloaded"),
    );
    let port = s.pb.pop3_port();
    let r = poplib_login(port, "f");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    let before = s.relay.connections();
    // Another user of the same backend: answered at once.
    s.relay.set(Trigger::Never, Fault::Cut);
    let r = poplib_login(port, "g");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert_eq!(s.relay.connections(), before, "the upstream was contacted");
    assert_eq!(
        metric_sum(
            s.metrics,
            "popbridge_backoffs_total",
            &[("backend", "imap"), ("scope", "backend")]
        ),
        1.0
    );
    // The backoff ends: logins go through again.
    std::thread::sleep(Duration::from_millis(2100));
    assert!(poplib_login(port, "g").starts_with("+OK"));
    assert!(
        s.pb.log().contains("upstream under pressure"),
        "{}",
        s.pb.log()
    );
}

#[test]
fn a_throttled_fetch_is_sys_temp_not_a_gone_message_and_backs_the_user_off() {
    let s = setup(
        Trigger::ClientSends("BODY.PEEK".into()),
        Fault::Answer("NO [THROTTLED] Slow down"),
    );
    let port = s.pb.pop3_port();
    let mut c = RawPop3::ready(port);
    c.login("f", "fpw");
    let r = c.cmd("RETR 1");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert!(c.wait_closed(Duration::from_secs(5)), "session not closed");
    assert_eq!(
        metric_sum(s.metrics, "popbridge_retr_gone_total", &[]),
        0.0,
        "a throttled FETCH is not a vanished message"
    );
    // The user backs off: the next login is answered at once.
    let before = s.relay.connections();
    let r = poplib_login(port, "f");
    assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
    assert_eq!(s.relay.connections(), before);
    // Nothing was lost: after the backoff the message is served whole.
    s.relay.set(Trigger::Never, Fault::Cut);
    std::thread::sleep(Duration::from_millis(2100));
    let session = poplib(port, &["user f", "pass fpw", "retr 1", "quit"]);
    session.assert_all_ok();
    assert_eq!(session.step("retr 1").data(), b"Subject: 1\r\n\r\none\r\n");
}

#[test]
fn a_commit_answered_unavailable_loses_nothing_and_backs_the_backend_off() {
    let s = setup(
        Trigger::ClientSends("($POP3Deleted)".into()),
        Fault::Answer("NO [UNAVAILABLE] Storage busy"),
    );
    let port = s.pb.pop3_port();
    let mut c = RawPop3::ready(port);
    c.login("f", "fpw");
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    let r = c.cmd("QUIT");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert_eq!(
        s.relay.fired(),
        1,
        "the hiding STORE was not the one refused"
    );
    assert_eq!(
        metric_sum(
            s.metrics,
            "popbridge_backoffs_total",
            &[("backend", "imap"), ("scope", "backend")]
        ),
        1.0
    );
    // Nothing was hidden: after the backoff, all three messages are still listed.
    s.relay.set(Trigger::Never, Fault::Cut);
    std::thread::sleep(Duration::from_millis(2100));
    let mut c = RawPop3::ready(port);
    c.login("f", "fpw");
    assert!(c.cmd("STAT").starts_with("+OK 3 "));
}
