//! SIGHUP reloads the configuration for new sessions without dropping running ones; a bad
//! file keeps the old configuration and says why.

mod support;

use std::process::Command;
use std::time::Duration;

use support::raw::RawPop3;
use support::*;

fn hup(pb: &Popbridge) {
    let pid = pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
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
    let mut c = RawPop3::ready(pb.pop3_port());
    c.login("r", "rpw");
    assert!(c.cmd("DELE 1").starts_with("+OK"));

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
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let imap = dc.imap_state("r", "rpw", "INBOX");
    assert_eq!(imap.uids(), vec![1, 2]);
    assert!(imap.message(1).unwrap().has_flag("$POP3Deleted"));

    // A new session uses the new rules: expunge.
    poplib(pb.pop3_port(), &["user q", "pass qpw", "dele 1", "quit"]).assert_all_ok();
    assert_eq!(dc.imap_state("q", "qpw", "INBOX").uids(), vec![2]);
}
