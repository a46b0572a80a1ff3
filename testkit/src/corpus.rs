//! Test mailboxes: the edge cases (dots, 8-bit, long lines, no final newline, MIME) and a
//! 21 MB message, generated deterministically.

use std::sync::OnceLock;

/// One deterministic pseudo-random stream (xorshift), so generated messages never change.
fn prng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, wrapped at 76 columns with CRLF (MIME body style).
pub fn base64_wrapped(data: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let flat = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = Vec::with_capacity(flat.len() + flat.len() / 38 + 2);
    for line in flat.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn headers(from: &str, subject: &str, n: u32, extra: &str) -> String {
    format!(
        "Return-Path: <{from}>\r\nFrom: {from}\r\nTo: alice@example.test\r\n\
         Subject: {subject}\r\nDate: Tue, 1 Jul 2025 10:{:02}:00 +0000\r\n\
         Message-ID: <edge-{n}@example.test>\r\nMIME-Version: 1.0\r\n{extra}",
        n % 60
    )
}

/// The big message: about 21 MB of base64 text in 76-column CRLF lines (built once per process).
pub fn big_message() -> &'static [u8] {
    static BIG: OnceLock<Vec<u8>> = OnceLock::new();
    BIG.get_or_init(|| {
        let mut m = headers(
            "archive@example.test",
            "Big attachment (21 MB)",
            99,
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment; filename=\"big.bin\"\r\n\r\n",
        )
        .into_bytes();
        let mut next = prng(0x5eedb16);
        let line_count = 21 * 1024 * 1024 / 78 + 1;
        m.reserve(line_count * 78);
        for _ in 0..line_count {
            let mut r = next();
            for i in 0..76 {
                if i % 10 == 0 {
                    r = next();
                }
                m.push(B64[(r & 63) as usize]);
                r >>= 6;
            }
            m.extend_from_slice(b"\r\n");
        }
        m
    })
}

/// The edge-case mailbox without the 21 MB message, with a name for each message.
pub fn edge_case_named_small() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut n = 0u32;
    let mut h = |from: &str, subject: &str, extra: &str| {
        n += 1;
        headers(from, subject, n, extra)
    };
    let text = "Content-Type: text/plain; charset=us-ascii\r\n\r\n";

    v.push((
        "welcome",
        format!(
            "{}Welcome to your mailbox.\r\n\r\nThis is an ordinary message with CRLF line ends.\r\n\
             -- \r\nThe postmaster\r\n",
            h("postmaster@example.test", "Welcome!", text)
        )
        .into_bytes(),
    ));
    v.push((
        "dot-lines-crlf",
        format!(
            "{}.leading dot\r\n..two leading dots\r\n.\r\nthe line above is only a dot\r\n\
             . space after dot\r\n...\r\nend\r\n",
            h("dots@example.test", "Lines starting with dots", text)
        )
        .into_bytes(),
    ));
    v.push((
        "dot-lines-lf",
        format!(
            "{}.leading dot\n..two leading dots\n.\nonly-dot line above (LF only)\nend\n",
            h("dots@example.test", "Dots, LF line ends", "").replace("\r\n", "\n")
                + "Content-Type: text/plain\n\n"
        )
        .into_bytes(),
    ));
    v.push((
        "no-final-newline",
        format!(
            "{}first line\r\nlast line without newline",
            h("sloppy@example.test", "No final newline", text)
        )
        .into_bytes(),
    ));
    v.push((
        "dot-no-final-newline",
        format!(
            "{}a body whose last line is a lone dot without newline\r\n.",
            h("sloppy@example.test", "Lone dot at the end", text)
        )
        .into_bytes(),
    ));
    let mut eight = h(
        "J\u{f6}rg M\u{fc}ller <joerg@example.test>",
        "Gr\u{fc}\u{df}e aus K\u{f6}ln \u{2013} 8-bit header",
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    )
    .into_bytes();
    eight.extend_from_slice(
        "Umlaute: \u{e4}\u{f6}\u{fc} \u{c4}\u{d6}\u{dc} \u{df}, Euro \u{20ac}, emoji \u{1f600}\r\n"
            .as_bytes(),
    );
    eight.extend_from_slice(
        b"Latin-1 bytes: \xe9\xe8\xff\x80\x81\r\nNUL-free but every high byte: ",
    );
    eight.extend((0x80u8..=0xff).filter(|b| *b != b'\r' && *b != b'\n'));
    eight.extend_from_slice(b"\r\n");
    v.push(("8bit-headers-and-body", eight));
    let mut long = h("long@example.test", "A 12,345-character line", text).into_bytes();
    long.extend_from_slice(b"short line\r\n");
    let mut next = prng(42);
    long.extend((0..12_345).map(|_| b'a' + (next() % 26) as u8));
    long.extend_from_slice(b"\r\nafter the long line\r\n");
    v.push(("long-line", long));
    v.push((
        "headers-only",
        "From: nobody@example.test\r\nTo: alice@example.test\r\nSubject: Headers only, no blank line, no body\r\n"
            .as_bytes()
            .to_vec(),
    ));
    v.push((
        "empty-body",
        h("empty@example.test", "Empty body", "\r\n").into_bytes(),
    ));
    let mut att = Vec::new();
    let mut next = prng(7);
    att.extend((0..3000).map(|_| (next() >> 24) as u8));
    let mut mp = h(
        "reports@example.test",
        "Monthly report (with attachment)",
        "Content-Type: multipart/mixed; boundary=\"=_b0undary_42\"\r\n\r\n",
    )
    .into_bytes();
    mp.extend_from_slice(
        b"This is a multi-part message in MIME format.\r\n\r\n--=_b0undary_42\r\n\
          Content-Type: text/plain; charset=us-ascii\r\n\r\nPlease find the report attached.\r\n\
          .\r\n.. stuffed-looking line inside a part\r\n\r\n--=_b0undary_42\r\n\
          Content-Type: application/pdf; name=\"report.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\
          Content-Disposition: attachment; filename=\"report.pdf\"\r\n\r\n",
    );
    mp.extend_from_slice(&base64_wrapped(&att));
    mp.extend_from_slice(b"\r\n--=_b0undary_42--\r\n");
    v.push(("multipart-attachment", mp.clone()));
    let lf: Vec<u8> = String::from_utf8(mp)
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes();
    v.push(("multipart-attachment-lf", lf));
    v
}

/// Every edge case, in seeding order: [`edge_case_named_small`] then the 21 MB message last.
pub fn edge_case_named() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = edge_case_named_small();
    v.push(("big-21mb", big_message().to_vec()));
    v
}

/// The edge-case mailbox (see [`edge_case_named`] for what each message is).
pub fn edge_case_messages() -> Vec<Vec<u8>> {
    edge_case_named().into_iter().map(|(_, m)| m).collect()
}
