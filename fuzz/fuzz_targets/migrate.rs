//! The sans-I/O pieces of `popbridge migrate` and of serving migrated UIDLs: the UIDL map
//! codecs (what comes back from sled or a METADATA server is untrusted), the header hash, the
//! POP3 response parsers. None may panic; what decodes must re-encode to the same map, and
//! every UIDL served must be legal.
//!
//! Input: the first line is offered to `MapHead::parse` (a head line as stored in sled or
//! METADATA); the rest is entry text. The rest is decoded twice: against the parsed head (a
//! seed with a correct SHA-256 gets past the checksum) and against a head computed here from
//! the text itself (length, SHA-256, token count), so the entry decoder is reached whatever
//! the fuzzer writes. The rest split at LF and joined by single spaces is also tried, the way
//! METADATA chunks are joined. The whole input also goes through the header hash and the POP3
//! parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popbridge::migrate::matcher::{header_hash, without_skipped_headers};
use popbridge::uidl::map::{is_legal_uidl, MapHead, UidlMap, MAX_CHUNK_BYTES};
use popbridge::uidl::UidlFormat;
use popbridge::upstream::imap::metadata::MIN_CHUNK_BYTES;
use popbridge::upstream::pop3::response::{parse_listing, parse_status, Response};

fn sha256(text: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, text);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A head describing `text` as popbridge would write it (one chunk).
fn head_for(uid_validity: u32, text: &str) -> MapHead {
    let count = text.split(' ').filter(|t| !t.is_empty()).count();
    MapHead {
        uid_validity,
        count,
        gen: "local".into(),
        chunks: usize::from(!text.is_empty()),
        chunk: text.len(),
        bytes: text.len(),
        sha256: sha256(text.as_bytes()),
    }
}

/// Whatever decodes must round-trip through both encodings and serve legal UIDLs only.
fn check_map(map: &UidlMap, head: &MapHead) {
    assert_eq!(map.uid_validity(), head.uid_validity);
    assert_eq!(map.len(), head.count);
    let (local_head, text) = map.to_local().expect("a decoded map re-encodes");
    assert_eq!(text, map.entries_text());
    let reparsed = MapHead::parse(&local_head.to_string()).expect("own head parses");
    assert_eq!(reparsed, local_head);
    assert_eq!(UidlMap::from_text(&reparsed, &text).as_ref(), Ok(map));
    // The smallest chunk popbridge writes (write_map clamps to it; a head announcing more,
    // smaller chunks is refused by MapHead::parse), and a larger one.
    for chunk_bytes in [MIN_CHUNK_BYTES, 4096] {
        let (mhead, chunks) = map
            .to_metadata(chunk_bytes, "g1")
            .expect("a decoded map chunks");
        assert_eq!(mhead.chunks, chunks.len());
        assert!(chunks
            .iter()
            .all(|c| !c.is_empty() && c.len() <= MAX_CHUNK_BYTES));
        // A chunk is over the size only when it is a single entry.
        assert!(chunks
            .iter()
            .all(|c| c.len() <= chunk_bytes || !c.contains(' ')));
        let joined = chunks.join(" ");
        let mhead = MapHead::parse(&mhead.to_string()).expect("own METADATA head parses");
        assert_eq!(UidlMap::from_text(&mhead, &joined).as_ref(), Ok(map));
    }
    let format = UidlFormat::default();
    for uid in map
        .iter()
        .map(|(u, _)| u)
        .take(64)
        .chain([1, 2, 3, u32::MAX])
    {
        for uv in [map.uid_validity(), map.uid_validity().wrapping_add(1)] {
            let served = map.serve(uid, uv, &format);
            assert!(is_legal_uidl(served.as_str()), "{served:?}");
        }
    }
}

fn try_text(head: &MapHead, text: &str) {
    if let Ok(map) = UidlMap::from_text(head, text) {
        check_map(&map, head);
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let parsed = MapHead::parse(first);
    if let Ok(head) = &parsed {
        // Display and parse agree.
        assert_eq!(MapHead::parse(&head.to_string()).as_ref(), Ok(head));
        try_text(head, rest);
        let joined = rest.split('\n').collect::<Vec<_>>().join(" ");
        try_text(head, &joined);
        let _ = head.check_uid_next(Some(head.count as u32));
    }
    let uid_validity = parsed.as_ref().map_or(1, |h| h.uid_validity);
    try_text(&head_for(uid_validity, rest), rest);

    let _ = header_hash(data);
    let stripped = without_skipped_headers(data);
    assert!(stripped.len() <= data.len());
    let _ = parse_listing(data);
    let _ = parse_status(data);
    let mut r = Response::new(4096);
    for line in data.split(|&b| b == b'\n') {
        match r.line(line) {
            Ok(true) | Err(_) => break,
            Ok(false) => {}
        }
    }
});
