//! Every -ERR path a client can reach, pipelining, and the snapshot's promises, against a real
//! Dovecot and (the tests that involve the upstream) a real Cyrus. Raw sockets are used where a
//! test needs exact control over what is sent when.

mod support;

use std::io::Read;
use std::time::Duration;

use support::imap_do::imap_do;
use support::raw::RawPop3 as Raw;
use support::*;

on_both_servers!(
    bad_credentials_get_auth_code_and_the_session_goes_on,
    second_session_of_the_same_user_gets_in_use,
    fifty_pipelined_commands_get_fifty_answers_in_order,
    auth_plain_with_initial_response_and_continuation,
    snapshot_is_fixed_for_the_session,
    idle_clients_are_logged_out_without_commit,
);

fn setup<S: MailServer>(dc: S, extra: &str) -> (S, Popbridge) {
    dc.add_user("e", "epw");
    dc.seed(
        "e",
        &[
            b"Subject: 1\r\n\r\none\r\n",
            b"Subject: 2\r\n\r\ntwo\r\n",
            b"Subject: 3\r\n\r\nthree\r\n",
        ],
    );
    let pb = Popbridge::start(&dc, extra);
    (dc, pb)
}

fn bad_credentials_get_auth_code_and_the_session_goes_on<S: MailServer>(server: S) {
    let (_dc, pb) = setup(server, "");
    let mut c = Raw::ready(pb.pop3_port());
    assert!(c.cmd("USER e").starts_with("+OK"));
    let r = c.cmd("PASS wrong");
    assert!(r.starts_with("-ERR [AUTH] "), "{r}");
    assert!(
        c.cmd("PASS epw").starts_with("-ERR"),
        "PASS needs a USER first"
    );
    c.login("e", "epw");
    assert!(c.cmd("STAT").starts_with("+OK 3 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    // curl reports a login failure as its exit code 67.
    let r = curl_pop3(&format!("pop3://e:nope@127.0.0.1:{}/", pb.pop3_port()), &[]);
    assert_eq!(r.code, 67, "{}", r.stderr);
    // No password, right or wrong, ever reaches the log.
    let log = pb.log();
    assert!(!log.contains("epw") && !log.contains("wrong") && !log.contains("nope"));
}

#[test]
fn upstream_down_gets_sys_temp() {
    let dc = Dovecot::start();
    dc.add_user("e", "epw");
    let closed = free_ports(1)[0];
    let pb = Popbridge::start(&dc, &format!("[imap]\nport = {closed}"));
    let mut c = Raw::ready(pb.pop3_port());
    c.cmd("USER e");
    let r = c.cmd("PASS epw");
    assert!(r.starts_with("-ERR [SYS/TEMP] "), "{r}");
    assert!(c.cmd("NOOP").starts_with("-ERR"), "still in AUTHORIZATION");
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

fn second_session_of_the_same_user_gets_in_use<S: MailServer>(server: S) {
    let (_dc, pb) = setup(server, "");
    let mut first = Raw::ready(pb.pop3_port());
    first.login("e", "epw");
    let second = poplib(pb.pop3_port(), &["user e", "pass epw"]);
    let pass = second.step("pass epw");
    assert!(!pass.ok);
    assert!(pass.resp.starts_with("-ERR [IN-USE] "), "{}", pass.resp);
    // Different case, same maildrop.
    let third = poplib(pb.pop3_port(), &["user E", "pass epw"]);
    assert!(third.step("pass epw").resp.starts_with("-ERR [IN-USE]"));
    assert!(first.cmd("QUIT").starts_with("+OK"));
    poplib(pb.pop3_port(), &["user e", "pass epw", "stat", "quit"]).assert_all_ok();
}

fn fifty_pipelined_commands_get_fifty_answers_in_order<S: MailServer>(server: S) {
    let (_dc, pb) = setup(server, "");
    let mut c = Raw::ready(pb.pop3_port());
    let mut batch = String::from("USER e\r\nPASS epw\r\n");
    let mut expect = vec!["+OK".to_string(), "+OK".to_string()];
    for i in 0..46 {
        match i % 4 {
            0 => {
                batch.push_str("STAT\r\n");
                expect.push("+OK 3 ".into());
            }
            1 => {
                batch.push_str(&format!("LIST {}\r\n", i % 3 + 1));
                expect.push(format!("+OK {} ", i % 3 + 1));
            }
            2 => {
                batch.push_str("RETR 99\r\n");
                expect.push("-ERR".into());
            }
            _ => {
                batch.push_str("NOOP\r\n");
                expect.push("+OK".into());
            }
        }
    }
    batch.push_str("UIDL 2\r\nQUIT\r\n");
    expect.push("+OK 2 ".into());
    expect.push("+OK".into());
    assert_eq!(expect.len(), 50);
    c.send(batch.as_bytes());
    for (i, want) in expect.iter().enumerate() {
        let got = c.line();
        assert!(
            got.starts_with(want.as_str()),
            "answer {i}: want {want:?}, got {got:?}"
        );
    }
    let mut rest = Vec::new();
    c.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "nothing after QUIT's answer");
}

#[test]
fn bad_input_gets_err_and_the_session_continues() {
    let (_dc, pb) = setup(Dovecot::start(), "");
    let mut c = Raw::ready(pb.pop3_port());
    let long = format!("USER {}", "x".repeat(300));
    assert!(c.cmd(&long).starts_with("-ERR"), "over-long line");
    assert!(c.cmd("FROB").starts_with("-ERR"), "unknown command");
    let apop = c.cmd("APOP e c4c9334bac560ecc979e58001b3e22fb");
    assert!(
        apop.starts_with("-ERR") && apop.to_lowercase().contains("apop"),
        "{apop}"
    );
    c.login("e", "epw");
    for bad in [
        "RETR", "RETR abc", "RETR 0", "RETR 4", "RETR -1", "RETR 1 2", "TOP 1", "TOP 1 x",
        "DELE 99", "LIST 4", "UIDL 0", "STAT 1",
    ] {
        let r = c.cmd(bad);
        assert!(r.starts_with("-ERR"), "{bad}: {r}");
    }
    assert!(c.cmd(&"NOOP ".repeat(60)).starts_with("-ERR"));
    assert!(c.cmd("NOOP").starts_with("+OK"), "session survived");
    assert!(c.cmd("LIST 1").starts_with("+OK 1 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

fn auth_plain_with_initial_response_and_continuation<S: MailServer>(server: S) {
    use base64::Engine;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let (_dc, pb) = setup(server, "");
    let mut c = Raw::ready(pb.pop3_port());
    assert!(c.cmd("CAPA").starts_with("+OK"));
    let capa = c.multi().concat();
    for cap in [
        "TOP",
        "UIDL",
        "USER",
        "RESP-CODES",
        "AUTH-RESP-CODE",
        "PIPELINING",
        "SASL PLAIN",
    ] {
        assert!(capa.contains(cap), "CAPA lacks {cap}: {capa}");
    }
    let r = c.cmd(&format!("AUTH PLAIN {}", b64(b"\0e\0bad")));
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert!(c.cmd("AUTH PLAIN").starts_with("+ "));
    let r = c.cmd(&b64(b"\0e\0epw"));
    assert!(r.starts_with("+OK"), "{r}");
    assert!(c.cmd("STAT").starts_with("+OK 3 "));
    c.cmd("QUIT");
    // curl picks SASL PLAIN from CAPA.
    let r = curl_pop3(
        &format!("pop3://e:epw@127.0.0.1:{}/", pb.pop3_port()),
        &["--login-options", "AUTH=PLAIN"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        3
    );
}

fn snapshot_is_fixed_for_the_session<S: MailServer>(server: S) {
    use base64::Engine;
    let (dc, pb) = setup(server, "");
    let mut c = Raw::ready(pb.pop3_port());
    c.login("e", "epw");
    assert!(c.cmd("STAT").starts_with("+OK 3 "));
    // Meanwhile another IMAP client adds one message and expunges message 2.
    let new = base64::engine::general_purpose::STANDARD.encode(b"Subject: 4\r\n\r\nfour\r\n");
    imap_do(
        dc.imap_port(),
        "e",
        "epw",
        "INBOX",
        &[
            &["append", "INBOX", &new],
            &["uid", "STORE", "2", "+FLAGS", "(\\Deleted)"],
            &["expunge"],
        ],
    );
    assert!(c.cmd("STAT").starts_with("+OK 3 "), "numbering is fixed");
    // The message the session listed as 2 is served whole or answered -ERR (Dovecot tells
    // the session of the expunge with its FETCH; Cyrus serves the message until then).
    let r = c.cmd("RETR 2");
    if r.starts_with("+OK") {
        let body = c.multi().concat();
        assert!(body.contains("two"), "message 2 is still message 2: {body}");
    } else {
        assert!(r.starts_with("-ERR message 2 "), "expunged upstream: {r}");
    }
    assert!(c.cmd("RETR 3").starts_with("+OK"));
    let body = c.multi().concat();
    assert!(
        body.contains("three"),
        "message 3 is still message 3: {body}"
    );
    assert!(c.cmd("QUIT").starts_with("+OK"));

    let next = poplib(
        pb.pop3_port(),
        &["user e", "pass epw", "stat", "retr 3", "quit"],
    );
    next.assert_all_ok();
    assert!(
        next.step("stat").resp.starts_with("+OK 3 "),
        "1, 3 and the new one"
    );
    assert!(String::from_utf8_lossy(&next.step("retr 3").data()).contains("four"));
}

fn idle_clients_are_logged_out_without_commit<S: MailServer>(server: S) {
    let (dc, pb) = setup(
        server,
        "[pop3]\nidle_timeout_secs = 1\n[deletion]\nmode = \"expunge\"",
    );
    let mut c = Raw::ready(pb.pop3_port());
    c.login("e", "epw");
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    std::thread::sleep(Duration::from_millis(2500));
    let mut rest = String::new();
    let _ = c.reader.read_to_string(&mut rest);
    assert!(!rest.starts_with("+OK"), "closed, not served: {rest:?}");
    assert_eq!(dc.imap_state("e", "epw", "INBOX").uids(), vec![1, 2, 3]);
}
