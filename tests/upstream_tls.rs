//! The upstream connection over implicit TLS and STARTTLS, certificates verified against the
//! sandbox CA given as `ca_file`; and refused when it cannot be verified.

mod support;

use support::*;

fn dovecot() -> Dovecot {
    let dc = Dovecot::start();
    dc.add_user("t", "tpw");
    dc.seed("t", &[b"Subject: tls\r\n\r\nover tls\r\n"]);
    dc
}

fn read_first(pb: &Popbridge) -> PopSession {
    poplib(pb.pop3_port(), &["user t", "pass tpw", "retr 1", "quit"])
}

#[test]
fn implicit_tls_with_ca_file() {
    let dc = dovecot();
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[imap]\nport = {}\nsecurity = \"tls\"\nca_file = \"{}\"\ntls_server_name = \"localhost\"",
            dc.imaps_port(),
            dc.ca_pem_path().display()
        ),
    );
    let s = read_first(&pb);
    s.assert_all_ok();
    assert!(String::from_utf8_lossy(&s.step("retr 1").data()).contains("over tls"));
}

#[test]
fn starttls_with_ca_file_and_ip_address_name() {
    let dc = dovecot();
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[imap]\nport = {}\nsecurity = \"starttls\"\nca_file = \"{}\"",
            dc.imap_port(),
            dc.ca_pem_path().display()
        ),
    );
    let s = read_first(&pb);
    s.assert_all_ok();
    assert!(String::from_utf8_lossy(&s.step("retr 1").data()).contains("over tls"));
}

#[test]
fn unverifiable_certificates_are_refused() {
    let dc = dovecot();
    // Without the sandbox CA the self-signed chain is unknown.
    let pb = Popbridge::start(
        &dc,
        &format!("[imap]\nport = {}\nsecurity = \"tls\"", dc.imaps_port()),
    );
    let s = poplib(pb.pop3_port(), &["user t", "pass tpw"]);
    let pass = s.step("pass tpw");
    assert!(pass.resp.starts_with("-ERR [SYS/TEMP]"), "{}", pass.resp);
    assert!(
        pb.log().to_lowercase().contains("certificate"),
        "{}",
        pb.log()
    );

    // The right CA but a name the certificate does not carry.
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[imap]\nport = {}\nsecurity = \"tls\"\nca_file = \"{}\"\ntls_server_name = \"imap.wrong.example\"",
            dc.imaps_port(),
            dc.ca_pem_path().display()
        ),
    );
    let s = poplib(pb.pop3_port(), &["user t", "pass tpw"]);
    assert!(s.step("pass tpw").resp.starts_with("-ERR [SYS/TEMP]"));
}
