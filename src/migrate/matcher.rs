//! Which legacy POP3 message is which IMAP message, decided the way Dovecot's pop3-migration
//! plugin does it (the idea, not its code). Sans-I/O.
//!
//! 1. **Sizes, in order.** Walk both lists from the start (POP3 order, UID order) while the
//!    POP3 size (LIST) equals the IMAP RFC822.SIZE and the POP3 size differs from the next
//!    POP3 message's (two equal sizes in a row are not trusted). Matched pairs need no more
//!    work; when everything matched, the header pass is skipped.
//! 2. **Header hashes.** For the rest, a hash of the header (POP3 `TOP n 0`, IMAP
//!    `BODY.PEEK[HEADER]`) that ignores what servers add or rewrite: both lists sorted by hash
//!    (stably, so messages with identical headers pair in their original order) and merged.
//!
//! The header hash ([`header_hash`]) skips the headers in [`SKIPPED_HEADERS`] (with their
//! continuation lines) and headers whose names contain a control character, space or 8-bit
//! byte (some IMAP servers drop those); it drops CRs, spaces and tabs (some servers strip
//! trailing whitespace or turn tabs into spaces); it turns any other control or 8-bit byte
//! and `?` into one `?` per run (some servers replace a multi-byte character with a single
//! `?`); and it stops at a line of two or more CRs before the LF, where some servers end
//! the header and others do not.

use ring::digest;

/// Headers that POP3 and IMAP views of one message may disagree on (added by a delivery agent
/// or a mailbox format, rewritten by a server), compared case-insensitively.
pub const SKIPPED_HEADERS: &[&str] = &[
    "Content-Length",
    "Return-Path",
    "Status",
    "X-IMAP",
    "X-IMAPbase",
    "X-Keywords",
    "X-Message-Flag",
    "X-Status",
    "X-UID",
    "X-UIDL",
    "X-Yahoo-Newman-Property",
];

/// A header hash, and whether the header's end (the blank line) was seen: without it the
/// text was probably cut short (a server's TOP or header fetch quirk), and the caller should
/// hash the whole message instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeaderHash {
    pub digest: [u8; 32],
    pub complete: bool,
}

/// Hashes the header of `message` (a whole message, or its header only).
pub fn header_hash(message: &[u8]) -> HeaderHash {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut norm = Normalizer::default();
    let mut complete = false;
    let mut include_current = false;
    let mut out = Vec::with_capacity(256);
    for raw in message.split_inclusive(|&b| b == b'\n') {
        let had_lf = raw.ends_with(b"\n");
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let crs = line.iter().rev().take_while(|&&b| b == b'\r').count();
        let content = &line[..line.len() - crs];
        if content.is_empty() && (had_lf || crs > 0) {
            // The blank line ends the header; a line of CRs only ends it for some servers,
            // so hashing stops there for everyone.
            complete = true;
            break;
        }
        if content.is_empty() {
            break;
        }
        if content[0] == b' ' || content[0] == b'\t' {
            if include_current {
                out.clear();
                norm.feed(content, &mut out);
                norm.feed(b"\n", &mut out);
                ctx.update(&out);
            }
            continue;
        }
        include_current = match content.iter().position(|&b| b == b':') {
            None => false,
            Some(colon) => {
                let name = trim_end(&content[..colon]);
                !name.is_empty()
                    && name.iter().all(|&b| b > 0x20 && b < 0x7f)
                    && !SKIPPED_HEADERS
                        .iter()
                        .any(|s| s.as_bytes().eq_ignore_ascii_case(name))
            }
        };
        if include_current {
            out.clear();
            norm.feed(content, &mut out);
            norm.feed(b"\n", &mut out);
            ctx.update(&out);
        }
    }
    let mut d = [0u8; 32];
    d.copy_from_slice(ctx.finish().as_ref());
    HeaderHash {
        digest: d,
        complete,
    }
}

