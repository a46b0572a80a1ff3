//! RFC 2449 LOGIN-DELAY and EXPIRE against a private Dovecot: what CAPA advertises before
//! and after login (per backend, `USER` where they differ), and LOGIN-DELAY enforced across
//! the plain and the POP3S listener of one process, costing the upstream nothing (the relay in
//! front of Dovecot counts its connections; popbridge counts the refusals).

mod support;

use std::time::{Duration, Instant};

use support::prometheus::metric_sum;
use support::raw::RawPop3;
use support::relay::{Fault, Relay, Trigger};
use support::*;

struct Setup {
    dc: Dovecot,
    relay: Relay,
    pb: Popbridge,
    pop3s: u16,
    metrics: u16,
}

/// `f` on `[imap]` (LOGIN-DELAY 3 s from `[limits]`, EXPIRE NEVER) and `g` routed to backend
/// `other` (the same Dovecot, no LOGIN-DELAY, EXPIRE 30 declared), both behind the relay.
fn setup() -> Setup {
    let dc = Dovecot::start();
    for user in ["f", "g"] {
        dc.add_user(user, &format!("{user}pw"));
        dc.seed(user, &[b"Subject: 1\r\n\r\none\r\n"]);
    }
    let relay = Relay::start(dc.imap_port(), Trigger::Never, Fault::Cut);
    let [pop3s, metrics] = free_ports(2)[..] else {
        unreachable!()
    };
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[pop3]\nlisten_tls = \"127.0.0.1:{pop3s}\"\n\
             [pop3.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [imap]\nport = {relay}\n\
             [limits]\nlogin_delay_secs = 3\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [backends.other]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {relay}\nsecurity = \"none\"\n\
             login_delay_secs = 0\nexpire_days = 30\n\
             [routing]\nrules = [{{ match = \"g\", backend = \"other\" }}]",
            cert = dc.dir().join("server.pem").display(),
            key = dc.dir().join("server.key").display(),
            relay = relay.port(),
        ),
    );
    Setup {
        dc,
        relay,
        pb,
        pop3s,
        metrics,
    }
}

/// CAPA's lines, without the status line and the terminator.
fn capa(c: &mut RawPop3) -> Vec<String> {
    assert!(c.cmd("CAPA").starts_with("+OK"));
    c.multi()
        .into_iter()
        .map(|l| l.trim_end().to_owned())
        .filter(|l| l != ".")
        .collect()
}

fn has(lines: &[String], want: &str) -> bool {
    lines.iter().any(|l| l == want)
}

#[test]
fn capa_advertises_the_strictest_with_user_before_login_and_the_users_own_after() {
    let s = setup();
    let port = s.pb.pop3_port();
    let mut c = RawPop3::ready(port);
    let before = capa(&mut c);
    assert!(has(&before, "LOGIN-DELAY 3 USER"), "{before:?}");
    assert!(has(&before, "EXPIRE 30 USER"), "{before:?}");
    c.login("f", "fpw");
    let after = capa(&mut c);
    assert!(has(&after, "LOGIN-DELAY 3"), "{after:?}");
    assert!(has(&after, "EXPIRE NEVER"), "{after:?}");
    assert!(c.cmd("QUIT").starts_with("+OK"));

    // poplib's own CAPA parsing, logged in as a user of the other backend.
    let session = poplib(port, &["user g", "pass gpw", "capa", "quit"]);
    session.assert_all_ok();
    let lines = String::from_utf8_lossy(&session.step("capa").data()).into_owned();
    assert!(lines.contains("LOGIN-DELAY 0\r\n"), "{lines}");
    assert!(lines.contains("EXPIRE 30\r\n"), "{lines}");
}

#[test]
fn one_backend_and_no_delay_configured_shows_expire_never_and_no_login_delay() {
    let dc = Dovecot::start();
    dc.add_user("f", "fpw");
    let pb = Popbridge::start(&dc, "");
    let mut c = RawPop3::ready(pb.pop3_port());
    let before = capa(&mut c);
    assert!(has(&before, "EXPIRE NEVER"), "{before:?}");
    assert!(
        !before.iter().any(|l| l.starts_with("LOGIN-DELAY")),
        "{before:?}"
    );
    c.login("f", "fpw");
    let after = capa(&mut c);
    assert!(has(&after, "EXPIRE NEVER"), "{after:?}");
    assert!(
        !after.iter().any(|l| l.starts_with("LOGIN-DELAY")),
        "{after:?}"
    );
}

