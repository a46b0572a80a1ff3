use super::*;
use crate::maildrop::memory::{MemoryEvent, MemoryUpstream};
use crate::maildrop::MaildropKey;
use crate::pop3::routed::{Unrouted, UNROUTED_SERVER};

/// The maildrop an unrouted `BoB` (any case) logs in to.
fn bob() -> MaildropKey {
    MaildropKey::new(UNROUTED_SERVER, "BoB", "INBOX")
}
use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;

struct Client {
    rd: BufReader<ReadHalf<DuplexStream>>,
    wr: WriteHalf<DuplexStream>,
}

impl Client {
    async fn send(&mut self, s: &str) {
        self.wr.write_all(s.as_bytes()).await.unwrap();
    }

    async fn line(&mut self) -> String {
        let mut l = Vec::new();
        self.rd.read_until(b'\n', &mut l).await.unwrap();
        String::from_utf8(l).unwrap()
    }

    async fn cmd(&mut self, s: &str) -> String {
        self.send(&format!("{s}\r\n")).await;
        self.line().await
    }

    /// Lines of a multi-line body (after the status line), raw, up to and excluding ".".
    async fn body(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut l = Vec::new();
            self.rd.read_until(b'\n', &mut l).await.unwrap();
            assert!(l.ends_with(b"\r\n"), "unterminated line {l:?}");
            if l == b".\r\n" {
                return out;
            }
            out.extend_from_slice(&l);
        }
    }

    async fn eof(&mut self) -> bool {
        let mut l = Vec::new();
        matches!(self.rd.read_until(b'\n', &mut l).await, Ok(0))
    }
}

struct Harness {
    up: MemoryUpstream,
    locks: MaildropLocks,
    cfg: Arc<SessionConfig>,
    limits: ConnectionLimits,
    shutdown: watch::Sender<bool>,
}

impl Harness {
    fn new() -> Self {
        let up = MemoryUpstream::new();
        up.add_user("bob", "pw", 0x6b08_0e83);
        up.add_message("bob", 1, &b"Subject: one\r\n\r\nfirst\r\n"[..]);
        up.add_message("bob", 4, &b"Subject: two\r\n\r\n.dot\r\nsecond\r\n"[..]);
        up.add_message("bob", 7, &b"Subject: three\r\n\r\nthird\r\n"[..]);
        Self {
            up,
            locks: MaildropLocks::new(),
            cfg: Arc::new(SessionConfig {
                mark_seen: true,
                ..SessionConfig::default()
            }),
            limits: ConnectionLimits {
                idle_timeout: Duration::from_secs(5),
                fetch_chunk: 64 * 1024,
            },
            shutdown: watch::channel(false).0,
        }
    }

    async fn connect(&self) -> (Client, JoinHandle<SessionOutcome>) {
        let (client, server) = tokio::io::duplex(8 * 1024);
        let (up, locks, cfg, limits) = (
            Unrouted(self.up.clone()),
            self.locks.clone(),
            Arc::clone(&self.cfg),
            self.limits.clone(),
        );
        let rx = self.shutdown.subscribe();
        let task = tokio::spawn(async move { serve(server, &up, &locks, &cfg, &limits, rx).await });
        let (rd, wr) = tokio::io::split(client);
        let mut c = Client {
            rd: BufReader::new(rd),
            wr,
        };
        assert_eq!(c.line().await, "+OK popbridge ready.\r\n");
        (c, task)
    }

    async fn login(&self) -> (Client, JoinHandle<SessionOutcome>) {
        let (mut c, t) = self.connect().await;
        assert_eq!(c.cmd("USER bob").await, "+OK\r\n");
        assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.\r\n");
        (c, t)
    }
}

#[test]
fn outcome_labels_are_the_preinitialised_ones() {
    use SessionOutcome::*;
    for o in [
        Quit,
        Timeout,
        ClientGone,
        UpstreamError,
        Shutdown,
        TooManyErrors,
    ] {
        assert!(crate::metrics::OUTCOMES.contains(&o.label()), "{o:?}");
    }
}

