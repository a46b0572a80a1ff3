//! popbridge killed with SIGKILL mid-session and restarted, over several rounds, with its sled
//! state sometimes damaged: no mail lost, nothing deleted without a committed QUIT, no hidden
//! mail shown again, UIDLs unchanged. And SIGTERM drains running sessions.

mod support;

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::raw::RawPop3;
use support::*;

fn session(port: u16) -> RawPop3 {
    let mut c = RawPop3::ready(port);
    c.login("k", "kpw");
    c
}

fn uidls(port: u16) -> Vec<String> {
    uidl_list(port, "k", "kpw")
}

#[test]
fn sigkill_rounds_lose_nothing_and_show_nothing_hidden() {
    let dc = Dovecot::start();
    dc.add_user("k", "kpw");
    let msgs: Vec<Vec<u8>> = (0..12)
        .map(|i| format!("Subject: m{i}\r\n\r\nbody {i}\r\n").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    dc.seed("k", &refs);
    let mut pb = Popbridge::start(&dc, "");
    let mut expected = uidls(pb.pop3_port());
    assert_eq!(expected.len(), 12);

    for round in 0..4 {
        // A session marks the first message and never QUITs: popbridge is killed under it.
        let mut doomed = session(pb.pop3_port());
        assert!(doomed.cmd("DELE 1").starts_with("+OK"));
        let pid = pb.pid().to_string();
        assert!(Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success());
        if round % 2 == 1 {
            // Damage the cache: every file of the sled directory overwritten.
            for entry in std::fs::read_dir(pb.state_dir()).unwrap().flatten() {
                if entry.path().is_file() {
                    std::fs::write(entry.path(), b"garbage").unwrap();
                }
            }
        }
        pb.restart();
        drop(doomed);
        assert_eq!(
            uidls(pb.pop3_port()),
            expected,
            "round {round}: an uncommitted DELE was applied or UIDLs changed"
        );

        // A session that commits: the first visible message is hidden for good.
        let mut committed = session(pb.pop3_port());
        assert!(committed.cmd("DELE 1").starts_with("+OK"));
        assert!(committed.cmd("QUIT").starts_with("+OK"));
        expected.remove(0);
        assert_eq!(
            uidls(pb.pop3_port()),
            expected,
            "round {round}: hidden mail came back or UIDLs changed"
        );
        // Nothing was lost upstream: hidden mail is still there.
        assert_eq!(dc.imap_state("k", "kpw", "INBOX").messages.len(), 12);
    }
    assert!(
        pb.log().contains("moving it aside"),
        "damaged state was not rebuilt"
    );
}

#[test]
fn sigterm_drains_running_sessions_then_closes_without_commit() {
    let dc = Dovecot::start();
    dc.add_user("k", "kpw");
    dc.seed(
        "k",
        &[b"Subject: a\r\n\r\na\r\n", b"Subject: b\r\n\r\nb\r\n"],
    );
    let pb = Popbridge::start(&dc, "[pop3]\nshutdown_drain_secs = 2");
    let mut running = session(pb.pop3_port());
    assert!(running.cmd("DELE 1").starts_with("+OK"));
    let pid = pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(pb.wait_for_log("stopping: no new sessions", Duration::from_secs(5)));
    // No new sessions...
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect(("127.0.0.1", pb.pop3_port())).is_err(),
        "still accepting"
    );
    // ... but the running one may finish, and its QUIT commits.
    assert!(running.cmd("STAT").starts_with("+OK 1 "));
    assert!(running.cmd("QUIT").starts_with("+OK"));
    assert!(
        pb.wait_for_log("stopped", Duration::from_secs(10)),
        "{}",
        pb.log()
    );
    let imap = dc.imap_state("k", "kpw", "INBOX");
    assert!(imap.message(1).unwrap().has_flag("$POP3Deleted"));
}

#[test]
fn sigterm_closes_idle_sessions_after_the_drain_without_commit() {
    let dc = Dovecot::start();
    dc.add_user("k", "kpw");
    dc.seed("k", &[b"Subject: a\r\n\r\na\r\n"]);
    let pb = Popbridge::start(&dc, "[pop3]\nshutdown_drain_secs = 1");
    let mut idle = session(pb.pop3_port());
    assert!(idle.cmd("DELE 1").starts_with("+OK"));
    let pid = pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        pb.wait_for_log("stopped", Duration::from_secs(15)),
        "{}",
        pb.log()
    );
    assert!(pb.log().contains("drain time over"), "{}", pb.log());
    let imap = dc.imap_state("k", "kpw", "INBOX");
    assert!(
        !imap.message(1).unwrap().has_flag("$POP3Deleted"),
        "uncommitted DELE applied"
    );
}