#[test]
fn login_delay_is_enforced_across_listeners_without_contacting_the_upstream() {
    let s = setup();
    let port = s.pb.pop3_port();
    // A login on the plain listener (curl lists the maildrop) starts f's delay ...
    let r = curl_pop3(&format!("pop3://f:fpw@127.0.0.1:{port}/"), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let logged_in_at = Instant::now();
    let upstream = s.relay.connections();

    // ... so a login on the POP3S listener right after is refused at once ...
    let mut tls = PopOpts::plain(s.pop3s);
    tls.tls = PopTls::Implicit;
    tls.cafile = Some(s.dc.ca_pem_path());
    let session = poplib_with(&tls, &["user f", "pass fpw"]);
    let r = &session.step("pass fpw").resp;
    assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
    // ... and so is one on the plain listener (curl: login denied).
    let r = curl_pop3(&format!("pop3://f:fpw@127.0.0.1:{port}/"), &[]);
    assert_eq!(r.code, 67, "{}", r.stderr);
    assert_eq!(
        s.relay.connections(),
        upstream,
        "the upstream was contacted"
    );
    assert!(
        logged_in_at.elapsed() < Duration::from_secs(3),
        "too slow to test"
    );
    assert_eq!(
        metric_sum(
            s.metrics,
            "popbridge_logins_refused_early_total",
            &[("backend", "imap"), ("reason", "login_delay")]
        ),
        2.0
    );
    assert_eq!(
        metric_sum(
            s.metrics,
            "popbridge_logins_total",
            &[("result", "login_delay")]
        ),
        2.0
    );

    // A user of the backend without a delay logs in as often as it likes.
    for _ in 0..2 {
        let r = curl_pop3(&format!("pop3://g:gpw@127.0.0.1:{port}/"), &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }

    // Once the delay has passed, f logs in again (on POP3S this time).
    std::thread::sleep(Duration::from_secs(3).saturating_sub(logged_in_at.elapsed()));
    let session = poplib_with(&tls, &["user f", "pass fpw", "stat", "quit"]);
    session.assert_all_ok();
    assert!(s.relay.connections() > upstream);
}

#[test]
fn a_failed_login_does_not_start_the_delay() {
    let s = setup();
    let port = s.pb.pop3_port();
    let mut c = RawPop3::ready(port);
    c.cmd("USER f");
    assert!(c.cmd("PASS wrong").starts_with("-ERR [AUTH]"));
    c.cmd("USER f");
    assert!(c.cmd("PASS fpw").starts_with("+OK"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    // The successful one did.
    let mut c = RawPop3::ready(port);
    c.cmd("USER f");
    let r = c.cmd("PASS fpw");
    assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
}

#[test]
fn within_the_delay_a_wrong_password_gets_the_stores_answer_not_login_delay() {
    let s = setup();
    let port = s.pb.pop3_port();
    let mut c = RawPop3::ready(port);
    c.login("f", "fpw");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    // Someone without the password learns nothing from the delay: the store judges it.
    let before = s.relay.connections();
    let mut c = RawPop3::ready(port);
    c.cmd("USER f");
    let r = c.cmd("PASS guess");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert_eq!(s.relay.connections(), before + 1);
    // The user's own client is held back at once.
    c.cmd("USER f");
    let r = c.cmd("PASS fpw");
    assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
    assert_eq!(s.relay.connections(), before + 1);
}

#[test]
fn a_per_device_view_has_its_own_login_delay_and_an_expire_of_its_days() {
    let dc = Dovecot::start();
    dc.add_user("v", "vpw");
    dc.seed("v", &[b"Subject: 1\r\n\r\none\r\n"]);
    let pb = Popbridge::start(
        &dc,
        "[limits]\nlogin_delay_secs = 30\n[views]\nrecent_days = 14\n",
    );
    let port = pb.pop3_port();
    let mut c = RawPop3::ready(port);
    let before = capa(&mut c);
    assert!(has(&before, "LOGIN-DELAY 30"), "{before:?}");
    assert!(has(&before, "EXPIRE 14 USER"), "{before:?}");
    // The desktop polls the account ...
    c.login("v", "vpw");
    assert!(has(&capa(&mut c), "EXPIRE NEVER"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    // ... and the phone's view right after is not held back by it ...
    let phone = poplib(port, &["user recent:v", "pass vpw", "capa", "stat", "quit"]);
    phone.assert_all_ok();
    let lines = String::from_utf8_lossy(&phone.step("capa").data()).into_owned();
    assert!(lines.contains("EXPIRE 14\r\n"), "{lines}");
    assert!(lines.contains("LOGIN-DELAY 30\r\n"), "{lines}");
    // ... while each is held back by its own previous login.
    for login in ["v", "recent:v"] {
        let s = poplib(port, &[&format!("user {login}"), "pass vpw"]);
        let r = &s.step("pass vpw").resp;
        assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{login}: {r}");
    }
}
