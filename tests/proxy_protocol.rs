//! PROXY protocol v1 and v2 from a trusted load balancer sets the client address that limits
//! and logs see; from an untrusted address the connection is refused.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::*;

fn dovecot() -> Dovecot {
    let dc = Dovecot::start();
    dc.add_user("p", "ppw");
    dc.seed("p", &[b"Subject: p\r\n\r\np\r\n"]);
    dc
}

/// Connect, send `header`, return the first line the server says ("" if it just closes).
fn first_line(port: u16, header: &[u8]) -> (String, TcpStream) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(header).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut line);
    (line, s)
}

fn v2(client: &str) -> Vec<u8> {
    let addrs: ppp::v2::Addresses = (
        client.parse::<SocketAddr>().unwrap(),
        "127.0.0.1:110".parse::<SocketAddr>().unwrap(),
    )
        .into();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        addrs,
    )
    .build()
    .unwrap()
}

#[test]
fn trusted_proxy_sets_the_client_address_for_logs_and_limits() {
    let dc = dovecot();
    let pb = Popbridge::start(
        &dc,
        "[proxy_protocol]\nlisteners = [\"pop3\"]\ntrusted_networks = [\"127.0.0.0/8\"]\n[limits]\nmax_connections_per_ip = 1",
    );
    let port = pb.pop3_port();
    let (g1, _c1) = first_line(port, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 110\r\n");
    assert!(g1.starts_with("+OK"), "{g1}");
    // Same TCP source, another real client: its own per-address slot.
    let (g2, mut c2) = first_line(port, &v2("198.51.100.9:50000"));
    assert!(g2.starts_with("+OK"), "{g2}");
    // A second connection for the first real client is over its per-address limit.
    let (g3, _c3) = first_line(port, b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 110\r\n");
    assert!(g3.starts_with("-ERR [SYS/TEMP]"), "{g3}");

    // The session runs as usual after the header, and the password policy judges the real
    // client: 198.51.100.9 is not loopback, so plaintext_auth_loopback does not cover it.
    c2.write_all(b"USER p\r\nPASS ppw\r\nSTAT\r\nQUIT\r\n")
        .unwrap();
    let mut r = BufReader::new(c2);
    let mut lines = Vec::new();
    for _ in 0..4 {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        lines.push(l);
    }
    assert!(lines[0].starts_with("-ERR [AUTH] Plaintext"), "{lines:?}");
    assert!(lines[3].starts_with("+OK"), "{lines:?}");
    // A proxied loopback client is exempt, and logs in.
    let (g, mut c4) = first_line(port, b"PROXY TCP4 127.0.0.9 127.0.0.1 40002 110\r\n");
    assert!(g.starts_with("+OK"), "{g}");
    c4.write_all(b"USER p\r\nPASS ppw\r\nSTAT\r\nQUIT\r\n")
        .unwrap();
    let mut r = BufReader::new(c4);
    let mut lines = Vec::new();
    for _ in 0..4 {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        lines.push(l);
    }
    assert!(lines[2].starts_with("+OK 1 "), "{lines:?}");

    let log = pb.log();
    assert!(log.contains("client=203.0.113.7:40001"), "{log}");
    assert!(log.contains("client=198.51.100.9:50000"), "{log}");
    assert!(
        log.contains("203.0.113.7") && log.contains("per_ip"),
        "{log}"
    );

    // A connection that does not start with a header is dropped.
    let (g, _) = first_line(port, b"USER p\r\n");
    assert_eq!(g, "", "no greeting without a PROXY header");
}

#[test]
fn proxy_header_from_untrusted_network_is_refused() {
    let dc = dovecot();
    let pb = Popbridge::start(
        &dc,
        "[proxy_protocol]\nlisteners = [\"pop3\"]\ntrusted_networks = [\"10.0.0.0/8\", \"2001:db8::/32\"]",
    );
    let (g, _) = first_line(
        pb.pop3_port(),
        b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 110\r\n",
    );
    assert_eq!(g, "", "refused without a greeting");
    let (g, _) = first_line(pb.pop3_port(), &v2("203.0.113.8:1"));
    assert_eq!(g, "");
    assert!(
        pb.wait_for_log("untrusted address refused", Duration::from_secs(5)),
        "{}",
        pb.log()
    );
    assert!(!pb.log().contains("client=203.0.113.7"));
}
