//! The harness itself, proved against Dovecot's own POP3 and IMAP (no popbridge involved).
//! These also pin down the byte-level behaviour popbridge must reproduce.

mod support;

use std::time::{Duration, Instant};

use support::*;

const USER: &str = "alice";
const PW: &str = "s3cret pw";

fn dovecot_with(messages: &[&[u8]]) -> Dovecot {
    let dc = Dovecot::start();
    dc.add_user(USER, PW);
    dc.seed(USER, messages);
    dc
}

fn login() -> Vec<String> {
    vec![format!("user {USER}"), format!("pass {PW}")]
}

fn run(port: u16, steps: &[String]) -> PopSession {
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    poplib(port, &refs)
}

/// Every message of the edge-case mailbox through poplib against Dovecot's POP3: sizes, UIDLs,
/// RETR and TOP byte for byte, and the IMAP side effects (RETR marks \Seen).
#[test]
fn poplib_reads_every_edge_case_from_dovecot() {
    let named = edge_case_named_small();
    let msgs: Vec<&[u8]> = named.iter().map(|(_, m)| m.as_slice()).collect();
    let dc = dovecot_with(&msgs);
    let before = dc.imap_state(USER, PW, "INBOX");
    assert_eq!(
        before.uids(),
        (1..=msgs.len() as u32).collect::<Vec<_>>(),
        "seeding must give UIDs 1..n in order"
    );
    for (m, msg) in before.messages.iter().zip(&msgs) {
        assert_eq!(
            m.size,
            crlf_size(msg) as u64,
            "RFC822.SIZE of UID {}",
            m.uid
        );
        assert!(m.flags.is_empty(), "seeded unseen: {:?}", m.flags);
    }

    let mut steps = login();
    steps.extend(["stat".into(), "list".into(), "uidl".into()]);
    for i in 1..=msgs.len() {
        steps.push(format!("top {i} 0"));
        steps.push(format!("top {i} 2"));
        steps.push(format!("retr {i}"));
    }
    steps.push("quit".into());
    let s = run(dc.pop3_port(), &steps);
    s.assert_all_ok();

    let total: usize = msgs.iter().map(|m| crlf_size(m)).sum();
    assert_eq!(s.step("stat").resp, format!("+OK {} {total}", msgs.len()));
    let list: Vec<String> = s
        .step("list")
        .lines
        .clone()
        .unwrap()
        .into_iter()
        .map(|l| String::from_utf8(l).unwrap())
        .collect();
    let want: Vec<String> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{} {}", i + 1, crlf_size(m)))
        .collect();
    assert_eq!(list, want, "LIST");

    let uidl: Vec<String> = s
        .step("uidl")
        .lines
        .clone()
        .unwrap()
        .into_iter()
        .map(|l| String::from_utf8(l).unwrap())
        .collect();
    let want: Vec<String> = before
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{} {}", i + 1, before.uidl(m.uid)))
        .collect();
    assert_eq!(uidl, want, "UIDL must be %08x%08x of uid/uidvalidity");

    for (i, (name, msg)) in named.iter().enumerate() {
        let n = i + 1;
        let retr = s.step(&format!("retr {n}"));
        let (status, _) = split_status(&retr.raw);
        assert!(status.starts_with(b"+OK"), "{name}: {status:?}");
        let want = expected_retr_body(msg);
        assert_eq!(retr.data(), want, "{name}: RETR data");
        assert_eq!(
            &retr.raw[status.len() + 2..],
            dot_stuff(&want).as_slice(),
            "{name}: RETR wire bytes"
        );
        assert_eq!(retr.lines_joined(), want, "{name}: poplib's view of RETR");
        if *name != "headers-only" {
            for lines in [0, 2] {
                let top = s.step(&format!("top {n} {lines}"));
                assert_eq!(
                    top.data(),
                    expected_top(msg, lines),
                    "{name}: TOP {n} {lines}"
                );
            }
        }
    }

    let after = dc.imap_state(USER, PW, "INBOX");
    assert_eq!(after.uids(), before.uids(), "nothing deleted");
    assert!(
        after.messages.iter().all(|m| m.has_flag("\\Seen")),
        "Dovecot's RETR marks \\Seen: {:?}",
        after.messages
    );
}