/// `message` without the header fields in [`SKIPPED_HEADERS`] (and their continuation lines);
/// the body and every other byte unchanged. Two copies of one message that differ only in what
/// servers add or rewrite come out equal.
pub fn without_skipped_headers(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    let mut skipping = false;
    let mut in_header = true;
    for line in message.split_inclusive(|&b| b == b'\n') {
        if in_header {
            let content = line
                .strip_suffix(b"\n")
                .unwrap_or(line)
                .strip_suffix(b"\r")
                .unwrap_or(line.strip_suffix(b"\n").unwrap_or(line));
            if content.is_empty() {
                in_header = false;
            } else if content[0] == b' ' || content[0] == b'\t' {
                if skipping {
                    continue;
                }
            } else {
                skipping = content.iter().position(|&b| b == b':').is_some_and(|c| {
                    let name = trim_end(&content[..c]);
                    SKIPPED_HEADERS
                        .iter()
                        .any(|s| s.as_bytes().eq_ignore_ascii_case(name))
                });
                if skipping {
                    continue;
                }
            }
        }
        out.extend_from_slice(line);
    }
    out
}

fn trim_end(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &s[..s.len() - n]
}

#[derive(Default)]
struct Normalizer {
    prev_question: bool,
}

impl Normalizer {
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        for &b in data {
            match b {
                b'\r' | b' ' | b'\t' => {}
                b'\n' => {
                    out.push(b'\n');
                    self.prev_question = false;
                }
                b if !(0x20..0x7f).contains(&b) || b == b'?' => {
                    if !self.prev_question {
                        out.push(b'?');
                    }
                    self.prev_question = true;
                }
                b => {
                    out.push(b);
                    self.prev_question = false;
                }
            }
        }
    }
}

/// A message on the legacy POP3 server: its UIDL and LIST size, in POP3 order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyMessage {
    pub uidl: String,
    pub size: u64,
}

/// A message in the new IMAP folder: UID and RFC822.SIZE, in UID order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewMessage {
    pub uid: u32,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy {
    Size,
    Header,
    /// The new store's copy carries an `X-UIDL:` header naming the legacy UIDL.
    XUidl,
}

/// The value of the first `X-UIDL:` header field of `header` (mbox-era servers wrote the POP3
/// UIDL into the message), if it is a legal UIDL (1-70 characters of 0x21-0x7E).
pub fn x_uidl(header: &[u8]) -> Option<String> {
    for line in header.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if trim_end(&line[..colon]).eq_ignore_ascii_case(b"X-UIDL") {
            let value = std::str::from_utf8(&line[colon + 1..]).ok()?.trim();
            let legal = !value.is_empty()
                && value.len() <= 70
                && value.bytes().all(|b| (0x21..=0x7e).contains(&b));
            return legal.then(|| value.to_owned());
        }
    }
    None
}

/// Pairs by `X-UIDL:` first: `new_x_uidls` (index-aligned with `new`) holds each new-store
/// message's X-UIDL value; a legacy message whose UIDL equals one is paired with it. The
/// pairs (legacy index, new index), each message at most once.
pub fn match_by_x_uidl(
    legacy: &[LegacyMessage],
    new_x_uidls: &[Option<String>],
) -> Vec<(usize, usize)> {
    let mut by_uidl: std::collections::HashMap<&str, usize> = Default::default();
    for (i, l) in legacy.iter().enumerate() {
        by_uidl.entry(l.uidl.as_str()).or_insert(i);
    }
    let mut out = Vec::new();
    for (j, x) in new_x_uidls.iter().enumerate() {
        if let Some(i) = x.as_deref().and_then(|x| by_uidl.remove(x)) {
            out.push((i, j));
        }
    }
    out
}

/// The number of leading pairs the size pass matches.
pub fn match_by_size(legacy: &[LegacyMessage], new: &[NewMessage]) -> usize {
    let count = legacy.len().min(new.len());
    let mut i = 0;
    while i < count {
        if legacy[i].size != new[i].size {
            break;
        }
        if i + 1 < count && legacy[i].size == legacy[i + 1].size {
            break;
        }
        i += 1;
    }
    i
}

