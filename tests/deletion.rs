//! DELE only marks, RSET unmarks, and only QUIT applies the marks; each deletion mode checked
//! upstream through a real IMAP client (imaplib). Every test runs twice: against the private
//! Dovecot and against the private Cyrus (tests/support/cyrus.rs).

mod support;

use support::imap_do::imap_do;
use support::*;

on_both_servers!(
    hide_keeps_mail_upstream_and_never_shows_it_again_even_without_state,
    expunge_removes_only_committed_messages_not_other_clients_deleted_mail,
    move_puts_mail_into_the_folder_creating_it,
    rset_and_dropped_connections_apply_nothing,
    retr_marks_seen_and_top_does_not,
);

const MSGS: [&[u8]; 4] = [
    b"Subject: one\r\n\r\nfirst\r\n",
    b"Subject: two\r\n\r\nsecond\r\n",
    b"Subject: three\r\n\r\nthird\r\n",
    b"Subject: four\r\n\r\nfourth\r\n",
];

fn setup<S: MailServer>(server: S, extra: &str) -> (S, Popbridge) {
    server.add_user("d", "dpw");
    server.seed("d", &MSGS);
    let pb = Popbridge::start(&server, extra);
    (server, pb)
}

fn uidl_lines(port: u16) -> Vec<String> {
    uidl_list(port, "d", "dpw")
}

fn hide_keeps_mail_upstream_and_never_shows_it_again_even_without_state<S: MailServer>(server: S) {
    let (dc, mut pb) = setup(server, "");
    let before = uidl_lines(pb.pop3_port());
    assert_eq!(before.len(), 4);

    let s = poplib(
        pb.pop3_port(),
        &["user d", "pass dpw", "dele 2", "dele 4", "quit"],
    );
    s.assert_all_ok();

    let imap = dc.imap_state("d", "dpw", "INBOX");
    assert_eq!(
        imap.uids(),
        vec![1, 2, 3, 4],
        "hide must not remove mail upstream"
    );
    assert!(imap.message(2).unwrap().has_flag("$POP3Deleted"));
    assert!(imap.message(4).unwrap().has_flag("$POP3Deleted"));
    assert!(!imap.message(1).unwrap().has_flag("$POP3Deleted"));

    let after = uidl_lines(pb.pop3_port());
    assert_eq!(after, vec![before[0].clone(), before[2].clone()]);

    // sled is only a cache: without it, hidden mail stays hidden and UIDLs stay the same.
    std::fs::remove_dir_all(pb.state_dir()).unwrap();
    pb.restart();
    assert_eq!(uidl_lines(pb.pop3_port()), after);
}

fn expunge_removes_only_committed_messages_not_other_clients_deleted_mail<S: MailServer>(
    server: S,
) {
    let (dc, pb) = setup(server, "[deletion]\nmode = \"expunge\"");
    // Another IMAP client marked UID 4 \Deleted but has not expunged it.
    imap_do(
        dc.imap_port(),
        "d",
        "dpw",
        "INBOX",
        &[&["uid", "STORE", "4", "+FLAGS", "(\\Deleted)"]],
    );
    let s = poplib(pb.pop3_port(), &["user d", "pass dpw", "dele 1", "quit"]);
    s.assert_all_ok();
    let imap = dc.imap_state("d", "dpw", "INBOX");
    assert_eq!(imap.uids(), vec![2, 3, 4]);
    assert!(imap.message(4).unwrap().has_flag("\\Deleted"));
    assert_eq!(uidl_lines(pb.pop3_port()).len(), 3);
}

fn move_puts_mail_into_the_folder_creating_it<S: MailServer>(server: S) {
    let (dc, pb) = setup(
        server,
        "[deletion]\nmode = \"move\"\nmove_to = \"Deleted POP3\"",
    );
    assert!(!dc
        .imap_state("d", "dpw", "INBOX")
        .mailboxes
        .contains_key("Deleted POP3"));
    let s = poplib(
        pb.pop3_port(),
        &["user d", "pass dpw", "dele 1", "dele 3", "quit"],
    );
    s.assert_all_ok();
    let inbox = dc.imap_state("d", "dpw", "INBOX");
    assert_eq!(inbox.uids(), vec![2, 4]);
    let moved = dc.imap_state("d", "dpw", "Deleted POP3");
    assert_eq!(moved.messages.len(), 2);
    let sizes: Vec<u64> = moved.messages.iter().map(|m| m.size).collect();
    assert_eq!(sizes, vec![MSGS[0].len() as u64, MSGS[2].len() as u64]);
}

fn rset_and_dropped_connections_apply_nothing<S: MailServer>(server: S) {
    let (dc, pb) = setup(server, "[deletion]\nmode = \"expunge\"");
    let s = poplib(
        pb.pop3_port(),
        &[
            "user d", "pass dpw", "dele 1", "dele 2", "rset", "stat", "quit",
        ],
    );
    s.assert_all_ok();
    assert!(
        s.step("stat").resp.starts_with("+OK 4 "),
        "{}",
        s.step("stat").resp
    );

    // DELE, then the connection drops without QUIT.
    let s = poplib(pb.pop3_port(), &["user d", "pass dpw", "dele 3", "stat"]);
    s.assert_all_ok();
    assert!(s.step("stat").resp.starts_with("+OK 3 "));
    assert!(pb.wait_for_log("outcome=ClientGone", std::time::Duration::from_secs(10)));

    // Deleted messages are refused for the rest of their session.
    let s = poplib(
        pb.pop3_port(),
        &[
            "user d", "pass dpw", "dele 1", "retr 1", "dele 1", "list 1", "top 1 0", "quit",
        ],
    );
    for name in ["retr 1", "list 1", "top 1 0"] {
        assert!(!s.step(name).ok, "{name} of a deleted message must fail");
    }
    // QUIT in AUTHORIZATION state commits nothing either.
    poplib(pb.pop3_port(), &["user d", "quit"]);

    let imap = dc.imap_state("d", "dpw", "INBOX");
    assert_eq!(
        imap.uids(),
        vec![2, 3, 4],
        "only the committed DELE 1 applies"
    );
}

fn retr_marks_seen_and_top_does_not<S: MailServer>(server: S) {
    server.add_user("n", "npw");
    server.seed("n", &MSGS);
    let (dc, pb) = setup(server, "");
    let s = poplib(
        pb.pop3_port(),
        &["user d", "pass dpw", "retr 1", "top 2 0", "quit"],
    );
    s.assert_all_ok();
    let imap = dc.imap_state("d", "dpw", "INBOX");
    assert!(imap.message(1).unwrap().has_flag("\\Seen"));
    assert!(!imap.message(2).unwrap().has_flag("\\Seen"));

    // Another user's untouched mailbox, through a popbridge with mark_seen off.
    drop(pb);
    let pb = Popbridge::start(&dc, "[pop3]\nmark_seen = false");
    poplib(pb.pop3_port(), &["user n", "pass npw", "retr 1", "quit"]).assert_all_ok();
    assert!(!dc
        .imap_state("n", "npw", "INBOX")
        .message(1)
        .unwrap()
        .has_flag("\\Seen"));
}