/// The facts popbridge must reproduce byte for byte (recorded from Dovecot 2.3.19.1).
#[test]
fn dovecot_pop3_byte_level_facts() {
    let named = edge_case_named_small();
    let pick = |want: &str| {
        named
            .iter()
            .find(|(n, _)| *n == want)
            .map(|(_, m)| m.clone())
            .unwrap()
    };
    let headers_only = pick("headers-only");
    let no_nl = pick("no-final-newline");
    let dot_no_nl = pick("dot-no-final-newline");
    let empty_body = pick("empty-body");
    let dc = dovecot_with(&[&headers_only, &no_nl, &dot_no_nl, &empty_body]);
    let st = dc.imap_state(USER, PW, "INBOX");

    let mut steps = login();
    for s in [
        "uidl 1", "list 1", "top 1 0", "top 1 5", "retr 1", "list 2", "retr 2", "top 2 0",
        "top 2 1", "top 2 9", "retr 3", "top 4 0", "retr 4", "quit",
    ] {
        steps.push(s.into());
    }
    let s = run(dc.pop3_port(), &steps);
    s.assert_all_ok();
    for step in &s.steps {
        eprintln!(
            "{:>8} -> {}",
            step.step,
            String::from_utf8_lossy(&step.raw).escape_debug()
        );
    }

    // UIDL of UID 1: UID then UIDVALIDITY, 8 lower-case hex digits each.
    let uidl1 = format!("00000001{:08x}", st.uidvalidity);
    assert_eq!(
        s.step("uidl 1").raw,
        format!("+OK 1 {uidl1}\r\n").into_bytes()
    );

    // Headers only (no blank line, no body): Dovecot's TOP 1 0 and RETR both send the header
    // block as stored, with no blank line added, then the terminator.
    let hdr = headers_only.as_slice();
    let size = hdr.len();
    assert_eq!(
        s.step("list 1").raw,
        format!("+OK 1 {size}\r\n").into_bytes()
    );
    let mut want = b"+OK\r\n".to_vec();
    want.extend_from_slice(hdr);
    want.extend_from_slice(b".\r\n");
    assert_eq!(
        s.step("top 1 0").raw,
        want,
        "TOP 1 0 of a headers-only message"
    );
    assert_eq!(
        s.step("top 1 5").raw,
        want,
        "TOP 1 5 of a headers-only message"
    );
    let mut want = format!("+OK {size} octets\r\n").into_bytes();
    want.extend_from_slice(hdr);
    want.extend_from_slice(b".\r\n");
    assert_eq!(s.step("retr 1").raw, want, "RETR of a headers-only message");

    // No final newline: LIST counts the stored bytes; RETR adds CRLF before the terminator.
    let size = no_nl.len();
    assert_eq!(
        s.step("list 2").raw,
        format!("+OK 2 {size}\r\n").into_bytes()
    );
    let mut want = format!("+OK {size} octets\r\n").into_bytes();
    want.extend_from_slice(&no_nl);
    want.extend_from_slice(b"\r\n.\r\n");
    assert_eq!(
        s.step("retr 2").raw,
        want,
        "RETR of a message without final newline"
    );
    let mut want = b"+OK\r\n".to_vec();
    want.extend_from_slice(&no_nl);
    want.extend_from_slice(b"\r\n.\r\n");
    assert_eq!(s.step("top 2 9").raw, want, "TOP 2 9 (past the end)");
    assert_eq!(s.step("top 2 1").data(), expected_top(&no_nl, 1), "TOP 2 1");
    assert_eq!(s.step("top 2 0").data(), expected_top(&no_nl, 0), "TOP 2 0");

    // Last line a lone dot without newline: stuffed, CRLF added.
    let mut want = format!("+OK {} octets\r\n", dot_no_nl.len()).into_bytes();
    want.extend_from_slice(&dot_no_nl[..dot_no_nl.len() - 1]);
    want.extend_from_slice(b"..\r\n.\r\n");
    assert_eq!(s.step("retr 3").raw, want, "RETR, lone dot without newline");

    // Empty body (headers + blank line): TOP 4 0 and RETR are identical in data.
    let mut want = b"+OK\r\n".to_vec();
    want.extend_from_slice(&empty_body);
    want.extend_from_slice(b".\r\n");
    assert_eq!(
        s.step("top 4 0").raw,
        want,
        "TOP 4 0 of an empty-body message"
    );
    assert_eq!(s.step("retr 4").data(), empty_body);
}