#[tokio::test]
async fn full_session() {
    let h = Harness::new();
    let (mut c, task) = h.connect().await;
    assert_eq!(c.cmd("USER bob").await, "+OK\r\n");
    assert_eq!(
        c.cmd("PASS wrong").await,
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(c.cmd("STAT").await.get(..4), Some("-ERR"));
    assert_eq!(c.cmd("USER BOB").await, "+OK\r\n");
    assert!(c.cmd("PASS pw").await.starts_with("-ERR [AUTH]"));
    assert_eq!(c.cmd("USER bob").await, "+OK\r\n");
    assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.\r\n");
    assert_eq!(c.cmd("STAT").await, "+OK 3 78\r\n");
    assert_eq!(c.cmd("LIST").await, "+OK 3 messages (78 octets)\r\n");
    assert_eq!(c.body().await, b"1 23\r\n2 30\r\n3 25\r\n");
    assert_eq!(c.cmd("UIDL").await, "+OK\r\n");
    assert_eq!(
        c.body().await,
        b"1 000000016b080e83\r\n2 000000046b080e83\r\n3 000000076b080e83\r\n"
    );
    assert_eq!(c.cmd("RETR 2").await, "+OK 30 octets\r\n");
    assert_eq!(c.body().await, b"Subject: two\r\n\r\n..dot\r\nsecond\r\n");
    assert_eq!(c.cmd("DELE 1").await, "+OK message 1 deleted\r\n");
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert!(c.eof().await);
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    assert_eq!(h.up.commits("bob"), vec![vec![1]]);
    assert_eq!(h.up.seen("bob"), vec![4]);
    assert_eq!(h.up.uids("bob"), vec![4, 7]);
    assert!(!h.locks.is_locked(&bob()));
    assert_eq!(h.up.events("bob").last(), Some(&MemoryEvent::Close));
}

#[tokio::test]
async fn pipelining_fifty_commands_in_one_write() {
    let h = Harness::new();
    let (mut c, task) = h.login().await;
    let mut batch = String::new();
    for i in 0..50 {
        batch.push_str(match i % 5 {
            0 => "STAT\r\n",
            1 => "LIST 2\r\n",
            2 => "RETR 3\r\n",
            3 => "NOOP\r\n",
            _ => "UIDL 1\r\n",
        });
    }
    c.send(&batch).await;
    for i in 0..50 {
        let l = c.line().await;
        match i % 5 {
            0 => assert_eq!(l, "+OK 3 78\r\n"),
            1 => assert_eq!(l, "+OK 2 30\r\n"),
            2 => {
                assert_eq!(l, "+OK 25 octets\r\n");
                assert_eq!(c.body().await, b"Subject: three\r\n\r\nthird\r\n");
            }
            3 => assert_eq!(l, "+OK\r\n"),
            _ => assert_eq!(l, "+OK 1 000000016b080e83\r\n"),
        }
    }
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    assert_eq!(h.up.seen("bob"), vec![7; 10]);
}

#[tokio::test]
async fn dele_rset_quit_commits_only_marked() {
    let h = Harness::new();
    let (mut c, task) = h.login().await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert!(c.cmd("DELE 2").await.starts_with("+OK"));
    assert_eq!(c.cmd("STAT").await, "+OK 1 25\r\n");
    assert_eq!(
        c.cmd("RSET").await,
        "+OK maildrop has 3 messages (78 octets)\r\n"
    );
    assert!(c.cmd("DELE 3").await.starts_with("+OK"));
    assert_eq!(c.cmd("DELE 3").await, "-ERR message 3 already deleted\r\n");
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    assert_eq!(h.up.commits("bob"), vec![vec![7]]);
    assert_eq!(h.up.uids("bob"), vec![1, 4]);
}

#[tokio::test]
async fn failed_commit_reports_sys_temp() {
    let h = Harness::new();
    h.up.fail_commit("bob", MaildropError::unavailable("boom"));
    let (mut c, task) = h.login().await;
    c.cmd("DELE 1").await;
    assert_eq!(
        c.cmd("QUIT").await,
        "-ERR [SYS/TEMP] some deleted messages not removed\r\n"
    );
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    assert_eq!(h.up.uids("bob"), vec![1, 4, 7]);
}

#[tokio::test]
async fn dropped_connection_commits_nothing() {
    let h = Harness::new();
    let (mut c, task) = h.login().await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert!(h.locks.is_locked(&bob()));
    drop(c);
    assert_eq!(task.await.unwrap(), SessionOutcome::ClientGone);
    assert!(h.up.commits("bob").is_empty());
    assert_eq!(h.up.uids("bob"), vec![1, 4, 7]);
    assert_eq!(h.up.events("bob").last(), Some(&MemoryEvent::Close));
    assert!(!h.locks.is_locked(&bob()));
}

#[tokio::test]
async fn idle_timeout_closes_without_commit() {
    let mut h = Harness::new();
    h.limits.idle_timeout = Duration::from_millis(100);
    let (mut c, task) = h.login().await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    let outcome = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, SessionOutcome::Timeout);
    assert!(c.eof().await);
    assert!(h.up.commits("bob").is_empty());
}

