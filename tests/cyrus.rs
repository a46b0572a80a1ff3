//! The end-to-end scenarios against a second, different upstream: a private Cyrus IMAP
//! (tests/support/cyrus.rs), driven through popbridge by real clients (poplib, curl).
//! Tests written for both servers run against Cyrus too (`on_both_servers!`): the deletion
//! modes, RSET and dropped connections in tests/deletion.rs; wrong passwords, IN-USE, pipelining,
//! AUTH PLAIN, the fixed snapshot and idle timeouts in tests/errors.rs. This file holds the
//! Cyrus-only ones: byte-exact listing and retrieval against what was appended, stable UIDLs.

mod support;

use support::cyrus::Cyrus;
use support::*;

/// The edge-case mailbox as an IMAP client would APPEND it (Cyrus refuses bare LF), plus a
/// 3 MB message that takes several upstream FETCH pieces.
fn cyrus_mailbox() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = edge_case_named_small()
        .into_iter()
        .map(|(name, m)| (name, to_crlf(&m)))
        .collect();
    let mut big = b"From: big@example.test\r\nSubject: 3 MB\r\n\r\n".to_vec();
    let mut i = 0u64;
    while big.len() < 3 * 1024 * 1024 {
        big.extend_from_slice(
            format!("{i:08} line of a three megabyte message ....\r\n").as_bytes(),
        );
        i += 1;
    }
    v.push(("three-mb", big));
    v
}