/// curl, the other real client: LIST, RETR, UIDL, TOP, pop3s and STLS against the sandbox CA.
#[test]
fn curl_against_dovecot_pop3() {
    let named = edge_case_named_small();
    let msgs: Vec<&[u8]> = named.iter().map(|(_, m)| m.as_slice()).collect();
    let dc = dovecot_with(&msgs);
    let base = format!(
        "pop3://{USER}:{}@127.0.0.1:{}",
        "s3cret%20pw",
        dc.pop3_port()
    );

    let list = curl_pop3(&format!("{base}/"), &[]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    let want: String = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{} {}\r\n", i + 1, crlf_size(m)))
        .collect();
    assert_eq!(String::from_utf8(list.stdout).unwrap(), want);

    for (i, (name, msg)) in named.iter().enumerate() {
        let r = curl_pop3(&format!("{base}/{}", i + 1), &[]);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        assert_eq!(r.stdout, expected_retr_body(msg), "{name}: curl RETR");
    }

    let st = dc.imap_state(USER, PW, "INBOX");
    let uidl = curl_pop3(&format!("{base}/"), &["-X", "UIDL"]);
    assert_eq!(uidl.code, 0);
    let want: String = st
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{} {}\r\n", i + 1, st.uidl(m.uid)))
        .collect();
    assert_eq!(String::from_utf8(uidl.stdout).unwrap(), want);

    let top = curl_pop3(&format!("{base}/"), &["-X", "TOP 1 0"]);
    assert_eq!(top.code, 0);
    assert_eq!(top.stdout, expected_top(msgs[0], 0));

    let ca = dc.ca_pem_path();
    let ca = ca.to_str().unwrap();
    for url in [
        format!("pop3s://{USER}:s3cret%20pw@localhost:{}/1", dc.pop3s_port()),
        format!("pop3s://{USER}:s3cret%20pw@127.0.0.1:{}/1", dc.pop3s_port()),
    ] {
        let r = curl_pop3(&url, &["--cacert", ca]);
        assert_eq!(r.code, 0, "{url}: {}", r.stderr);
        assert_eq!(r.stdout, expected_retr_body(msgs[0]));
    }
    let r = curl_pop3(&format!("{base}/1"), &["--ssl-reqd", "--cacert", ca]);
    assert_eq!(r.code, 0, "STLS: {}", r.stderr);
    assert_eq!(r.stdout, expected_retr_body(msgs[0]));

    // Without the sandbox CA, verification must fail (curl 60: peer certificate).
    let r = curl_pop3(
        &format!("pop3s://{USER}:s3cret%20pw@localhost:{}/", dc.pop3s_port()),
        &[],
    );
    assert_eq!(r.code, 60, "unverified cert must be refused: {}", r.stderr);

    let bad = curl_pop3(
        &format!("pop3://{USER}:wrong@127.0.0.1:{}/", dc.pop3_port()),
        &[],
    );
    assert_eq!(bad.code, 67, "login denied: {}", bad.stderr);
}

/// TLS through both real clients: pop3s and STLS with poplib, imaps and STARTTLS with imaplib,
/// all verified against DIR/ca.pem; and wrong passwords fail fast (auth_failure_delay = 0).
#[test]
fn tls_and_auth_against_dovecot() {
    let dc = dovecot_with(&[b"Subject: tls\r\n\r\nhello over TLS\r\n"]);
    let ca = dc.ca_pem_path();
    for (tls, port) in [
        (PopTls::Implicit, dc.pop3s_port()),
        (PopTls::Stls, dc.pop3_port()),
    ] {
        let opts = PopOpts {
            port,
            tls,
            cafile: Some(ca.clone()),
            no_lines: false,
        };
        let s = poplib_with(
            &opts,
            &[
                &format!("user {USER}"),
                &format!("pass {PW}"),
                "retr 1",
                "quit",
            ],
        );
        s.assert_all_ok();
        assert_eq!(
            s.step("retr 1").data(),
            b"Subject: tls\r\n\r\nhello over TLS\r\n"
        );
    }

    for tls in ["implicit", "starttls"] {
        let port = if tls == "implicit" {
            dc.imaps_port()
        } else {
            dc.imap_port()
        };
        let out = std::process::Command::new("python3")
            .arg(repo_root().join("tests/clients/imap_state.py"))
            .args(["--port", &port.to_string(), "--tls", tls, "--cafile"])
            .arg(&ca)
            .args(["--user", USER, "--password", PW])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "imap {tls}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["messages"].as_array().map(Vec::len),
            Some(1),
            "imap {tls}: {v}"
        );
    }

    let t = Instant::now();
    let s = poplib(
        dc.pop3_port(),
        &[
            &format!("user {USER}"),
            "pass wrong",
            &format!("user {USER}"),
            &format!("pass {PW}"),
            "stat",
            "quit",
        ],
    );
    assert!(!s.step("pass wrong").ok);
    assert!(
        s.step("pass wrong").resp.starts_with("-ERR [AUTH]"),
        "{}",
        s.step("pass wrong").resp
    );
    assert_eq!(s.step("stat").resp, "+OK 1 32");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "auth failure delay: {:?}",
        t.elapsed()
    );
}