#[tokio::test]
async fn shutdown_closes_without_commit() {
    let h = Harness::new();
    let (mut c, task) = h.login().await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    h.shutdown.send_replace(true);
    assert_eq!(task.await.unwrap(), SessionOutcome::Shutdown);
    assert!(h.up.commits("bob").is_empty());
}

#[tokio::test]
async fn second_session_gets_in_use() {
    let h = Harness::new();
    let (mut a, task_a) = h.login().await;
    let (mut b, task_b) = h.connect().await;
    assert_eq!(b.cmd("USER Bob").await, "+OK\r\n");
    // Upstream accepts "Bob"? No: memory users are case-sensitive, so use the real name.
    assert!(b.cmd("PASS pw").await.starts_with("-ERR [AUTH]"));
    assert_eq!(b.cmd("USER bob").await, "+OK\r\n");
    assert!(b.cmd("PASS pw").await.starts_with("-ERR [IN-USE]"));
    // The refused session's upstream maildrop was closed: two logins ok, one close so far.
    let closes = |h: &Harness| {
        h.up.events("bob")
            .iter()
            .filter(|e| **e == MemoryEvent::Close)
            .count()
    };
    assert_eq!(closes(&h), 1);
    assert_eq!(a.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(task_a.await.unwrap(), SessionOutcome::Quit);
    // Released: now b can log in.
    assert_eq!(b.cmd("USER bob").await, "+OK\r\n");
    assert_eq!(b.cmd("PASS pw").await, "+OK Logged in.\r\n");
    assert_eq!(b.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(task_b.await.unwrap(), SessionOutcome::Quit);
}

#[tokio::test]
async fn expunged_message_is_gone_and_session_continues() {
    let h = Harness::new();
    let (mut c, task) = h.login().await;
    h.up.expunge("bob", 4);
    assert_eq!(c.cmd("RETR 2").await, "-ERR message 2 no longer exists\r\n");
    assert_eq!(
        c.cmd("TOP 2 0").await,
        "-ERR message 2 no longer exists\r\n"
    );
    assert_eq!(c.cmd("RETR 1").await, "+OK 23 octets\r\n");
    assert_eq!(c.body().await, b"Subject: one\r\n\r\nfirst\r\n");
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    assert_eq!(h.up.seen("bob"), vec![1]);
}

fn big_message(len: usize) -> Vec<u8> {
    let mut m = b"Subject: big\r\nX-Test: yes\r\n\r\n".to_vec();
    let mut i = 0u32;
    while m.len() < len {
        i += 1;
        match i % 4 {
            0 => m.extend_from_slice(b".leading dot line\r\n"),
            1 => m.extend_from_slice(b"bare lf line\n"),
            2 => m.extend_from_slice(format!("line {i} {}\r\n", "x".repeat(60)).as_bytes()),
            _ => m.extend_from_slice(b"..two dots\r\n"),
        }
    }
    m
}

fn unstuff_normalised(body: &[u8]) -> Vec<u8> {
    body.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .flat_map(|l| {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            let l = l.strip_prefix(b".").unwrap_or(l);
            l.iter().copied().chain(*b"\r\n")
        })
        .collect()
}

#[tokio::test]
async fn three_megabyte_message_streamed_in_chunks() {
    let h = Harness::new();
    let msg = big_message(3 * 1024 * 1024);
    h.up.add_message("bob", 9, msg.clone());
    let (mut c, task) = h.login().await;
    assert_eq!(
        c.cmd("RETR 4").await,
        format!("+OK {} octets\r\n", msg.len())
    );
    let body = c.body().await;
    let expected: Vec<u8> = msg
        .split_inclusive(|&b| b == b'\n')
        .flat_map(|l| {
            let l = l.strip_suffix(b"\n").unwrap_or(l);
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            l.iter().copied().chain(*b"\r\n")
        })
        .collect();
    assert_eq!(unstuff_normalised(&body), expected);
    assert!(body.windows(3).any(|w| w == b"\n.."));
    let fetches: Vec<_> =
        h.up.events("bob")
            .into_iter()
            .filter_map(|e| match e {
                MemoryEvent::Fetch {
                    uid: 9,
                    offset,
                    len,
                } => Some((offset, len)),
                _ => None,
            })
            .collect();
    assert_eq!(fetches.len(), msg.len().div_ceil(64 * 1024));
    assert!(fetches.iter().all(|&(_, len)| len == 64 * 1024));
    assert_eq!(fetches[1].0, 64 * 1024);
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    assert_eq!(h.up.seen("bob"), vec![9]);
}

#[tokio::test]
async fn top_sends_header_and_n_lines_and_stops_fetching() {
    let mut h = Harness::new();
    h.limits.fetch_chunk = 1024;
    let msg = big_message(100 * 1024);
    h.up.add_message("bob", 9, msg);
    let (mut c, task) = h.login().await;
    assert_eq!(c.cmd("TOP 4 2").await, "+OK\r\n");
    assert_eq!(
        c.body().await,
        b"Subject: big\r\nX-Test: yes\r\n\r\nbare lf line\r\n"
            .iter()
            .copied()
            .chain(b"line 2 ".iter().copied())
            .chain("x".repeat(60).bytes())
            .chain(*b"\r\n")
            .collect::<Vec<u8>>()
    );
    assert_eq!(c.cmd("TOP 1 0").await, "+OK\r\n");
    assert_eq!(c.body().await, b"Subject: one\r\n\r\n");
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    let fetches =
        h.up.events("bob")
            .iter()
            .filter(|e| matches!(e, MemoryEvent::Fetch { uid: 9, .. }))
            .count();
    assert_eq!(fetches, 1);
    // TOP does not mark messages seen.
    assert!(h.up.seen("bob").is_empty());
}

#[tokio::test]
async fn failure_mid_stream_closes_connection() {
    let mut h = Harness::new();
    h.limits.fetch_chunk = 1024;
    h.up.add_message("bob", 9, big_message(200 * 1024));
    // Past the first 64 KiB flush: the body is partly on the wire.
    h.up.fail_fetch_from("bob", 9, 128 * 1024, MaildropError::unavailable("lost"));
    let (mut c, task) = h.login().await;
    c.cmd("DELE 1").await;
    let status = c.cmd("RETR 4").await;
    assert!(status.starts_with("+OK"), "{status}");
    let mut rest = Vec::new();
    c.rd.read_to_end(&mut rest).await.unwrap();
    assert!(!rest.ends_with(b"\r\n.\r\n"));
    assert_eq!(task.await.unwrap(), SessionOutcome::UpstreamError);
    assert!(h.up.commits("bob").is_empty());
    assert!(h.up.seen("bob").is_empty());
}

#[tokio::test]
async fn early_failure_before_anything_is_flushed_becomes_err() {
    let mut h = Harness::new();
    h.limits.fetch_chunk = 1024;
    h.up.add_message("bob", 9, big_message(10 * 1024));
    h.up.fail_fetch_from("bob", 9, 2048, MaildropError::Gone);
    let (mut c, task) = h.login().await;
    assert_eq!(c.cmd("RETR 4").await, "-ERR message 4 no longer exists\r\n");
    assert_eq!(c.cmd("NOOP").await, "+OK\r\n");
    h.up.fail_fetch_from("bob", 9, 2048, MaildropError::unavailable("x"));
    assert!(c.cmd("RETR 4").await.starts_with("-ERR [SYS/TEMP]"));
    assert!(c.eof().await);
    assert_eq!(task.await.unwrap(), SessionOutcome::UpstreamError);
}

#[tokio::test]
async fn a_top_whose_message_goes_away_after_its_first_piece_is_err_not_truncated() {
    let mut h = Harness::new();
    // A first piece far past the flush threshold, the rest of the message gone.
    h.limits.fetch_chunk = 128 * 1024;
    h.up.add_message("bob", 9, big_message(300 * 1024));
    h.up.fail_fetch_from("bob", 9, 128 * 1024, MaildropError::Gone);
    let (mut c, task) = h.login().await;
    assert_eq!(
        c.cmd("TOP 4 100000").await,
        "-ERR message 4 no longer exists\r\n"
    );
    // Many such answers never reach the error cap: the session goes on.
    for _ in 0..super::super::session::MAX_ERRORS + 5 {
        assert_eq!(
            c.cmd("TOP 4 100000").await,
            "-ERR message 4 no longer exists\r\n"
        );
    }
    // A TOP its first piece ends is served as before.
    assert_eq!(c.cmd("TOP 4 0").await, "+OK\r\n");
    assert!(!c.body().await.is_empty());
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
}

#[tokio::test]
async fn first_fetch_failure_other_than_gone_closes() {
    let h = Harness::new();
    h.up.fail_fetch_from("bob", 1, 0, MaildropError::unavailable("lost"));
    let (mut c, task) = h.login().await;
    assert!(c.cmd("RETR 1").await.starts_with("-ERR [SYS/TEMP]"));
    assert!(c.eof().await);
    assert_eq!(task.await.unwrap(), SessionOutcome::UpstreamError);
}

#[tokio::test]
async fn long_line_gets_err_and_session_continues() {
    let h = Harness::new();
    let (mut c, task) = h.connect().await;
    let long = format!("USER {}\r\nUSER bob\r\n", "a".repeat(400));
    c.send(&long).await;
    assert_eq!(c.line().await, "-ERR Line too long.\r\n");
    assert_eq!(c.line().await, "+OK\r\n");
    assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.\r\n");
    // A giant line in pieces: one error only.
    for _ in 0..20 {
        c.send(&"z".repeat(1000)).await;
    }
    c.send("\r\nNOOP\r\n").await;
    assert_eq!(c.line().await, "-ERR Line too long.\r\n");
    assert_eq!(c.line().await, "+OK\r\n");
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
}

#[tokio::test]
async fn auth_plain_continuation_may_exceed_command_limit() {
    let h = Harness::new();
    let long_pw = "p".repeat(400);
    h.up.add_user("carol", &long_pw, 1);
    let (mut c, task) = h.connect().await;
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ \r\n");
    use base64::Engine as _;
    let resp = base64::engine::general_purpose::STANDARD.encode(format!("\0carol\0{long_pw}"));
    assert_eq!(c.cmd(&resp).await, "+OK Logged in.\r\n");
    assert_eq!(c.cmd("STAT").await, "+OK 0 0\r\n");
    drop(c);
    assert_eq!(task.await.unwrap(), SessionOutcome::ClientGone);
}

#[tokio::test]
async fn too_many_errors_closes() {
    let h = Harness::new();
    let (mut c, task) = h.connect().await;
    let mut batch = String::new();
    for _ in 0..30 {
        batch.push_str("BOGUS\r\n");
    }
    c.send(&batch).await;
    for _ in 0..19 {
        assert_eq!(c.line().await, "-ERR Unknown command.\r\n");
    }
    assert_eq!(
        c.line().await,
        "-ERR Too many errors, closing connection.\r\n"
    );
    assert!(c.eof().await);
    assert_eq!(task.await.unwrap(), SessionOutcome::TooManyErrors);
}

#[tokio::test]
async fn quit_in_authorization_and_login_unavailable() {
    let h = Harness::new();
    h.up.fail_logins(Some(MaildropError::unavailable("down")));
    let (mut c, task) = h.connect().await;
    c.cmd("USER bob").await;
    assert!(c.cmd("PASS pw").await.starts_with("-ERR [SYS/TEMP]"));
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert!(c.eof().await);
    assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    assert!(!h.locks.is_locked(&bob()));
}
