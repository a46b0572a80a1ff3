//! How a node stops (SIGTERM): the lame duck phase (`/readyz` answers 503 at once while the
//! listener still takes new sessions, so a load balancer can take the node out first), then
//! no new sessions and the drain, then every remaining session closed at once, even one blocked
//! writing a RETR to a client that stopped reading; and what systemd hears meanwhile
//! (`Type=notify`: READY, RELOADING, STOPPING).

mod support;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::prometheus::http_get;
use support::raw::RawPop3;
use support::*;

fn metrics_config(metrics: u16, extra: &str) -> String {
    format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n{extra}")
}

/// The value of an unlabelled gauge in `/metrics`.
fn gauge(port: u16, name: &str) -> f64 {
    let (_, body) = http_get(port, "/metrics").expect("GET /metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn readyz(port: u16) -> Result<(u16, String), String> {
    http_get(port, "/readyz")
}

/// `/readyz` once it says 200: the listeners are marked ready a moment after they accept, and
/// the probe greets the upstream, which on a loaded machine takes a while.
fn ready_within(port: u16, limit: Duration) -> (u16, String) {
    let start = Instant::now();
    loop {
        let r = readyz(port);
        match r {
            Ok((200, _)) => return r.unwrap(),
            _ if start.elapsed() >= limit => return r.unwrap_or((0, "no answer".into())),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn sigterm_starts_a_lame_duck_phase_then_drains() {
    let dc = Dovecot::start();
    dc.add_user("l", "lpw");
    dc.add_user("m", "mpw");
    dc.seed("m", &[b"Subject: m\r\n\r\nm\r\n"]);
    dc.seed(
        "l",
        &[
            b"Subject: 1\r\n\r\none\r\n",
            b"Subject: 2\r\n\r\ntwo\r\n",
            b"Subject: 3\r\n\r\nthree\r\n",
        ],
    );
    let metrics = free_ports(1)[0];
    let lame = Duration::from_secs(3);
    let mut pb = Popbridge::start(
        &dc,
        &metrics_config(
            metrics,
            "[pop3]\nshutdown_lame_duck_secs = 3\nshutdown_drain_secs = 3",
        ),
    );
    let port = pb.pop3_port();
    assert_eq!(ready_within(metrics, Duration::from_secs(10)).0, 200);
    assert_eq!(gauge(metrics, "popbridge_accepting"), 1.0);

    // A session that runs through the whole stop: it keeps the drain going.
    let mut long = RawPop3::ready(port);
    long.login("m", "mpw");

    pb.signal("TERM");
    let term = Instant::now();
    // At once: not ready any more...
    let mut first_503 = None;
    while term.elapsed() < Duration::from_secs(1) {
        if let Ok((503, body)) = readyz(metrics) {
            assert_eq!(body, "stopping\n");
            first_503 = Some(term.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let first_503 = first_503.expect("/readyz did not answer 503 within 1 s of SIGTERM");
    assert_eq!(gauge(metrics, "popbridge_accepting"), 0.0);
    // ... while the listener still takes new sessions, which work to the end (QUIT commits).
    let s = poplib(port, &["user l", "pass lpw", "stat", "dele 3", "quit"]);
    s.assert_all_ok();
    assert!(
        term.elapsed() < lame,
        "the lame duck session took too long to tell"
    );
    assert!(dc
        .imap_state("l", "lpw", "INBOX")
        .message(3)
        .unwrap()
        .has_flag("$POP3Deleted"));
    assert!(pb.log().contains("stopping: lame duck"), "{}", pb.log());

    // When the lame duck time is over, the listener closes (and not before).
    let mut closed_at = None;
    while term.elapsed() < lame + Duration::from_secs(2) {
        if TcpStream::connect(("127.0.0.1", port)).is_err() {
            closed_at = Some(term.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let closed_at = closed_at.expect("listener still open 2 s after the lame duck time");
    assert!(
        closed_at >= lame - Duration::from_millis(100),
        "listener closed after {closed_at:?}, before the lame duck time {lame:?}"
    );
    // Draining: /readyz still says 503 (not refused), the running session goes on and commits.
    assert_eq!(readyz(metrics).unwrap().0, 503);
    assert!(
        long.cmd("DELE 1").starts_with("+OK"),
        "the draining session was cut"
    );
    assert!(long.cmd("QUIT").starts_with("+OK"));
    let status = pb
        .wait_exit(Duration::from_secs(10))
        .expect("popbridge still running after its drain");
    assert!(status.success(), "{status}");
    assert!(
        readyz(metrics).is_err(),
        "metrics port still open after exit"
    );
    let imap = dc.imap_state("m", "mpw", "INBOX");
    assert!(imap.message(1).unwrap().has_flag("$POP3Deleted"));
    let imap = dc.imap_state("l", "lpw", "INBOX");
    assert!(!imap.message(1).unwrap().has_flag("$POP3Deleted"));
    report(&format!(
        "lame duck: /readyz 503 {:.0} ms after SIGTERM, listener closed after {:.0} ms (lame duck {} s)",
        first_503.as_secs_f64() * 1000.0,
        closed_at.as_secs_f64() * 1000.0,
        lame.as_secs()
    ));
}

#[test]
fn a_second_sigterm_cuts_the_lame_duck_short() {
    let dc = Dovecot::start();
    let mut pb = Popbridge::start(&dc, "[pop3]\nshutdown_lame_duck_secs = 60");
    pb.signal("TERM");
    assert!(pb.wait_for_log("stopping: lame duck", Duration::from_secs(5)));
    assert!(TcpStream::connect(("127.0.0.1", pb.pop3_port())).is_ok());
    pb.signal("TERM");
    let status = pb
        .wait_exit(Duration::from_secs(5))
        .expect("a second SIGTERM did not end the lame duck");
    assert!(status.success(), "{status}");
    assert!(pb.log().contains("lame duck cut short"), "{}", pb.log());
}

#[test]
fn the_end_of_the_drain_closes_a_session_blocked_writing_a_retr_at_once() {
    let dc = Dovecot::start();
    dc.add_user("b", "bpw");
    dc.seed("b", &[b"Subject: small\r\n\r\nsmall\r\n", big_message()]);
    dc.add_user("i", "ipw");
    dc.seed("i", &[b"Subject: idle\r\n\r\nidle\r\n"]);
    let drain = Duration::from_secs(1);
    let mut pb = Popbridge::start(&dc, "[pop3]\nshutdown_drain_secs = 1");
    // An idle session with a DELE, and one whose client stops reading in the middle of a
    // 21 MB RETR after marking a message too.
    let mut idle = RawPop3::ready(pb.pop3_port());
    idle.login("i", "ipw");
    assert!(idle.cmd("DELE 1").starts_with("+OK"));
    let mut blocked = RawPop3::ready(pb.pop3_port());
    blocked.login("b", "bpw");
    assert!(blocked.cmd("DELE 1").starts_with("+OK"));
    assert!(blocked.cmd("RETR 2").starts_with("+OK"));
    // Let popbridge fill the socket buffers and block on its write.
    std::thread::sleep(Duration::from_millis(700));

    pb.signal("TERM");
    let term = Instant::now();
    let status = pb
        .wait_exit(Duration::from_secs(20))
        .expect("popbridge still running 20 s after SIGTERM");
    let took = term.elapsed();
    assert!(status.success(), "{status}");
    // The drain, then at once: no grace for the blocked writer (it used to be 5 s more).
    assert!(
        took < drain + Duration::from_millis(900),
        "stopping took {took:?} with a drain of {drain:?}:\n{}",
        pb.log()
    );
    let log = pb.log();
    assert!(log.contains("drain time over"), "{log}");
    assert!(
        log.matches("outcome=Shutdown").count() >= 2,
        "both sessions end as Shutdown:\n{log}"
    );
    assert!(log.contains("cut=true"), "{log}");
    // Both connections are closed, and neither DELE was applied.
    assert!(idle.wait_closed(Duration::from_secs(2)));
    assert!(blocked.wait_closed(Duration::from_secs(5)));
    for (user, pw) in [("b", "bpw"), ("i", "ipw")] {
        let imap = dc.imap_state(user, pw, "INBOX");
        assert!(
            imap.messages.iter().all(|m| !m.has_flag("$POP3Deleted")),
            "{user}: an uncommitted DELE was applied"
        );
    }
    report(&format!(
        "drain end: SIGTERM to exit {:.0} ms with a {} s drain and a client stuck in a 21 MB RETR",
        took.as_secs_f64() * 1000.0,
        drain.as_secs()
    ));
}

/// `popbridge serve` with `NOTIFY_SOCKET` set, as systemd runs a `Type=notify` service.
struct Notified {
    child: Child,
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
}

impl Notified {
    fn start(config: &std::path::Path) -> Notified {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let child = Command::new(POPBRIDGE_BIN)
            .args(["serve", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Notified {
            child,
            socket,
            _dir: dir,
        }
    }

    /// The next datagram; panics after 10 s.
    fn next(&self) -> String {
        let mut buf = [0u8; 512];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("no sd_notify message within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let dc = Dovecot::start();
    dc.add_user("n", "npw");
    // A configuration file written by the test kit; this process is only used for that.
    let pb = Popbridge::start(&dc, "[pop3]\nshutdown_lame_duck_secs = 1");
    let config = pb.config_path();
    let port = pb.pop3_port();
    let dir = pb.dir().to_path_buf();
    let mut pb = pb;
    pb.kill();

    let mut n = Notified::start(&config);
    let ready = n.next();
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(
        ready.contains(&format!("STATUS=serving POP3 on 127.0.0.1:{port}")),
        "{ready:?}"
    );
    // READY=1 comes once the listener is bound: a client connects at once.
    let c = RawPop3::ready(port);
    drop(c);

    n.signal("HUP");
    assert_eq!(n.next(), "RELOADING=1");
    assert!(n.next().starts_with("READY=1"));

    n.signal("TERM");
    let stopping = n.next();
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");
    assert!(stopping.contains("lame duck for 1 s"), "{stopping:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "popbridge did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(n.child.try_wait().unwrap().unwrap().success());
    drop(dir);
}
