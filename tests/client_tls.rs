//! TLS towards clients: POP3S and STLS with real clients (poplib, curl), the plaintext-password
//! policy, STLS command injection, and certificate reload without a restart.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn dovecot() -> Dovecot {
    let dc = Dovecot::start();
    dc.add_user("s", "secret-pw");
    dc.seed("s", &[b"Subject: secure\r\n\r\nover tls\r\n"]);
    dc
}

/// popbridge with the sandbox's certificate (for localhost / 127.0.0.1, signed by ca.pem) on
/// a plain listener (STLS) and a POP3S listener; passwords only over TLS, even on loopback.
fn popbridge_tls(dc: &Dovecot, extra: &str) -> (Popbridge, u16) {
    let pop3s = free_ports(1)[0];
    let pb = Popbridge::start(
        dc,
        &format!(
            "[pop3]\nlisten_tls = \"127.0.0.1:{pop3s}\"\nplaintext_auth = \"tls_only\"\nplaintext_auth_loopback = false\n{extra}\n[pop3.tls]\ncert = \"{}\"\nkey = \"{}\"",
            dc.dir().join("server.pem").display(),
            dc.dir().join("server.key").display(),
        ),
    );
    (pb, pop3s)
}

#[test]
fn pop3s_and_stls_with_poplib_and_curl() {
    let dc = dovecot();
    let (pb, pop3s) = popbridge_tls(&dc, "");
    let steps = ["user s", "pass secret-pw", "retr 1", "quit"];

    let mut implicit = PopOpts::plain(pop3s);
    implicit.tls = PopTls::Implicit;
    implicit.cafile = Some(dc.ca_pem_path());
    let s = poplib_with(&implicit, &steps);
    s.assert_all_ok();
    assert!(String::from_utf8_lossy(&s.step("retr 1").data()).contains("over tls"));

    let mut stls = PopOpts::plain(pb.pop3_port());
    stls.tls = PopTls::Stls;
    stls.cafile = Some(dc.ca_pem_path());
    let s = poplib_with(&stls, &steps);
    s.assert_all_ok();
    assert!(String::from_utf8_lossy(&s.step("retr 1").data()).contains("over tls"));

    let ca = dc.ca_pem_path().display().to_string();
    let r = curl_pop3(
        &format!("pop3://s:secret-pw@127.0.0.1:{}/1", pb.pop3_port()),
        &["--ssl-reqd", "--cacert", &ca],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(String::from_utf8_lossy(&r.stdout).contains("over tls"));
    let r = curl_pop3(
        &format!("pop3s://s:secret-pw@127.0.0.1:{pop3s}/1"),
        &["--cacert", &ca],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(String::from_utf8_lossy(&r.stdout).contains("over tls"));

    let log = pb.log();
    assert!(
        log.contains("listener=\"pop3s\"") || log.contains("listener=pop3s"),
        "{log}"
    );
    assert!(!log.contains("secret-pw"), "a password reached the log");
}

#[test]
fn passwords_are_refused_without_tls_and_capa_says_so() {
    let dc = dovecot();
    let (pb, _) = popbridge_tls(&dc, "");
    let s = poplib(
        pb.pop3_port(),
        &[
            "capa",
            "user s",
            "pass secret-pw",
            "raw AUTH PLAIN AHMAc2VjcmV0LXB3",
            "quit",
        ],
    );
    let capa = String::from_utf8_lossy(&s.step("capa").raw).to_string();
    assert!(capa.contains("STLS"), "{capa}");
    assert!(
        !capa.contains("\r\nUSER\r\n") && !capa.contains("SASL"),
        "{capa}"
    );
    for step in [
        "user s",
        "pass secret-pw",
        "raw AUTH PLAIN AHMAc2VjcmV0LXB3",
    ] {
        let st = s.step(step);
        assert!(!st.ok, "{step} must be refused");
        assert!(
            st.resp.starts_with("-ERR [AUTH]") || st.step == "pass secret-pw",
            "{step}: {}",
            st.resp
        );
    }
    assert!(
        s.step("user s").resp.contains("TLS"),
        "{}",
        s.step("user s").resp
    );
    // curl without TLS cannot log in either.
    let r = curl_pop3(
        &format!("pop3://s:secret-pw@127.0.0.1:{}/", pb.pop3_port()),
        &[],
    );
    assert_ne!(r.code, 0);

    // After STLS, CAPA offers USER and SASL PLAIN and no more STLS.
    let mut stls = PopOpts::plain(pb.pop3_port());
    stls.tls = PopTls::Stls;
    stls.cafile = Some(dc.ca_pem_path());
    let s = poplib_with(&stls, &["capa", "user s", "pass secret-pw", "stat", "quit"]);
    s.assert_all_ok();
    let capa = String::from_utf8_lossy(&s.step("capa").raw).to_string();
    assert!(
        capa.contains("USER") && capa.contains("SASL PLAIN"),
        "{capa}"
    );
    assert!(!capa.contains("STLS"), "{capa}");

    // With plaintext_auth = "always" the plain listener takes passwords again.
    let (pb, _) = popbridge_tls(&dc, "plaintext_auth = \"always\"");
    poplib(
        pb.pop3_port(),
        &["user s", "pass secret-pw", "stat", "quit"],
    )
    .assert_all_ok();
}

#[test]
fn commands_pipelined_behind_stls_never_execute() {
    let dc = dovecot();
    let (pb, _) = popbridge_tls(&dc, "");
    let out = Command::new("python3")
        .arg(repo_root().join("tests/clients/stls_injection.py"))
        .args(["--port", &pb.pop3_port().to_string()])
        .arg("--cafile")
        .arg(dc.ca_pem_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["stls"].as_str().unwrap().starts_with("+OK"), "{v}");
    eprintln!("injection probe: {v}");
    if v["handshake"] == "ok" {
        assert_eq!(v["unprompted"], "", "the injected NOOP was executed: {v}");
        assert!(v["capa_after"].as_str().unwrap().starts_with("+OK"), "{v}");
        assert!(
            pb.wait_for_log(
                "discarded bytes pipelined after STLS",
                Duration::from_secs(5)
            ),
            "{}",
            pb.log()
        );
    }
}

/// The serial number of the certificate a POP3S listener presents.
fn served_serial(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn certificate_is_reloaded_on_sighup_and_a_bad_one_is_refused() {
    let dc = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(dc.dir().join("server.pem"), &cert).unwrap();
    std::fs::copy(dc.dir().join("server.key"), &key).unwrap();
    let pop3s = free_ports(1)[0];
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[pop3]\nlisten_tls = \"127.0.0.1:{pop3s}\"\n[pop3.tls]\ncert = \"{}\"\nkey = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let before = served_serial(pop3s);
    assert!(before.starts_with("serial="), "{before:?}");

    // A renewed certificate: a fresh self-signed one for localhost.
    let (new_cert, new_key) = (dir.path().join("new.pem"), dir.path().join("new.key"));
    self_signed_cert(&new_cert, &new_key);

    // First a broken renewal (certificate without its key): the old one stays in use.
    std::fs::write(&cert, b"not a certificate").unwrap();
    let pid = pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        pb.wait_for_log("keeping the old one", Duration::from_secs(10)),
        "{}",
        pb.log()
    );
    assert_eq!(served_serial(pop3s), before);

    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        pb.wait_for_log("SIGHUP: TLS certificate reloaded", Duration::from_secs(10)),
        "{}",
        pb.log()
    );
    let after = served_serial(pop3s);
    assert!(
        after.starts_with("serial=") && after != before,
        "{before} -> {after}"
    );
}

/// What mpop, fdm and neomutt do when told to fetch from an IP address: send it as the TLS
/// server name (RFC 6066 forbids that). openssl does the same with `-servername 127.0.0.1`.
fn tls_session_with_ip_as_server_name(port: u16) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'QUIT\\r\\n' | openssl s_client -quiet -connect 127.0.0.1:{port} -servername 127.0.0.1 2>/dev/null"
        ))
        .output()
        .expect("run openssl s_client");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("+OK"), "no POP3S greeting: {said:?}");
}

#[test]
fn clients_sending_an_ip_address_as_server_name_leave_no_warning_in_the_log() {
    let dc = dovecot();
    let (mut pb, pop3s) = popbridge_tls(&dc, "");
    tls_session_with_ip_as_server_name(pop3s);
    assert!(
        pb.wait_for_log("pop3 session ended", Duration::from_secs(5)),
        "{}",
        pb.log()
    );
    let log = pb.log();
    assert!(!log.contains("Illegal SNI"), "{log}");
    assert!(
        !log.contains(" WARN "),
        "a warning nobody can act on:\n{log}"
    );

    // The same client with rustls named in the filter: the warning is real, and only the
    // default filter keeps it out.
    let config = pb.config_path();
    pb.kill();
    let log_path = pb.dir().join("rustls-warn.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(POPBRIDGE_BIN)
        .args(["--log-level", "info,rustls=warn", "serve", "--config"])
        .arg(&config)
        .stderr(log_file)
        .spawn()
        .unwrap();
    assert!(
        wait_port(pop3s, Duration::from_secs(20)),
        "no POP3S listener"
    );
    tls_session_with_ip_as_server_name(pop3s);
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("Illegal SNI extension: ignoring IP address presented as hostname"),
        "{log}"
    );
}