/// Everything the matcher decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matching {
    /// (index into the legacy list, IMAP UID, how).
    pub matched: Vec<(usize, u32, MatchedBy)>,
    /// Legacy messages with no IMAP message: their UIDLs would be lost.
    pub unmatched_legacy: Vec<usize>,
    /// IMAP messages with no legacy message (new mail, or mail the legacy server lacks).
    pub unmatched_new: Vec<u32>,
    /// Legacy messages that share their header hash with another legacy message (matched in
    /// order, so two identical copies may have swapped UIDLs, which no client can notice).
    pub duplicate_legacy: usize,
    /// The same among the IMAP messages.
    pub duplicate_new: usize,
}

/// Completes a match: `sized` leading pairs came from [`match_by_size`]; `legacy_hashes` and
/// `new_hashes` hold the header hashes of the messages after those (`None` when a header
/// could not be read: that message stays unmatched), index-aligned with
/// `legacy[sized..]` and `new[sized..]`.
pub fn match_rest(
    legacy: &[LegacyMessage],
    new: &[NewMessage],
    sized: usize,
    legacy_hashes: &[Option<HeaderHash>],
    new_hashes: &[Option<HeaderHash>],
) -> Matching {
    let mut m = Matching::default();
    for (i, n) in new.iter().enumerate().take(sized) {
        m.matched.push((i, n.uid, MatchedBy::Size));
    }
    let key = |h: &HeaderHash| h.digest;
    let mut l: Vec<(usize, [u8; 32])> = legacy_hashes
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_ref().map(|h| (sized + i, key(h))))
        .collect();
    let mut r: Vec<(usize, [u8; 32])> = new_hashes
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_ref().map(|h| (sized + i, key(h))))
        .collect();
    l.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    r.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    m.duplicate_legacy = duplicates(&l);
    m.duplicate_new = duplicates(&r);
    let mut legacy_done = vec![false; legacy.len()];
    let mut new_done = vec![false; new.len()];
    legacy_done[..sized].iter_mut().for_each(|d| *d = true);
    new_done[..sized].iter_mut().for_each(|d| *d = true);
    let (mut i, mut j) = (0, 0);
    while i < l.len() && j < r.len() {
        match l[i].1.cmp(&r[j].1) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                let (li, ri) = (l[i].0, r[j].0);
                m.matched.push((li, new[ri].uid, MatchedBy::Header));
                legacy_done[li] = true;
                new_done[ri] = true;
                i += 1;
                j += 1;
            }
        }
    }
    m.matched.sort_by_key(|x| x.0);
    m.unmatched_legacy = (0..legacy.len()).filter(|&i| !legacy_done[i]).collect();
    m.unmatched_new = (0..new.len())
        .filter(|&i| !new_done[i])
        .map(|i| new[i].uid)
        .collect();
    m
}

