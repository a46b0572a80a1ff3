//! popbridge against Dovecot's own POP3 service on the same mailbox: STAT, LIST, UIDL, RETR and
//! TOP must match byte for byte, over a mailbox of edge cases. Dovecot's POP3 is the reference a
//! site migrates from, so any difference is a client downloading twice or seeing other bytes.

mod support;

use support::*;

/// The multi-line data of a step (after the status line, still dot-stuffed, with terminator).
fn data(step: &PopStep) -> &[u8] {
    split_status(&step.raw).1
}

#[test]
fn popbridge_matches_dovecot_pop3_byte_for_byte() {
    let dc = Dovecot::start();
    dc.add_user("edge", "edgepw");
    let named = edge_case_named();
    let msgs: Vec<&[u8]> = named.iter().map(|(_, m)| m.as_slice()).collect();
    dc.seed("edge", &msgs);
    let pb = Popbridge::start(&dc, "[pop3]\nmark_seen = false");

    let n = msgs.len();
    let mut steps: Vec<String> = ["user edge", "pass edgepw", "stat", "list", "uidl"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for i in 1..=n {
        for s in [
            format!("list {i}"),
            format!("uidl {i}"),
            format!("retr {i}"),
            format!("top {i} 0"),
            format!("top {i} 1"),
            format!("top {i} 5"),
        ] {
            steps.push(s);
        }
    }
    steps.push("quit".into());
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();

    let mut opts = PopOpts::plain(dc.pop3_port());
    opts.no_lines = true;
    let reference = poplib_with(&opts, &steps);
    reference.assert_all_ok();
    opts.port = pb.pop3_port();
    let bridged = poplib_with(&opts, &steps);
    bridged.assert_all_ok();

    assert_eq!(reference.steps.len(), bridged.steps.len());
    for (d, b) in reference.steps.iter().zip(&bridged.steps) {
        assert_eq!(d.step, b.step);
        let what = format!("step {:?} ({})", d.step, describe(&named, &d.step));
        match d.step.split(' ').next().unwrap() {
            // One-line replies whose format RFC 1939 fixes: compare the whole status line.
            "stat" => assert_eq!(d.resp, b.resp, "{what}"),
            "list" | "uidl" if d.step.contains(' ') => assert_eq!(d.resp, b.resp, "{what}"),
            // Multi-line replies: the free text of the status line may differ, the data not.
            "list" | "uidl" | "retr" | "top" => {
                assert!(
                    data(d) == data(b),
                    "{what}: data differs (dovecot {} bytes, popbridge {} bytes); first difference at {:?}",
                    data(d).len(),
                    data(b).len(),
                    data(d).iter().zip(data(b)).position(|(x, y)| x != y)
                );
            }
            _ => {}
        }
    }

    // LIST octets equal what RETR sends before dot-stuffing (RFC 1939), for every message.
    for i in 1..=n {
        let size: usize = bridged
            .step(&format!("list {i}"))
            .resp
            .split(' ')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        let retr = bridged.step(&format!("retr {i}"));
        // Like Dovecot, RETR ends a message without a final newline with an added CRLF.
        let added = if msgs[i - 1].ends_with(b"\n") { 0 } else { 2 };
        assert_eq!(
            retr.data().len(),
            size + added,
            "message {i} ({}): LIST size vs RETR bytes",
            named[i - 1].0
        );
    }
}

fn describe(named: &[(&str, Vec<u8>)], step: &str) -> String {
    step.split(' ')
        .nth(1)
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| named.get(n - 1))
        .map(|(name, _)| name.to_string())
        .unwrap_or_default()
}

/// The UIDLs equal Dovecot's own and survive a popbridge restart with its state deleted.
#[test]
fn uidls_are_dovecots_and_survive_restart_without_state() {
    let dc = Dovecot::start();
    dc.add_user("u", "pw");
    dc.seed(
        "u",
        &[b"Subject: a\r\n\r\nA\r\n", b"Subject: b\r\n\r\nB\r\n"],
    );
    let reference = poplib(dc.pop3_port(), &["user u", "pass pw", "uidl", "quit"]);
    reference.assert_all_ok();
    let expected = data(reference.step("uidl")).to_vec();
    let imap = dc.imap_state("u", "pw", "INBOX");
    assert!(String::from_utf8_lossy(&expected).contains(&imap.uidl(1)));

    let mut pb = Popbridge::start(&dc, "");
    let first = poplib(pb.pop3_port(), &["user u", "pass pw", "uidl", "quit"]);
    first.assert_all_ok();
    assert_eq!(data(first.step("uidl")), expected.as_slice());
    let state = pb.state_dir();
    assert!(state.exists(), "state dir was not created");
    std::fs::remove_dir_all(&state).unwrap();
    pb.restart();
    let second = poplib(pb.pop3_port(), &["user u", "pass pw", "uidl", "quit"]);
    second.assert_all_ok();
    assert_eq!(data(second.step("uidl")), expected.as_slice());
}

/// curl, a second real client, reads the same bytes as Dovecot serves.
#[test]
fn curl_reads_the_same_message_as_from_dovecot() {
    let dc = Dovecot::start();
    dc.add_user("c", "cpw");
    let named = edge_case_named_small();
    let msgs: Vec<&[u8]> = named.iter().map(|(_, m)| m.as_slice()).collect();
    dc.seed("c", &msgs);
    let pb = Popbridge::start(&dc, "");
    let list_d = curl_pop3(&format!("pop3://c:cpw@127.0.0.1:{}/", dc.pop3_port()), &[]);
    let list_b = curl_pop3(&format!("pop3://c:cpw@127.0.0.1:{}/", pb.pop3_port()), &[]);
    assert_eq!(list_d.code, 0, "{}", list_d.stderr);
    assert_eq!(list_b.code, 0, "{}", list_b.stderr);
    assert_eq!(list_d.stdout, list_b.stdout);
    for i in 1..=msgs.len() {
        let d = curl_pop3(
            &format!("pop3://c:cpw@127.0.0.1:{}/{i}", dc.pop3_port()),
            &[],
        );
        let b = curl_pop3(
            &format!("pop3://c:cpw@127.0.0.1:{}/{i}", pb.pop3_port()),
            &[],
        );
        assert_eq!(b.code, 0, "{}", b.stderr);
        assert!(
            d.stdout == b.stdout,
            "message {i} ({}) differs through curl",
            named[i - 1].0
        );
    }
    let uidl_d = curl_pop3(
        &format!("pop3://c:cpw@127.0.0.1:{}/", dc.pop3_port()),
        &["-X", "UIDL"],
    );
    let uidl_b = curl_pop3(
        &format!("pop3://c:cpw@127.0.0.1:{}/", pb.pop3_port()),
        &["-X", "UIDL"],
    );
    assert!(!uidl_b.stdout.is_empty());
    assert_eq!(uidl_d.stdout, uidl_b.stdout);
}
