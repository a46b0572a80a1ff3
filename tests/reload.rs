//! SIGHUP reloads the configuration for new sessions without dropping running ones; a bad
//! file keeps the old configuration and says why.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::*;

fn hup(pb: &Popbridge) {
    let pid = pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
}

fn cmd(r: &mut BufReader<TcpStream>, w: &mut TcpStream, line: &str) -> String {
    w.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l
}

#[test]
fn sighup_applies_new_config_to_new_sessions_and_keeps_running_ones() {
    let dc = Dovecot::start();
    dc.add_user("r", "rpw");
    dc.add_user("q", "qpw");
    dc.seed(
        "r",
        &[b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n"],
    );
    dc.seed(
        "q",
        &[b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n"],
    );
    let pb = Popbridge::start(&dc, "");

    // A session running under the old configuration (deletion mode hide).
    let s = TcpStream::connect(("127.0.0.1", pb.pop3_port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut r, mut w) = (BufReader::new(s.try_clone().unwrap()), s);
    let mut greeting = String::new();
    r.read_line(&mut greeting).unwrap();
    assert!(cmd(&mut r, &mut w, "USER r").starts_with("+OK"));
    assert!(cmd(&mut r, &mut w, "PASS rpw").starts_with("+OK"));
    assert!(cmd(&mut r, &mut w, "DELE 1").starts_with("+OK"));

    // A broken edit: the old configuration stays, and the log names the key.
    let path = pb.config_path();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("mode = \"hide\"", "mode = \"shred\"")).unwrap();
    hup(&pb);
    assert!(
        pb.wait_for_log("configuration not reloaded", Duration::from_secs(10)),
        "{}",
        pb.log()
    );
    assert!(pb.log().contains("deletion.mode"), "{}", pb.log());

    // A good edit: expunge from now on.
    std::fs::write(&path, good.replace("mode = \"hide\"", "mode = \"expunge\"")).unwrap();
    hup(&pb);
    assert!(
        pb.wait_for_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        pb.log()
    );

    // The running session was not dropped, and finishes under its own (old) rules: hide.
    assert!(cmd(&mut r, &mut w, "STAT").starts_with("+OK 1 "));
    assert!(cmd(&mut r, &mut w, "QUIT").starts_with("+OK"));
    let imap = dc.imap_state("r", "rpw", "INBOX");
    assert_eq!(imap.uids(), vec![1, 2]);
    assert!(imap.message(1).unwrap().has_flag("$POP3Deleted"));

    // A new session uses the new rules: expunge.
    poplib(pb.pop3_port(), &["user q", "pass qpw", "dele 1", "quit"]).assert_all_ok();
    assert_eq!(dc.imap_state("q", "qpw", "INBOX").uids(), vec![2]);
}