fn setup(extra: &str) -> (Cyrus, Popbridge, Vec<(&'static str, Vec<u8>)>) {
    let cy = Cyrus::start();
    cy.add_user("alice", "apw");
    let named = cyrus_mailbox();
    let msgs: Vec<&[u8]> = named.iter().map(|(_, m)| m.as_slice()).collect();
    cy.seed("alice", &msgs);
    let pb = Popbridge::start(&cy, extra);
    (cy, pb, named)
}

#[test]
fn stat_list_uidl_retr_top_are_byte_exact_against_cyrus() {
    let (cy, pb, named) = setup("[pop3]\nmark_seen = false");
    report(&format!("upstream: Cyrus IMAP {}", cy.version()));
    let imap = cy.imap_state("alice", "apw", "INBOX");
    assert_eq!(imap.messages.len(), named.len(), "Cyrus took every APPEND");

    let n = named.len();
    let mut steps: Vec<String> = ["user alice", "pass apw", "stat", "list", "uidl"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for i in 1..=n {
        steps.extend([
            format!("list {i}"),
            format!("uidl {i}"),
            format!("retr {i}"),
            format!("top {i} 0"),
            format!("top {i} 3"),
        ]);
    }
    steps.push("quit".into());
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let mut opts = PopOpts::plain(pb.pop3_port());
    opts.no_lines = true;
    let s = poplib_with(&opts, &steps);
    s.assert_all_ok();

    let total: usize = named.iter().map(|(_, m)| m.len()).sum();
    assert_eq!(s.step("stat").resp, format!("+OK {n} {total}"));
    let mut list = String::new();
    let mut uidl = String::new();
    for (i, ((name, m), im)) in named.iter().zip(&imap.messages).enumerate() {
        let i = i + 1;
        assert_eq!(im.size, m.len() as u64, "{name}: RFC822.SIZE upstream");
        list.push_str(&format!("{i} {}\r\n", m.len()));
        uidl.push_str(&format!("{i} {}\r\n", imap.uidl(im.uid)));
        assert_eq!(
            s.step(&format!("list {i}")).resp,
            format!("+OK {i} {}", m.len())
        );
        assert_eq!(
            s.step(&format!("uidl {i}")).resp,
            format!("+OK {i} {}", imap.uidl(im.uid))
        );
        let retr = s.step(&format!("retr {i}")).data();
        assert!(
            retr == expected_retr_body(m),
            "{name}: RETR differs from what was appended ({} vs {} bytes)",
            retr.len(),
            m.len()
        );
        for lines in [0, 3] {
            assert!(
                s.step(&format!("top {i} {lines}")).data() == expected_top(m, lines),
                "{name}: TOP {i} {lines} differs"
            );
        }
    }
    assert_eq!(s.step("list").data(), list.into_bytes());
    assert_eq!(s.step("uidl").data(), uidl.into_bytes());

    // curl, a second client, reads the same bytes.
    let url = format!("pop3://alice:apw@127.0.0.1:{}", pb.pop3_port());
    for (i, (name, m)) in named.iter().enumerate() {
        let r = curl_pop3(&format!("{url}/{}", i + 1), &[]);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        assert!(
            r.stdout == expected_retr_body(m),
            "{name}: curl RETR differs"
        );
    }
    let r = curl_pop3(&format!("{url}/"), &["-X", "TOP 2 1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, expected_top(&named[1].1, 1));
}

#[test]
fn uidls_are_stable_across_sessions_restarts_and_lost_state_against_cyrus() {
    let (cy, mut pb, named) = setup("");
    let first = uidl_list(pb.pop3_port(), "alice", "apw");
    assert_eq!(first.len(), named.len());
    let imap = cy.imap_state("alice", "apw", "INBOX");
    let expected: Vec<String> = imap.uids().iter().map(|&u| imap.uidl(u)).collect();
    assert_eq!(first, expected);
    // New mail gets new UIDLs; the old ones stay.
    cy.seed("alice", &[b"Subject: later\r\n\r\nlate mail\r\n"]);
    let second = uidl_list(pb.pop3_port(), "alice", "apw");
    assert_eq!(second[..first.len()], first[..]);
    assert_eq!(second.len(), first.len() + 1);
    // A RETR (which sets \Seen upstream) changes no UIDL.
    poplib(
        pb.pop3_port(),
        &["user alice", "pass apw", "retr 1", "quit"],
    )
    .assert_all_ok();
    assert!(cy.imap_state("alice", "apw", "INBOX").messages[0].has_flag("\\Seen"));
    std::fs::remove_dir_all(pb.state_dir()).unwrap();
    pb.restart();
    assert_eq!(uidl_list(pb.pop3_port(), "alice", "apw"), second);
}

#[test]
fn empty_mailbox_against_cyrus() {
    let cy = Cyrus::start();
    cy.add_user("empty", "epw");
    let pb = Popbridge::start(&cy, "");
    let s = poplib(
        pb.pop3_port(),
        &[
            "user empty",
            "pass epw",
            "stat",
            "list",
            "uidl",
            "retr 1",
            "quit",
        ],
    );
    assert_eq!(s.step("stat").resp, "+OK 0 0");
    assert!(s.step("list").ok && s.step("list").data().is_empty());
    assert!(s.step("uidl").ok && s.step("uidl").data().is_empty());
    assert!(!s.step("retr 1").ok);
    assert!(s.step("quit").ok);
}

/// Cyrus's traditional namespace (`altnamespace: no`) keeps a user's folders under INBOX:
/// `move_to = "INBOX/Trash"` works; a top-level `Trash` cannot be created, and then QUIT must
/// say -ERR and leave the mail where it was.
#[test]
fn move_mode_in_cyrus_traditional_namespace() {
    let cy = Cyrus::start_with_conf("altnamespace: no");
    cy.add_user("t", "tpw");
    cy.seed(
        "t",
        &[b"Subject: a\r\n\r\na\r\n", b"Subject: b\r\n\r\nb\r\n"],
    );
    let wrong = Popbridge::start(&cy, "[deletion]\nmode = \"move\"\nmove_to = \"Trash\"");
    let s = poplib(wrong.pop3_port(), &["user t", "pass tpw", "dele 1", "quit"]);
    assert!(s.step("dele 1").ok);
    assert!(
        s.step("quit").resp.starts_with("-ERR"),
        "QUIT claimed a commit that did not happen: {}",
        s.step("quit").resp
    );
    assert_eq!(cy.imap_state("t", "tpw", "INBOX").uids(), vec![1, 2]);
    drop(wrong);

    let pb = Popbridge::start(
        &cy,
        "[deletion]\nmode = \"move\"\nmove_to = \"INBOX/Trash\"",
    );
    poplib(pb.pop3_port(), &["user t", "pass tpw", "dele 1", "quit"]).assert_all_ok();
    assert_eq!(cy.imap_state("t", "tpw", "INBOX").uids(), vec![2]);
    assert_eq!(cy.imap_state("t", "tpw", "INBOX/Trash").messages.len(), 1);
}