/// How many entries of a hash-sorted list share their hash with a neighbour.
fn duplicates(sorted: &[(usize, [u8; 32])]) -> usize {
    (0..sorted.len())
        .filter(|&i| {
            (i > 0 && sorted[i - 1].1 == sorted[i].1)
                || (i + 1 < sorted.len() && sorted[i + 1].1 == sorted[i].1)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[u8] = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hello\r\n\tworld\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n";

    fn h(m: &[u8]) -> [u8; 32] {
        header_hash(m).digest
    }

    #[test]
    fn x_uidl_headers_name_the_legacy_uidl() {
        let h = b"From: a\r\nX-Uidl:  1500.7 \r\nSubject: x\r\n\r\nX-UIDL: body\r\n";
        assert_eq!(x_uidl(h).as_deref(), Some("1500.7"));
        assert_eq!(x_uidl(b"From: a\r\n\r\nX-UIDL: in-body\r\n"), None);
        assert_eq!(x_uidl(b"X-UIDL: two words\r\n\r\n"), None);
        let legacy: Vec<LegacyMessage> = ["a", "b", "c"]
            .iter()
            .map(|u| LegacyMessage {
                uidl: u.to_string(),
                size: 1,
            })
            .collect();
        let x = vec![
            Some("c".to_string()),
            None,
            Some("zz".into()),
            Some("c".into()),
        ];
        assert_eq!(match_by_x_uidl(&legacy, &x), vec![(2, 0)]);
    }

    #[test]
    fn hash_covers_the_header_only() {
        let other_body = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hello\r\n\tworld\r\nMessage-ID: <1@x>\r\n\r\nanother body\r\n";
        assert_eq!(h(BASE), h(other_body));
        assert!(header_hash(BASE).complete);
        // TOP n 0 output and BODY[HEADER] are the same header.
        let header_only = &BASE[..BASE.len() - 6];
        assert_eq!(h(BASE), h(header_only));
        // Any real header change matters.
        assert_ne!(h(BASE), h(&BASE.to_vec().replace_all(b"hello", b"hellO")));
        assert_ne!(h(BASE), h(&BASE.to_vec().replace_all(b"<1@x>", b"<2@x>")));
    }

    trait ReplaceAll {
        fn replace_all(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
    }
    impl ReplaceAll for Vec<u8> {
        fn replace_all(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < self.len() {
                if self[i..].starts_with(from) {
                    out.extend_from_slice(to);
                    i += from.len();
                } else {
                    out.push(self[i]);
                    i += 1;
                }
            }
            out
        }
    }

    #[test]
    fn headers_servers_add_or_rewrite_are_ignored() {
        let mut added = b"Return-Path: <bounce@example.org>\r\nStatus: RO\r\nX-UID: 17\r\nX-Keywords: $Junk\r\n  $Label1\r\nX-IMAPbase: 1 2\r\ncontent-length: 99\r\nX-UIDL: abc\r\n".to_vec();
        added.extend_from_slice(BASE);
        assert_eq!(h(BASE), h(&added));
        // In the middle too, and in any case.
        let mid = BASE
            .to_vec()
            .replace_all(b"Subject", b"STATUS: O\r\nSubject");
        assert_eq!(h(BASE), h(&mid));
    }

    #[test]
    fn whitespace_line_ends_and_8bit_quirks_are_tolerated() {
        // LF-only line ends, trailing spaces stripped, tabs turned into spaces.
        let lf = BASE.to_vec().replace_all(b"\r\n", b"\n");
        assert_eq!(h(BASE), h(&lf));
        let trailing = BASE.to_vec().replace_all(b"hello\r\n", b"hello   \r\n");
        assert_eq!(h(BASE), h(&trailing));
        let tab = BASE.to_vec().replace_all(b"\tworld", b"    world");
        assert_eq!(h(BASE), h(&tab));
        // A multi-byte character replaced by one '?' on the other server.
        let utf8 = BASE.to_vec().replace_all(b"hello", "h\u{e9}llo".as_bytes());
        let q = BASE.to_vec().replace_all(b"hello", b"h?llo");
        assert_eq!(h(&utf8), h(&q));
        // Headers with invalid names are dropped (some IMAP servers drop them).
        let bad_name = BASE
            .to_vec()
            .replace_all(b"Subject", b"Bad Name: x\r\nSubject");
        assert_eq!(h(BASE), h(&bad_name));
        // A line of CRs ends the header for some servers: hashing stops there.
        let crcr = BASE
            .to_vec()
            .replace_all(b"Message-ID: <1@x>\r\n", b"\r\r\nMessage-ID: <1@x>\r\n");
        let cut = BASE.to_vec().replace_all(b"Message-ID: <1@x>\r\n", b"");
        assert_eq!(h(&crcr), h(&cut));
        assert!(header_hash(&crcr).complete);
        // A header without its blank line is hashed but marked incomplete.
        let truncated = b"From: a@example.org\r\nSubject: x\r\n";
        assert!(!header_hash(truncated).complete);
    }

    #[test]
    fn skipped_headers_are_removed_from_the_header_only() {
        let with =
            b"Return-Path: <x@y>\r\nX-Keywords: a\r\n b\r\nFrom: a\r\n\r\nStatus: body line\r\n";
        assert_eq!(
            without_skipped_headers(with),
            b"From: a\r\n\r\nStatus: body line\r\n".to_vec()
        );
        assert_eq!(without_skipped_headers(BASE), BASE.to_vec());
    }

    fn legacy(sizes: &[u64]) -> Vec<LegacyMessage> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| LegacyMessage {
                uidl: format!("L{i}"),
                size,
            })
            .collect()
    }
    fn new(sizes: &[u64]) -> Vec<NewMessage> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| NewMessage {
                uid: 100 + i as u32,
                size,
            })
            .collect()
    }
    fn hh(n: u8) -> Option<HeaderHash> {
        Some(HeaderHash {
            digest: [n; 32],
            complete: true,
        })
    }

    #[test]
    fn size_pass_stops_at_a_difference_or_a_repeated_size() {
        assert_eq!(match_by_size(&legacy(&[1, 2, 3]), &new(&[1, 2, 3])), 3);
        assert_eq!(match_by_size(&legacy(&[1, 2, 3]), &new(&[1, 5, 3])), 1);
        assert_eq!(
            match_by_size(&legacy(&[1, 2, 2, 3]), &new(&[1, 2, 2, 3])),
            1
        );
        assert_eq!(match_by_size(&legacy(&[1, 2]), &new(&[1, 2, 9])), 2);
        assert_eq!(match_by_size(&[], &new(&[1])), 0);
    }

    #[test]
    fn header_pass_matches_out_of_order_and_reports_the_rest() {
        // Legacy order: A B C D; IMAP has C A B, and E which the legacy server lacks.
        let l = legacy(&[10, 20, 30, 40]);
        let n = new(&[30, 10, 20, 50]);
        let sized = match_by_size(&l, &n);
        assert_eq!(sized, 0);
        let m = match_rest(
            &l,
            &n,
            sized,
            &[hh(1), hh(2), hh(3), hh(4)],
            &[hh(3), hh(1), hh(2), hh(5)],
        );
        assert_eq!(
            m.matched,
            vec![
                (0, 101, MatchedBy::Header),
                (1, 102, MatchedBy::Header),
                (2, 100, MatchedBy::Header)
            ]
        );
        assert_eq!(m.unmatched_legacy, vec![3]);
        assert_eq!(m.unmatched_new, vec![103]);
        assert_eq!((m.duplicate_legacy, m.duplicate_new), (0, 0));
    }

    #[test]
    fn duplicates_pair_in_order_and_are_counted() {
        let l = legacy(&[10, 10, 10]);
        let n = new(&[10, 10, 11]);
        let sized = match_by_size(&l, &n);
        assert_eq!(sized, 0, "equal sizes in a row are not trusted");
        let m = match_rest(
            &l,
            &n,
            sized,
            &[hh(7), hh(7), hh(8)],
            &[hh(7), hh(7), hh(9)],
        );
        assert_eq!(
            m.matched,
            vec![(0, 100, MatchedBy::Header), (1, 101, MatchedBy::Header)]
        );
        assert_eq!(m.unmatched_legacy, vec![2]);
        assert_eq!(m.unmatched_new, vec![102]);
        assert_eq!((m.duplicate_legacy, m.duplicate_new), (2, 2));
    }

    #[test]
    fn size_matches_are_kept_and_unreadable_headers_stay_unmatched() {
        let l = legacy(&[1, 2, 3]);
        let n = new(&[1, 5, 3]);
        let sized = match_by_size(&l, &n);
        let m = match_rest(&l, &n, sized, &[None, hh(3)], &[hh(2), hh(3)]);
        assert_eq!(
            m.matched,
            vec![(0, 100, MatchedBy::Size), (2, 102, MatchedBy::Header)]
        );
        assert_eq!(m.unmatched_legacy, vec![1]);
        assert_eq!(m.unmatched_new, vec![101]);
    }
}
