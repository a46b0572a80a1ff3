//! Passwords never reach the log, at any level: popbridge runs with RUST_LOG=trace (its own
//! code and every dependency) while clients log in with USER/PASS and AUTH PLAIN, right and
//! wrong, and the upstream LOGIN carries the same secrets.

mod support;

use base64::Engine;
use support::*;

#[test]
fn passwords_are_absent_from_trace_logs() {
    // Set before anything else in this test binary starts popbridge.
    // Even a filter that names imap_next explicitly must not bring wire data into the log.
    std::env::set_var("RUST_LOG", "trace,imap_next=trace");
    let dc = Dovecot::start();
    let good = "Corr3ct-H0rse-Battery";
    let bad = "Wr0ng-Guess-Staple";
    dc.add_user("sec", good);
    dc.seed("sec", &[b"Subject: s\r\n\r\nbody-text-secret\r\n"]);
    let pb = Popbridge::start(&dc, "[limits]\nauth_penalty_base_ms = 1");

    let s = poplib(
        pb.pop3_port(),
        &[
            "user sec",
            &format!("pass {bad}"),
            "user sec",
            &format!("pass {good}"),
            "retr 1",
            "quit",
        ],
    );
    assert!(s.step(&format!("pass {good}")).ok);
    let plain_good = base64::engine::general_purpose::STANDARD.encode(format!("\0sec\0{good}"));
    let plain_bad = base64::engine::general_purpose::STANDARD.encode(format!("\0sec\0{bad}"));
    let s = poplib(
        pb.pop3_port(),
        &[
            &format!("raw AUTH PLAIN {plain_bad}"),
            &format!("raw AUTH PLAIN {plain_good}"),
            "quit",
        ],
    );
    assert!(s.steps[1].ok, "{:?}", s.steps[1].resp);

    let log = pb.stop();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging was not on"
    );
    assert!(log.contains("pop3 login"), "{log}");
    for secret in [good, bad, plain_good.as_str(), plain_bad.as_str()] {
        let leak = log.lines().find(|l| l.contains(secret)).unwrap_or_default();
        assert!(
            leak.is_empty(),
            "secret {secret:?} found in the log: {}",
            &leak[..leak.len().min(600)]
        );
    }
    assert!(
        !log.contains("body-text-secret"),
        "a message body reached the log"
    );
}
