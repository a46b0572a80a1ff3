//! The sans-I/O pieces of `popbridge migrate` and of serving migrated UIDLs: the UIDL map
//! codecs (what comes back from sled or a METADATA server is untrusted), the header hash, the
//! POP3 response parsers. None may panic; what decodes must re-encode to the same map, and
//! every UIDL served must be legal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popbridge::uidl::map::{is_legal_uidl, UidlMap};
use popbridge::migrate::matcher::{header_hash, without_skipped_headers};
use popbridge::migrate::pop3::{parse_listing, parse_status, Response};
use popbridge::uidl::UidlFormat;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(map) = UidlMap::decode(&text) {
        assert_eq!(UidlMap::decode(&map.encode()).as_ref(), Ok(&map));
        let format = UidlFormat::default();
        for uid in map.iter().map(|(u, _)| u).take(64).chain([1, 2, 3, u32::MAX]) {
            let served = map.serve(uid, map.uid_validity(), &format);
            assert!(is_legal_uidl(served.as_str()));
        }
        let (head, chunks) = map.to_metadata(1024);
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        assert_eq!(UidlMap::from_metadata(&head, &refs).as_ref(), Ok(&map));
    }
    let mut parts = text.splitn(2, '\n');
    if let (Some(head), Some(rest)) = (parts.next(), parts.next()) {
        let chunks: Vec<&str> = rest.split('\n').collect();
        let _ = UidlMap::from_metadata(head, &chunks);
    }
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
