//! The client's address upstream: a client comes through the PROXY protocol (a hand-written
//! v2 header, as HAProxy's send-proxy-v2 sends it) and popbridge tells the private Dovecot
//! who it is: IMAP `ID ("x-originating-ip" ...)` before login, POP3 `XCLIENT` to a relayed
//! backend. Dovecot trusts loopback (`login_trusted_networks`), so its own log shows the
//! forwarded address as `rip=`; a backend without `forward_client_address` shows popbridge's.

mod support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::Duration;

use support::haproxy::Haproxy;
use support::raw::RawPop3;
use support::*;

/// Dovecot trusting loopback; `f` with one message.
fn trusting_dovecot() -> Dovecot {
    let dc = Dovecot::start_with_conf("login_trusted_networks = 127.0.0.0/8\n");
    for user in ["f", "g", "h"] {
        dc.add_user(user, &format!("{user}pw"));
        dc.seed(user, &[b"Subject: 1\r\n\r\none\r\n"]);
    }
    dc
}

/// A PROXY protocol v2 header for a TCP/IPv4 connection from `src` to `dst`.
fn proxy_v2(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// A POP3 connection to popbridge that claims, through the PROXY header, to come from `from`.
fn connect_as(port: u16, from: SocketAddrV4) -> RawPop3 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let dst = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 2), 110);
    s.write_all(&proxy_v2(from, dst)).unwrap();
    let mut c = RawPop3 {
        writer: s.try_clone().unwrap(),
        reader: std::io::BufReader::new(s),
        greeting: String::new(),
    };
    c.greeting = c.line();
    assert!(c.greeting.starts_with("+OK"), "{}", c.greeting);
    c
}

/// Dovecot's login log line for `user` by `service` (`imap-login`, `pop3-login`).
fn login_line(dc: &Dovecot, service: &str, user: &str) -> Option<String> {
    let needle = format!("{service}: Info: Login: user=<{user}>");
    dc.log()
        .lines()
        .find(|l| l.contains(&needle))
        .map(str::to_owned)
}

fn wait_login_line(dc: &Dovecot, service: &str, user: &str) -> String {
    for _ in 0..100 {
        if let Some(l) = login_line(dc, service, user) {
            return l;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no {service} login of {user}: {}", dc.log_tail(30));
}

#[test]
fn dovecot_sees_the_proxied_clients_address_through_imap_id_and_pop3_xclient() {
    let dc = trusting_dovecot();
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[pop3]\nplaintext_auth = \"always\"\n[imap]\nforward_client_address = true\n\
             [proxy_protocol]\nlisteners = [\"pop3\"]\ntrusted_networks = [\"127.0.0.0/8\"]\n\
             [backends.plain]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {imap}\nsecurity = \"none\"\n\
             [backends.legacy]\nkind = \"pop3\"\nhost = \"127.0.0.1\"\nport = {pop3}\nsecurity = \"none\"\n\
             forward_client_address = true\n\
             [routing]\nrules = [{{ match = \"g\", backend = \"plain\" }}, {{ match = \"h\", backend = \"legacy\" }}]",
            imap = dc.imap_port(),
            pop3 = dc.pop3_port(),
        ),
    );
    let port = pb.pop3_port();

    // IMAP backend with forwarding: ID goes ahead of the login.
    let mut c = connect_as(
        port,
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 51000),
    );
    c.login("f", "fpw");
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let line = wait_login_line(&dc, "imap-login", "f");
    assert!(line.contains("rip=203.0.113.7,"), "{line}");
    assert!(line.contains("session=<popbridge-"), "{line}");

    // IMAP backend without forwarding: Dovecot sees popbridge.
    let mut c = connect_as(
        port,
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 8), 51001),
    );
    c.login("g", "gpw");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let line = wait_login_line(&dc, "imap-login", "g");
    assert!(line.contains("rip=127.0.0.1,"), "{line}");

    // A legacy POP3 backend that offers XCLIENT: the relayed login carries the address.
    let mut c = connect_as(
        port,
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 51002),
    );
    c.login("h", "hpw");
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let line = wait_login_line(&dc, "pop3-login", "h");
    assert!(line.contains("rip=203.0.113.9,"), "{line}\n{}", pb.log());
}

#[test]
fn curl_behind_haproxy_send_proxy_v2_reaches_dovecot_with_its_own_address() {
    let dc = trusting_dovecot();
    let pb = Popbridge::start(
        &dc,
        "[pop3]\nplaintext_auth = \"always\"\n[imap]\nforward_client_address = true\n\
         [proxy_protocol]\nlisteners = [\"pop3\"]\ntrusted_networks = [\"127.0.0.1/32\"]",
    );
    let front = free_ports(1)[0];
    let lb = Haproxy::start(
        &format!(
            "global\n  stats socket {{DIR}}/admin.sock level admin\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend pop3\n  bind 127.0.0.1:{front}\n  default_backend popbridge\n\
             backend popbridge\n  server n1 127.0.0.1:{} send-proxy-v2\n",
            pb.pop3_port()
        ),
        &[front],
    );
    // curl from another loopback address than popbridge's own (127.0.0.1).
    let r = curl_pop3(
        &format!("pop3://f:fpw@127.0.0.1:{front}/1"),
        &["--interface", "127.0.0.5"],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, lb.log());
    assert!(String::from_utf8_lossy(&r.stdout).contains("one"));
    let line = wait_login_line(&dc, "imap-login", "f");
    assert!(line.contains("rip=127.0.0.5,"), "{line}");
}
