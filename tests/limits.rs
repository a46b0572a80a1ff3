//! Abuse limits: connection caps answered with -ERR [SYS/TEMP], the authorization deadline
//! that drops a trickling client, and the growing delay after failed logins that a correct
//! password does not pay.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::*;

fn dovecot() -> Dovecot {
    let dc = Dovecot::start();
    dc.add_user("l", "lpw");
    dc.seed("l", &[b"Subject: x\r\n\r\nx\r\n"]);
    dc
}

fn greeting(port: u16, from: [u8; 4]) -> (TcpStream, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt
        .block_on(socket.connect(SocketAddr::from(([127, 0, 0, 1], port))))
        .unwrap()
        .into_std()
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    (stream, line)
}

#[test]
fn connection_limits_answer_with_sys_temp() {
    let dc = dovecot();
    let pb = Popbridge::start(
        &dc,
        "[limits]\nmax_connections = 3\nmax_connections_per_ip = 2",
    );
    // The harness's readiness probe is a connection too: wait until popbridge has let go of
    // it, or it may still hold one of the two slots of 127.0.0.1 (seen under load).
    assert!(pb.wait_for_log("pop3 session ended", Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(100));
    let port = pb.pop3_port();
    let (_a1, g) = greeting(port, [127, 0, 0, 1]);
    assert!(g.starts_with("+OK"), "{g}");
    let (_a2, g) = greeting(port, [127, 0, 0, 1]);
    assert!(g.starts_with("+OK"), "{g}");
    let (mut a3, g) = greeting(port, [127, 0, 0, 1]);
    assert!(g.starts_with("-ERR [SYS/TEMP]"), "per-address limit: {g}");
    let mut rest = Vec::new();
    assert_eq!(
        a3.read_to_end(&mut rest).unwrap(),
        0,
        "closed after the -ERR"
    );

    let (_b1, g) = greeting(port, [127, 0, 0, 2]);
    assert!(g.starts_with("+OK"), "another address still gets in: {g}");
    let (_c1, g) = greeting(port, [127, 0, 0, 3]);
    assert!(g.starts_with("-ERR [SYS/TEMP]"), "total limit: {g}");

    // Closing a connection frees its slot.
    drop(_a1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_s, g) = greeting(port, [127, 0, 0, 1]);
        if g.starts_with("+OK") {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {g}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_client_trickling_bytes_is_dropped_at_the_auth_deadline() {
    let dc = dovecot();
    let pb = Popbridge::start(&dc, "[limits]\nauth_timeout_secs = 2");
    let (mut s, g) = greeting(pb.pop3_port(), [127, 0, 0, 1]);
    assert!(g.starts_with("+OK"));
    let started = Instant::now();
    // One byte every 200 ms, never a complete login: idle never triggers, the deadline must.
    let mut closed_after = None;
    for b in b"USER l\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n"
        .iter()
        .cycle()
        .take(100)
    {
        if s.write_all(&[*b]).is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let closed_after = closed_after.expect("connection was never closed");
    assert!(
        closed_after >= Duration::from_secs(2),
        "closed too early: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(8),
        "closed too late: {closed_after:?}"
    );
}

fn timed_pass(c: &mut (BufReader<TcpStream>, TcpStream), pw: &str) -> (String, Duration) {
    c.1.write_all(b"USER l\r\n").unwrap();
    let mut line = String::new();
    c.0.read_line(&mut line).unwrap();
    let started = Instant::now();
    c.1.write_all(format!("PASS {pw}\r\n").as_bytes()).unwrap();
    let mut line = String::new();
    c.0.read_line(&mut line).unwrap();
    (line, started.elapsed())
}

#[test]
fn login_delay_grows_after_failures_and_a_correct_password_is_not_slowed() {
    let dc = dovecot();
    let pb = Popbridge::start(
        &dc,
        "[limits]\nauth_penalty_base_ms = 400\nauth_penalty_max_secs = 2",
    );
    let (s, _) = greeting(pb.pop3_port(), [127, 0, 0, 1]);
    let mut c = (BufReader::new(s.try_clone().unwrap()), s);
    let mut delays = Vec::new();
    for _ in 0..3 {
        let (reply, took) = timed_pass(&mut c, "wrong");
        assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
        delays.push(took);
    }
    // 0, then 400 ms, then 800 ms before the answer (plus whatever Dovecot itself takes to
    // refuse a password, which varies).
    assert!(delays[1] >= Duration::from_millis(400), "{delays:?}");
    assert!(delays[2] >= Duration::from_millis(800), "{delays:?}");
    let log = pb.log();
    assert!(log.contains("failures=2 delay_ms=400"), "{log}");
    assert!(log.contains("failures=3 delay_ms=800"), "{log}");
    // The right password now would face 1.6 s if it were delayed; it is not.
    let (reply, took) = timed_pass(&mut c, "lpw");
    assert!(reply.starts_with("+OK"), "{reply}");
    assert!(
        took < Duration::from_millis(1200),
        "correct password was delayed: {took:?}"
    );
    assert!(pb.log().contains("login penalty"));
    // And success cleared the penalty: the next failure is answered at once again.
    c.1.write_all(b"QUIT\r\n").unwrap();
    let (s, _) = greeting(pb.pop3_port(), [127, 0, 0, 1]);
    let mut c = (BufReader::new(s.try_clone().unwrap()), s);
    let (reply, _) = timed_pass(&mut c, "wrong");
    assert!(reply.starts_with("-ERR [AUTH]"));
    assert!(
        pb.log().matches("login penalty").count() == 2,
        "{}",
        pb.log()
    );
}