/// imap_state sees what a POP3 session did upstream: DELE+QUIT expunges, RSET undoes, and
/// seeding later appends UIDs after the existing ones.
#[test]
fn imap_state_observes_pop3_effects() {
    let msgs: Vec<Vec<u8>> = (1..=4)
        .map(|i| format!("Subject: message {i}\r\n\r\nbody {i}\r\n").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    let dc = dovecot_with(&refs[..3]);
    let v0 = dc.imap_state(USER, PW, "INBOX");
    assert_eq!(v0.uids(), vec![1, 2, 3]);
    assert_eq!(v0.mailboxes.get("INBOX"), Some(&3));

    let s = poplib(
        dc.pop3_port(),
        &[
            &format!("user {USER}"),
            &format!("pass {PW}"),
            "dele 1",
            "rset",
            "dele 2",
            "quit",
        ],
    );
    s.assert_all_ok();
    let v1 = dc.imap_state(USER, PW, "INBOX");
    assert_eq!(v1.uids(), vec![1, 3], "DELE 2 + QUIT expunged UID 2 only");
    assert_eq!(v1.uidvalidity, v0.uidvalidity);

    dc.seed(USER, &refs[3..]);
    let v2 = dc.imap_state(USER, PW, "INBOX");
    assert_eq!(v2.uids(), vec![1, 3, 4], "later seeds get higher UIDs");
    let s = poplib(
        dc.pop3_port(),
        &[
            &format!("user {USER}"),
            &format!("pass {PW}"),
            "uidl",
            "retr 3",
            "quit",
        ],
    );
    s.assert_all_ok();
    assert_eq!(s.step("retr 3").data(), msgs[3]);
    let third = String::from_utf8(s.step("uidl").lines.clone().unwrap()[2].clone()).unwrap();
    assert_eq!(third, format!("3 {}", v2.uidl(4)));
}

/// The 21 MB message: LIST size, UIDL, and RETR through poplib byte for byte.
#[test]
fn big_message_through_dovecot_pop3() {
    let big = big_message();
    assert!(big.len() > 20 * 1024 * 1024, "{}", big.len());
    let dc = dovecot_with(&[b"Subject: small\r\n\r\nsmall\r\n", big]);
    let t = Instant::now();
    let opts = PopOpts {
        no_lines: true,
        ..PopOpts::plain(dc.pop3_port())
    };
    let s = poplib_with(
        &opts,
        &[
            &format!("user {USER}"),
            &format!("pass {PW}"),
            "list 2",
            "top 2 3",
            "retr 2",
            "quit",
        ],
    );
    eprintln!("21 MB RETR through poplib + JSON: {:?}", t.elapsed());
    s.assert_all_ok();
    assert_eq!(s.step("list 2").resp, format!("+OK 2 {}", crlf_size(big)));
    assert_eq!(s.step("top 2 3").data(), expected_top(big, 3));
    let retr = s.step("retr 2");
    assert_eq!(retr.data().len(), big.len());
    assert!(
        retr.data() == big,
        "RETR 2 differs from the seeded 21 MB message"
    );
}

/// The whole edge-case set, as the harness hands it out, has what the brief promises.
#[test]
fn edge_case_mailbox_is_complete() {
    let all = edge_case_messages();
    let named = edge_case_named();
    assert_eq!(all.len(), named.len());
    let has = |f: &dyn Fn(&[u8]) -> bool| all.iter().any(|m| f(m));
    assert!(
        has(&|m| m.windows(3).any(|w| w == b"\n.l")),
        "line starting with '.'"
    );
    assert!(
        has(&|m| m.windows(5).any(|w| w == b"\r\n.\r\n")),
        "line that is only '.'"
    );
    assert!(has(&|m| !m.ends_with(b"\n")), "no final newline");
    assert!(
        has(&|m| {
            let hdr_end = m
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap_or(m.len());
            m[..hdr_end].iter().any(|b| *b >= 0x80)
        }),
        "8-bit header"
    );
    assert!(
        has(&|m| m.split(|b| *b == b'\n').any(|l| l.len() > 10_000)),
        "10k+ line"
    );
    assert!(
        has(&|m| !m.windows(2).any(|w| w == b"\n\n") && !m.windows(4).any(|w| w == b"\r\n\r\n")),
        "headers only"
    );
    assert!(has(&|m| m.ends_with(b"\r\n\r\n")), "empty body");
    assert!(
        has(&|m| m.windows(23).any(|w| w == b"multipart/mixed; bounda")),
        "multipart"
    );
    assert!(
        has(&|m| m.contains(&b'\n') && !m.contains(&b'\r')),
        "LF-only"
    );
    assert!(has(&|m| m.len() > 20 * 1024 * 1024), "20+ MB");
    assert_eq!(edge_case_messages(), all, "generated deterministically");
    let b64 = base64_wrapped(b"any carnal pleasure.");
    assert_eq!(b64, b"YW55IGNhcm5hbCBwbGVhc3VyZS4=\r\n");
    // 76-column MIME lines: 57 input bytes per full line.
    let wrapped = base64_wrapped(&[0xa5; 120]);
    let lines: Vec<&[u8]> = wrapped.split(|b| *b == b'\n').collect();
    assert_eq!(
        lines.iter().map(|l| l.len()).collect::<Vec<_>>(),
        vec![77, 77, 9, 0],
        "76 characters + CR per line, last line short, CRLF after each"
    );
    assert_eq!(json_quote("a\"b\\c\u{1}\n"), r#""a\"b\\c\u0001\n""#);
}

/// The config merge used by Popbridge::start (no popbridge binary needed).
#[test]
fn popbridge_config_merge() {
    let base = vec![
        (
            "pop3".to_string(),
            vec![("listen".to_string(), "\"127.0.0.1:1\"".to_string())],
        ),
        (
            "deletion".to_string(),
            vec![("mode".to_string(), "\"hide\"".to_string())],
        ),
    ];
    let merged = merge_toml(
        base,
        "[deletion]\nmode = \"expunge\"\n# c\n[imap]\nca_file = \"/x\"\n[pop3]\nmark_seen = false",
    );
    let text = render_config(&merged);
    assert_eq!(
        text,
        "[pop3]\nlisten = \"127.0.0.1:1\"\nmark_seen = false\n\n[deletion]\nmode = \"expunge\"\n\n[imap]\nca_file = \"/x\"\n\n"
    );
}
