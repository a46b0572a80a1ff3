//! `DotStuffer` (RETR and TOP n) fed a message split at arbitrary points.
//!
//! Input layout: byte 0 = mode (even: RETR, odd: TOP), bytes 1..5 = n for TOP (small unless
//! byte 0 bit 1 is set: then the full u32), bytes 5..12 = chunk sizes (cycled, 0 allowed), the
//! rest = the message.
//!
//! Checks (mirroring the unit tests in src/pop3/response.rs):
//! - chunked output == one-shot output;
//! - both == an independent reference (split into lines, TOP selection, stuff, join);
//! - RETR: un-stuffing the output (what a client does) gives the message with CRLF-normalised
//!   line ends (and a CRLF added to an unterminated last line);
//! - the output ends in `.\r\n`, contains no bare LF, and no `\r\n.\r\n` before its end;
//! - once TOP reports `is_done`, further input changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popbridge::pop3::response::DotStuffer;

const HEADER: usize = 12;

fn new(top: Option<u32>) -> DotStuffer {
    top.map_or_else(DotStuffer::new, DotStuffer::top)
}

fn one_shot(msg: &[u8], top: Option<u32>) -> Vec<u8> {
    let mut s = new(top);
    let mut out = Vec::new();
    s.feed(msg, &mut out);
    s.finish(&mut out);
    out
}

/// Same as the unit tests' `reference`.
fn reference(msg: &[u8], top: Option<u32>) -> Vec<u8> {
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' {
            let end = if i > start && msg[i - 1] == b'\r' {
                i - 1
            } else {
                i
            };
            lines.push(&msg[start..end]);
            start = i + 1;
        }
    }
    if start < msg.len() {
        lines.push(&msg[start..]);
    }
    if let Some(n) = top {
        if let Some(h) = lines.iter().position(|l| l.is_empty()) {
            lines.truncate((h + 1).saturating_add(n as usize).min(lines.len()));
        }
    }
    let mut out = Vec::new();
    for l in lines {
        if l.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(l);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Same as the unit tests' `unstuff`: lines up to ".", leading dot removed.
fn unstuff(wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = wire;
    loop {
        let i = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("terminated");
        let line = &rest[..i];
        rest = &rest[i + 2..];
        if line == b"." {
            assert!(rest.is_empty(), "data after terminator");
            return out;
        }
        let line = line.strip_prefix(b".").unwrap_or(line);
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
}

/// Same as the unit tests' `normalise`.
fn normalise(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' && (i == 0 || msg[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    if !out.ends_with(b"\r\n") && !out.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let (header, msg) = data.split_at(HEADER);
    let n_raw = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let top = if header[0] & 1 == 1 {
        Some(if header[0] & 2 == 2 { n_raw } else { n_raw % 8 })
    } else {
        None
    };
    let sizes = &header[5..];

    let whole = one_shot(msg, top);

    // Chunked, with zero-length feeds allowed.
    let mut s = new(top);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut k = 0;
    let mut done_at: Option<usize> = None;
    while pos < msg.len() {
        let b = sizes[k % sizes.len()];
        k += 1;
        let n = match b {
            0..=15 => b as usize,
            _ => (b as usize - 15) * 7,
        }
        .min(msg.len() - pos);
        let before = out.len();
        s.feed(&msg[pos..pos + n], &mut out);
        if done_at.is_some() {
            assert_eq!(out.len(), before, "output after TOP was done");
        }
        if s.is_done() && done_at.is_none() {
            assert!(top.is_some(), "RETR stuffer reported done");
            done_at = Some(out.len());
        }
        pos += n;
        if k > 1_000 {
            // All-zero sizes: feed the rest in one go.
            s.feed(&msg[pos..], &mut out);
            pos = msg.len();
        }
    }
    s.finish(&mut out);
    assert!(s.is_done());
    assert_eq!(out, whole, "chunked output differs from one-shot");

    assert_eq!(
        whole,
        reference(msg, top),
        "output differs from the reference"
    );

    assert!(whole.ends_with(b".\r\n"));
    let body = &whole[..whole.len() - 3];
    assert!(body.is_empty() || body.ends_with(b"\r\n"));
    for (i, &b) in whole.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && whole[i - 1] == b'\r', "bare LF in output at {i}");
        }
    }
    assert!(
        !body.windows(5).any(|w| w == b"\r\n.\r\n") && !body.starts_with(b".\r\n"),
        "early terminator"
    );

    if top.is_none() {
        assert_eq!(
            unstuff(&whole),
            normalise(msg),
            "un-stuffed RETR output differs"
        );
    } else {
        // TOP output is a prefix (in lines) of the RETR output.
        let retr = one_shot(msg, None);
        assert!(
            retr.starts_with(body),
            "TOP output is not a prefix of RETR output"
        );
    }
});
