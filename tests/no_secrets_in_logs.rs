//! Passwords and tokens never reach the log, at any level: popbridge runs with RUST_LOG=trace
//! (its own code and every dependency) while clients log in with USER/PASS and AUTH PLAIN,
//! right and wrong, and the upstream LOGIN carries the same secrets; and while every OAuth 2.0
//! way of logging in upstream runs.

mod support;

use std::process::Command;

use base64::Engine;
use popbridge_testkit::oauth::OAuthServer;
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

/// OAuth 2.0 at trace level: access tokens (the client's and popbridge's own), refresh tokens
/// (issued, rotated), the client secret and the signed assertions never reach the log, nor the
/// output of `popbridge oauth`.
#[test]
fn tokens_and_client_credentials_are_absent_from_trace_logs() {
    std::env::set_var("RUST_LOG", "trace,imap_next=trace");
    let auth = OAuthServer::start();
    let dc = Dovecot::start_with_conf(&auth.dovecot_conf(&["tok"]));
    dc.add_user("tok", "imap-only-Pw9");
    dc.seed("tok", &[b"Subject: t\r\n\r\nbody\r\n"]);
    let dir = tempfile::tempdir().unwrap();
    let pop_pw = "Pop3-Secret-Tok-77";
    let hash = Command::new(POPBRIDGE_BIN)
        .args(["oauth", "hash-password", "--password-env", "PB_PW"])
        .env("PB_PW", pop_pw)
        .output()
        .unwrap();
    let passwords = dir.path().join("passwords");
    std::fs::write(
        &passwords,
        format!("tok:{}", String::from_utf8_lossy(&hash.stdout)),
    )
    .unwrap();
    let common = format!(
        "[limits]\nauth_penalty_base_ms = 1\n[imap.oauth]\ntoken_url = \"{}\"\n\
         device_url = \"{}\"\nclient_id = \"{}\"\n",
        auth.token_url(),
        auth.device_url(),
        popbridge_testkit::oauth::CLIENT_ID
    );
    let mut logs = String::new();

    // The client's own token, right and wrong.
    let pb = Popbridge::start(&dc, &format!("{common}tokens = \"client\""));
    let token = auth.mint("tok");
    for t in [token.as_str(), "at-wrong-token-Qx"] {
        curl_pop3(
            &format!("pop3://tok@127.0.0.1:{}/1", pb.pop3_port()),
            &["--oauth2-bearer", t],
        );
    }
    logs.push_str(&pb.stop());

    // Application tokens by a signed client assertion.
    let pb = Popbridge::start(
        &dc,
        &format!(
            "{common}tokens = \"app\"\nclient_key_file = \"{}\"\npassword_file = \"{}\"",
            auth.key_file().display(),
            passwords.display()
        ),
    );
    poplib(
        pb.pop3_port(),
        &["user tok", &format!("pass {pop_pw}"), "retr 1", "quit"],
    )
    .assert_all_ok();
    logs.push_str(&pb.stop());

    // The user's grant: authorized, used, refreshed with rotation, revoked.
    let pb = Popbridge::start(
        &dc,
        &format!(
            "{common}tokens = \"user\"\nclient_secret_file = \"{}\"\ntoken_store = \"{}\"",
            auth.secret_file().display(),
            dir.path().join("grants").display()
        ),
    );
    auth.control(r#"{"device_user": "tok", "approve_after": 1}"#);
    let out = Command::new(POPBRIDGE_BIN)
        .args(["oauth", "authorize", "--config"])
        .arg(pb.config_path())
        .args(["--user", "tok", "--password-env", "PB_PW"])
        .env("PB_PW", pop_pw)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    logs.push_str(&String::from_utf8_lossy(&out.stdout));
    logs.push_str(&String::from_utf8_lossy(&out.stderr));
    let session = ["user tok", &format!("pass {pop_pw}"), "stat", "quit"];
    poplib(pb.pop3_port(), &session).assert_all_ok();
    auth.control(r#"{"expire_all": true}"#);
    poplib(pb.pop3_port(), &session).assert_all_ok();
    auth.control(r#"{"revoke": "tok"}"#);
    assert!(!poplib(pb.pop3_port(), &session).steps[1].ok);
    logs.push_str(&pb.stop());

    assert!(logs.contains("TRACE"), "trace logging was not on");
    let issued = auth.issued();
    assert!(
        issued.iter().filter(|t| t.starts_with("rt-")).count() >= 2,
        "{issued:?}"
    );
    let secret = std::fs::read_to_string(auth.secret_file()).unwrap();
    let mut secrets: Vec<String> = issued;
    secrets.extend([
        secret.trim().to_owned(),
        pop_pw.to_owned(),
        "at-wrong-token-Qx".to_owned(),
        // Any JWT (the client assertions) starts with its base64url header.
        "eyJ0eXAi".to_owned(),
        "eyJhbGci".to_owned(),
    ]);
    for secret in &secrets {
        let leak = logs
            .lines()
            .find(|l| l.contains(secret.as_str()))
            .unwrap_or_default();
        assert!(
            leak.is_empty(),
            "secret {secret:?} found in the log: {}",
            &leak[..leak.len().min(600)]
        );
    }
}

/// A password typed at a terminal for `popbridge oauth hash-password` (and `oauth authorize`,
/// which reads it the same way) is not echoed back to the screen; the hash still comes out.
#[test]
fn a_password_typed_at_a_terminal_is_not_shown() {
    let pw = "Typed-At-A-Tty-42";
    // Python's pty gives popbridge a real terminal on stdin; it prints what the terminal shows.
    let script = r#"
import os, pty, select, signal, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], [sys.argv[1], "oauth", "hash-password"])
out = b""
deadline = time.time() + 30
def read():
    # Bounded: never blocks past the deadline; None once the child closed the terminal.
    global out
    left = deadline - time.time()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
        return None
    try:
        d = os.read(fd, 4096)
    except OSError:
        return None
    out += d
    return d or None
while b"not shown" not in out and read() is not None:
    pass
os.write(fd, sys.argv[2].encode() + b"\n")
while read() is not None:
    pass
if time.time() >= deadline:
    os.kill(pid, signal.SIGKILL)
    out += b"\n[timed out]"
os.waitpid(pid, 0)
sys.stdout.write(out.decode())
"#;
    let out = Command::new("python3")
        .args(["-c", script, POPBRIDGE_BIN, pw])
        .output()
        .expect("run python3");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("$argon2id$"), "no hash printed: {screen}");
    assert!(!screen.contains(pw), "the password was echoed: {screen}");
}
