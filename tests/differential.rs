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

/// A message whose header ends exactly `header_len` octets in (blank line included), with a
/// short body. Header lines are `Received:`-like lines of at most 100 octets, one folded.
fn long_header_message(header_len: usize, tag: usize) -> Vec<u8> {
    let mut m =
        format!("From: h{tag}@example.test\r\nSubject: long header {header_len}\r\n").into_bytes();
    m.extend_from_slice(b"X-Folded: a folded header line\r\n\tcontinued here\r\n");
    let mut i = 0;
    // Room for this line (at most 102 octets), the last one (at least 16) and the blank line.
    while m.len() + 102 + 18 <= header_len {
        let line = format!("Received: from relay{i}.example.test by mx.example.test; {i:0>60}\r\n");
        let line = &line[..line.len().min(100)];
        m.extend_from_slice(line.as_bytes());
        if !line.ends_with("\r\n") {
            m.extend_from_slice(b"\r\n");
        }
        i += 1;
    }
    let pad = header_len - 2 - m.len();
    assert!(pad >= 16, "header_len {header_len} too small");
    m.extend_from_slice(b"X-Pad: ");
    m.extend(std::iter::repeat_n(b'p', pad - 9));
    m.extend_from_slice(b"\r\n\r\n");
    assert_eq!(m.len(), header_len);
    m.extend_from_slice(b"first body line\r\nsecond body line\r\n.dot line\r\nlast\r\n");
    m
}

/// TOP of messages whose header is longer than TOP's first piece (either of its sizes: the
/// header's end, the blank line, falls just before, on and just after 4, 8 and 16 KiB, and far
/// beyond): the rest comes from a second FETCH, byte for byte what Dovecot's POP3 sends, for
/// single TOPs and for a client previewing every message in turn (first pieces read ahead,
/// 8 KiB long, then 16 KiB once a header was longer).
#[test]
fn top_of_headers_longer_than_the_first_piece_matches_dovecot() {
    let dc = Dovecot::start();
    dc.add_user("hdr", "hdrpw");
    // In this order, the previews run first with the short first piece (8 KiB: the headers
    // ending around 4 KiB and up to 8 KiB fit it), then, from the first header longer than
    // that, with the long one (16 KiB).
    let mut lens = vec![1_000];
    for k in [4096, 8192, 16384] {
        lens.extend([k - 3, k - 2, k - 1, k, k + 1, k + 2, k + 300]);
    }
    lens.extend([40_000, 70_000]);
    let msgs: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| long_header_message(l, i))
        .collect();
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    dc.seed("hdr", &refs);
    let pb = Popbridge::start(&dc, "[pop3]\nmark_seen = false");

    let n = msgs.len();
    let mut steps: Vec<String> = vec!["user hdr".into(), "pass hdrpw".into()];
    // A previewing client: TOP n 0 of every message in order.
    steps.extend((1..=n).map(|i| format!("top {i} 0")));
    // Then single TOPs with lines, and RETR.
    for i in 1..=n {
        steps.extend([format!("top {i} 2"), format!("retr {i}")]);
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
        if d.step.starts_with("top") || d.step.starts_with("retr") {
            let i: usize = d.step.split(' ').nth(1).unwrap().parse().unwrap();
            assert!(
                data(d) == data(b),
                "step {:?} (header of {} octets): data differs (dovecot {} bytes, popbridge {} bytes)",
                d.step,
                lens[i - 1],
                data(d).len(),
                data(b).len()
            );
        }
    }
    // Each TOP n 0 is the whole header and the blank line, dot-terminated.
    for (i, &l) in lens.iter().enumerate() {
        let top = bridged.step(&format!("top {} 0", i + 1));
        assert_eq!(data(top).len(), l + 3, "top {} 0", i + 1);
    }
    // Both piece sizes were used: the session switched to the long one once.
    assert_eq!(
        pb.log_count("TOP's first piece is the long one from now on"),
        1,
        "{}",
        pb.log_tail(20)
    );
}
