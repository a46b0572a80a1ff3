//! The legacy UIDL map of one maildrop: IMAP UID → the UIDL the old POP3 server showed for that
//! message, valid for one UIDVALIDITY. Sans-I/O: validation, the head that names and checks
//! a stored map, the entry text shared by the sled cache and the IMAP METADATA copy, METADATA
//! chunking, and the rule that decides which UIDL a message is served with.
//!
//! Entry text: ` `-separated `<uid>:<uidl>` entries in UID order. A UIDL is 1..=70 octets of
//! 0x21..0x7E (RFC 1939), so it never contains the space that separates entries; the UID is
//! split off at the first `:`.
//!
//! Head (one line): `popbridge-uidl-map/2 <uidvalidity> <count> gen=<gen> chunks=<k>
//! chunk=<largest chunk> bytes=<entry text length> sha256=<hex of the entry text>`. In
//! METADATA the head is [`METADATA_ENTRY`] and chunk `i` of generation `gen` is
//! `<ENTRY>/<gen>/<i>`; the entry text is the chunks joined by single spaces. A map is never
//! trusted beyond [`MAX_MAP_BYTES`] of entry text, whatever its head says.

use std::collections::{BTreeMap, HashSet};

use crate::uidl::{UidlFormat, MAX_UIDL_LEN};

const MAGIC: &str = "popbridge-uidl-map/2";

/// The METADATA entry (RFC 5464, private to the user) that holds the map's head line; the
/// chunks of generation `gen` live at `<ENTRY>/<gen>/0`, `<ENTRY>/<gen>/1`, ...
pub const METADATA_ENTRY: &str = "/private/vendor/popbridge/uidl-map";

/// Most entries a map may hold (bounds memory when decoding what a server returns).
pub const MAX_ENTRIES: usize = 5_000_000;

/// Largest entry text popbridge reads, writes or caches (32 MiB: about 1.5 million entries of
/// Cyrus-style UIDLs, far more than any real maildrop; a decoded map costs a few times this).
/// /private METADATA is writable by the user, so a head is never trusted for more.
pub const MAX_MAP_BYTES: usize = 32 << 20;
/// Largest METADATA chunk popbridge writes or reads (a GETMETADATA answer must fit the IMAP
/// connection's response limit, 16 MiB for `serve`).
pub const MAX_CHUNK_BYTES: usize = 8 << 20;
/// Most chunks a head may announce (every chunk but the last is at least half full).
pub const MAX_CHUNKS: usize = 1 << 16;
/// Longest head line.
pub const MAX_HEAD_BYTES: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("UID 0 is not a message")]
    ZeroUid,
    #[error("UIDL {0:?} is not 1-70 characters of 0x21-0x7E (RFC 1939)")]
    BadUidl(String),
    #[error("UID {uid} already maps to {existing:?}, not {new:?}")]
    Conflict {
        uid: u32,
        existing: String,
        new: String,
    },
    #[error("UIDL {uidl:?} is already used by UID {other}")]
    DuplicateUidl { uidl: String, other: u32 },
    #[error("not a popbridge UIDL map: {0}")]
    Malformed(String),
    #[error("more than {MAX_ENTRIES} entries")]
    TooBig,
    #[error("the map is larger than the {MAX_MAP_BYTES}-octet limit ({0} octets)")]
    TooLarge(usize),
    #[error(
        "the head announces {count} entries but the mailbox has never had more than {max} UIDs"
    )]
    MoreEntriesThanUids { count: usize, max: u32 },
    #[error(
        "the entries do not match the head's length and SHA-256 (an interrupted or mixed write?)"
    )]
    Checksum,
}

/// What names and checks one stored map: see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapHead {
    pub uid_validity: u32,
    pub count: usize,
    /// The generation: 1..=32 of `[0-9a-z]`, names the chunks in METADATA.
    pub gen: String,
    pub chunks: usize,
    /// Length of the largest chunk.
    pub chunk: usize,
    /// Length of the entry text.
    pub bytes: usize,
    pub sha256: [u8; 32],
}

impl std::fmt::Display for MapHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{MAGIC} {} {} gen={} chunks={} chunk={} bytes={} sha256=",
            self.uid_validity, self.count, self.gen, self.chunks, self.chunk, self.bytes
        )?;
        for b in self.sha256 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl MapHead {
    /// Parses and bounds a head line: nothing it announces beyond the limits above is
    /// accepted, so nothing is allocated or requested on its word.
    pub fn parse(line: &str) -> Result<MapHead, MapError> {
        if line.len() > MAX_HEAD_BYTES {
            return Err(MapError::Malformed("head line too long".into()));
        }
        let bad = |what: &str| MapError::Malformed(format!("head: bad {what}"));
        let mut t = line.split(' ');
        if t.next() != Some(MAGIC) {
            return Err(MapError::Malformed(format!("does not start with {MAGIC}")));
        }
        let uid_validity = t
            .next()
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| bad("UIDVALIDITY"))?;
        let count = t
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| bad("entry count"))?;
        let mut field = |name: &str| {
            t.next()
                .and_then(|v| v.strip_prefix(name))
                .and_then(|v| v.strip_prefix('='))
                .ok_or_else(|| bad(name))
        };
        let gen = field("gen")?.to_owned();
        let num = |v: &str, name: &str| v.parse::<usize>().map_err(|_| bad(name));
        let chunks = num(field("chunks")?, "chunks")?;
        let chunk = num(field("chunk")?, "chunk")?;
        let bytes = num(field("bytes")?, "bytes")?;
        let hex = field("sha256")?;
        if t.next().is_some() {
            return Err(bad("trailing field"));
        }
        if gen.is_empty()
            || gen.len() > 32
            || !gen
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        {
            return Err(bad("gen"));
        }
        if count > MAX_ENTRIES {
            return Err(MapError::TooBig);
        }
        if bytes > MAX_MAP_BYTES {
            return Err(MapError::TooLarge(bytes));
        }
        // popbridge's chunks are at least 1024 octets (the last one aside), so at least half
        // full: a head announcing many tiny chunks is not one popbridge wrote.
        if chunks > MAX_CHUNKS
            || chunk > MAX_CHUNK_BYTES
            || chunks > bytes / 512 + 1
            || chunk > bytes
        {
            return Err(bad("chunks"));
        }
        if (bytes == 0) != (count == 0) || (bytes > 0 && (chunks == 0 || chunk == 0)) {
            return Err(bad("bytes"));
        }
        // Hex digits only, checked before slicing: the head is the user's own METADATA entry,
        // and a multi-byte character would put a slice end inside it.
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("sha256"));
        }
        let mut sha256 = [0u8; 32];
        for (i, b) in sha256.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad("sha256"))?;
        }
        Ok(MapHead {
            uid_validity,
            count,
            gen,
            chunks,
            chunk,
            bytes,
            sha256,
        })
    }

    /// A map can hold no more entries than UIDs the mailbox ever assigned (UIDNEXT - 1).
    pub fn check_uid_next(&self, uid_next: Option<u32>) -> Result<(), MapError> {
        match uid_next {
            Some(next) if self.count > next.saturating_sub(1) as usize => {
                Err(MapError::MoreEntriesThanUids {
                    count: self.count,
                    max: next.saturating_sub(1),
                })
            }
            _ => Ok(()),
        }
    }
}

fn sha256(text: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, text);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A fresh generation name: milliseconds since the epoch and 32 random bits, in hex.
pub fn new_generation() -> String {
    use ring::rand::SecureRandom;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut r = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut r);
    format!("{ms:x}{:08x}", u32::from_be_bytes(r))
}

/// Whether `s` may be sent as a POP3 UIDL.
pub fn is_legal_uidl(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_UIDL_LEN && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// The legacy UIDLs of one maildrop under one UIDVALIDITY. Every value is a legal UIDL and no
/// two UIDs share one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UidlMap {
    uid_validity: u32,
    entries: BTreeMap<u32, String>,
    values: HashSet<String>,
}

/// Which UIDL a message is served with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// The legacy server's UIDL for this message.
    Legacy(String),
    /// The configured format.
    Generated(String),
    /// The configured format would have produced a UIDL the map gives to another message (a
    /// client holding that legacy UIDL would never download this one): the escape form.
    Escaped(String),
}

impl Served {
    pub fn as_str(&self) -> &str {
        match self {
            Served::Legacy(s) | Served::Generated(s) | Served::Escaped(s) => s,
        }
    }
    pub fn into_string(self) -> String {
        match self {
            Served::Legacy(s) | Served::Generated(s) | Served::Escaped(s) => s,
        }
    }
}

impl UidlMap {
    pub fn new(uid_validity: u32) -> UidlMap {
        UidlMap {
            uid_validity,
            ..UidlMap::default()
        }
    }

    pub fn uid_validity(&self) -> u32 {
        self.uid_validity
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn get(&self, uid: u32) -> Option<&str> {
        self.entries.get(&uid).map(String::as_str)
    }
    /// Entries in UID order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.entries.iter().map(|(u, s)| (*u, s.as_str()))
    }
    /// Whether some entry has this legacy UIDL.
    pub fn holds_uidl(&self, uidl: &str) -> bool {
        self.values.contains(uidl)
    }
    /// The UID a legacy UIDL belongs to.
    pub fn uid_of(&self, uidl: &str) -> Option<u32> {
        if !self.values.contains(uidl) {
            return None;
        }
        self.entries
            .iter()
            .find(|(_, v)| v.as_str() == uidl)
            .map(|(u, _)| *u)
    }

    /// Adds `uid → uidl`. Adding the same pair again is a no-op; a different UIDL for a mapped
    /// UID, or a UIDL another UID already has, is refused.
    pub fn insert(&mut self, uid: u32, uidl: &str) -> Result<(), MapError> {
        if uid == 0 {
            return Err(MapError::ZeroUid);
        }
        if !is_legal_uidl(uidl) {
            return Err(MapError::BadUidl(uidl.to_owned()));
        }
        if let Some(existing) = self.entries.get(&uid) {
            if existing == uidl {
                return Ok(());
            }
            return Err(MapError::Conflict {
                uid,
                existing: existing.clone(),
                new: uidl.to_owned(),
            });
        }
        if self.values.contains(uidl) {
            let other = self.uid_of(uidl).unwrap_or(0);
            return Err(MapError::DuplicateUidl {
                uidl: uidl.to_owned(),
                other,
            });
        }
        if self.entries.len() >= MAX_ENTRIES {
            return Err(MapError::TooBig);
        }
        self.values.insert(uidl.to_owned());
        self.entries.insert(uid, uidl.to_owned());
        Ok(())
    }

    /// The UIDL message `uid` is served with. Mapped UIDs get their legacy UIDL. Others get
    /// `format`'s UIDL, unless that equals a legacy UIDL of the map (any entry, listed or not,
    /// so the answer never depends on which messages are currently listed): then the escape
    /// form `pb-<uid 8 hex><uidvalidity 8 hex>`, with `-<n>` appended in the (absurd) case that
    /// the map holds that too. Stable across sessions for as long as the map is.
    pub fn serve(&self, uid: u32, uid_validity: u32, format: &UidlFormat) -> Served {
        if uid_validity == self.uid_validity {
            if let Some(legacy) = self.entries.get(&uid) {
                return Served::Legacy(legacy.clone());
            }
        }
        let generated = format.format(uid, uid_validity);
        if !self.values.contains(&generated) {
            return Served::Generated(generated);
        }
        let base = format!("pb-{uid:08x}{uid_validity:08x}");
        let mut candidate = base.clone();
        let mut n = 1u32;
        while self.values.contains(&candidate) {
            candidate = format!("{base}-{n}");
            n += 1;
        }
        Served::Escaped(candidate)
    }

    /// The entry text (see the module documentation).
    pub fn entries_text(&self) -> String {
        let mut out = String::new();
        for (uid, uidl) in &self.entries {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&uid.to_string());
            out.push(':');
            out.push_str(uidl);
        }
        out
    }

    /// The head and entry text for a copy that is not chunked (the local sled cache).
    pub fn to_local(&self) -> Result<(MapHead, String), MapError> {
        let text = self.entries_text();
        let head = self.head_for(&text, "local", usize::from(!text.is_empty()), text.len())?;
        Ok((head, text))
    }

    fn head_for(
        &self,
        text: &str,
        gen: &str,
        chunks: usize,
        chunk: usize,
    ) -> Result<MapHead, MapError> {
        if text.len() > MAX_MAP_BYTES {
            return Err(MapError::TooLarge(text.len()));
        }
        Ok(MapHead {
            uid_validity: self.uid_validity,
            count: self.entries.len(),
            gen: gen.to_owned(),
            chunks,
            chunk,
            bytes: text.len(),
            sha256: sha256(text.as_bytes()),
        })
    }

    /// The METADATA form of generation `gen`: the head value for [`METADATA_ENTRY`] and the
    /// chunk values for `<ENTRY>/<gen>/0..k`, each at most `chunk_bytes` (clamped to
    /// [`MAX_CHUNK_BYTES`]) long; an entry is never split. Refused over [`MAX_MAP_BYTES`].
    pub fn to_metadata(
        &self,
        chunk_bytes: usize,
        gen: &str,
    ) -> Result<(MapHead, Vec<String>), MapError> {
        let chunk_bytes = chunk_bytes.min(MAX_CHUNK_BYTES);
        let text = self.entries_text();
        let mut chunks: Vec<String> = Vec::new();
        let mut current = String::new();
        for token in text.split(' ').filter(|t| !t.is_empty()) {
            if !current.is_empty() && current.len() + 1 + token.len() > chunk_bytes {
                chunks.push(std::mem::take(&mut current));
            }
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(token);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        let largest = chunks.iter().map(String::len).max().unwrap_or(0);
        if chunks.len() > MAX_CHUNKS {
            return Err(MapError::TooLarge(text.len()));
        }
        let head = self.head_for(&text, gen, chunks.len(), largest)?;
        Ok((head, chunks))
    }

    /// The map `head` describes, from its entry text: the length and SHA-256 must match (so
    /// chunks of another generation, or a write cut short, are refused), then every entry is
    /// checked and counted.
    pub fn from_text(head: &MapHead, text: &str) -> Result<UidlMap, MapError> {
        if text.len() > MAX_MAP_BYTES {
            return Err(MapError::TooLarge(text.len()));
        }
        if text.len() != head.bytes || sha256(text.as_bytes()) != head.sha256 {
            return Err(MapError::Checksum);
        }
        let mut map = UidlMap::new(head.uid_validity);
        for token in text.split(' ').filter(|t| !t.is_empty()) {
            decode_entry(&mut map, token)?;
        }
        if map.len() != head.count {
            return Err(MapError::Malformed(format!(
                "head says {} entries, found {}",
                head.count,
                map.len()
            )));
        }
        Ok(map)
    }
}

/// Decodes one entry. Errors name the entry's position, never its contents (they are logged).
fn decode_entry(map: &mut UidlMap, token: &str) -> Result<(), MapError> {
    let at = map.len() + 1;
    let bad = |why: &str| MapError::Malformed(format!("entry {at}: {why}"));
    let (uid, uidl) = token.split_once(':').ok_or_else(|| bad("not uid:uidl"))?;
    let uid = uid.parse::<u32>().map_err(|_| bad("bad UID"))?;
    if uid <= map.entries.keys().next_back().copied().unwrap_or(0) {
        return Err(bad("out of UID order"));
    }
    map.insert(uid, uidl).map_err(|e| match e {
        MapError::BadUidl(_) => bad("not a legal UIDL"),
        MapError::DuplicateUidl { .. } => bad("UIDL used twice"),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UidlMap {
        let mut m = UidlMap::new(1_795_690_115);
        m.insert(3, "1500000000.1").unwrap();
        m.insert(4, "1500000000.2").unwrap();
        m.insert(10, "weird:uidl=with-colons").unwrap();
        m
    }

    fn local(m: &UidlMap) -> (MapHead, String) {
        m.to_local().unwrap()
    }

    #[test]
    fn head_and_text_round_trip_and_are_one_line() {
        let m = sample();
        let (head, text) = local(&m);
        assert_eq!(
            text,
            "3:1500000000.1 4:1500000000.2 10:weird:uidl=with-colons"
        );
        let line = head.to_string();
        assert!(!line.contains('\n') && line.len() <= MAX_HEAD_BYTES);
        assert!(
            line.starts_with(
                "popbridge-uidl-map/2 1795690115 3 gen=local chunks=1 chunk=55 bytes=55 sha256="
            ),
            "{line}"
        );
        assert_eq!(MapHead::parse(&line).unwrap(), head);
        assert_eq!(UidlMap::from_text(&head, &text).unwrap(), m);
        let empty = UidlMap::new(7);
        let (h, t) = local(&empty);
        assert_eq!(
            UidlMap::from_text(&MapHead::parse(&h.to_string()).unwrap(), &t).unwrap(),
            empty
        );
    }

    #[test]
    fn damaged_text_is_refused() {
        let (head, good) = local(&sample());
        for bad in [
            String::new(),
            good.replace("4:", "2:"),
            good.replace("4:1500000000.2", "4:1500000000.1"),
            good.replace("10:", "x:"),
            format!("{good} 11:"),
        ] {
            assert!(UidlMap::from_text(&head, &bad).is_err(), "{bad:?}");
        }
        // Text that matches a head it was not written with: the checksum tells.
        let mut other = sample();
        other.insert(11, "x").unwrap();
        let (_, other_text) = local(&other);
        assert_eq!(
            UidlMap::from_text(&head, &other_text),
            Err(MapError::Checksum)
        );
        // A head whose checksum matches but whose count lies.
        let mut lying = head.clone();
        lying.count = 4;
        assert!(matches!(
            UidlMap::from_text(&lying, &good),
            Err(MapError::Malformed(_))
        ));
    }

    /// A /private head is user-writable: whatever it claims, nothing past the limits is
    /// accepted, so a reader never allocates or requests on its word.
    #[test]
    fn heads_announcing_too_much_are_refused() {
        let (head, _) = local(&sample());
        let line = head.to_string();
        let hex = &line[line.find("sha256=").unwrap() + 7..];
        let with = |chunks: &str, chunk: &str, bytes: &str, count: &str| {
            format!("popbridge-uidl-map/2 1 {count} gen=abc chunks={chunks} chunk={chunk} bytes={bytes} sha256={hex}")
        };
        assert!(MapHead::parse(&with("1", "55", "55", "3")).is_ok());
        for (bad, why) in [
            (with("5000000", "1024", "33554432", "3"), "5M chunks"),
            (with("1", "1024", "33554433", "3"), "over 32 MiB"),
            (with("1", "9000000", "9000000", "3"), "chunk over 8 MiB"),
            (with("1", "55", "55", "5000001"), "too many entries"),
            (with("99", "55", "55", "3"), "more chunks than bytes"),
            (with("65536", "1024", "1000000", "3"), "tiny chunks"),
            (with("0", "0", "55", "3"), "bytes without chunks"),
            (with("1", "55", "55", "0"), "bytes without entries"),
            (
                with("1", "55", "55", "3").replace("gen=abc", "gen=../x"),
                "gen",
            ),
            (
                with("1", "55", "55", "3").replace("gen=abc", &format!("gen={}", "a".repeat(33))),
                "long gen",
            ),
            (format!("{} x", with("1", "55", "55", "3")), "trailing"),
            (
                with("1", "55", "55", "3").replace("sha256=", "sha256=zz"),
                "hex",
            ),
            // Found by fuzzing: a panic on a character boundary, before the fix.
            (
                format!(
                    "popbridge-uidl-map/2 1 1 gen=a chunks=1 chunk=1 bytes=1 sha256=0000000\u{e9}{}",
                    "0".repeat(55)
                ),
                "non-ASCII hex",
            ),
            (
                {
                    let w = with("1", "55", "55", "3");
                    let at = w.find("sha256=").unwrap() + 7;
                    format!("{}+f{}", &w[..at], &w[at + 2..])
                },
                "signed hex",
            ),
            (
                format!("{}{}", with("1", "55", "55", "3"), " ".repeat(600)),
                "long line",
            ),
            (
                "popbridge-uidl-map/1 1 3 chunks=1".to_string(),
                "old layout",
            ),
        ] {
            assert!(MapHead::parse(&bad).is_err(), "{why}: {bad}");
        }
        assert_eq!(
            MapHead::parse(&with("1", "1024", "33554433", "3")),
            Err(MapError::TooLarge(33554433))
        );
        let h = MapHead::parse(&with("1", "55", "55", "3")).unwrap();
        assert!(h.check_uid_next(Some(4)).is_ok());
        assert!(h.check_uid_next(None).is_ok());
        assert!(matches!(
            h.check_uid_next(Some(3)),
            Err(MapError::MoreEntriesThanUids { count: 3, max: 2 })
        ));
    }

    #[test]
    fn insert_refuses_conflicts_and_illegal_uidls() {
        let mut m = sample();
        m.insert(3, "1500000000.1").unwrap();
        assert!(matches!(m.insert(3, "x"), Err(MapError::Conflict { .. })));
        assert_eq!(
            m.insert(5, "1500000000.2"),
            Err(MapError::DuplicateUidl {
                uidl: "1500000000.2".into(),
                other: 4
            })
        );
        assert_eq!(m.insert(0, "a"), Err(MapError::ZeroUid));
        for bad in ["", "has space", "ä", &"x".repeat(71)] {
            assert!(
                matches!(m.insert(9, bad), Err(MapError::BadUidl(_))),
                "{bad}"
            );
        }
        assert_eq!(m.uid_of("1500000000.2"), Some(4));
        assert_eq!(m.uid_of("nope"), None);
    }

    #[test]
    fn serving_prefers_legacy_and_escapes_collisions() {
        let uv = 1_795_690_115;
        let f = UidlFormat::parse("%u").unwrap();
        let mut m = UidlMap::new(uv);
        // The legacy server used bare numbers too: legacy "5" belongs to UID 1 here.
        m.insert(1, "5").unwrap();
        m.insert(2, "6").unwrap();
        assert_eq!(m.serve(1, uv, &f), Served::Legacy("5".into()));
        assert_eq!(m.serve(3, uv, &f), Served::Generated("3".into()));
        // UID 5's own UIDL would be "5", which a client already holds for UID 1.
        let s = m.serve(5, uv, &f);
        assert_eq!(s, Served::Escaped("pb-000000056b080e83".into()));
        assert!(is_legal_uidl(s.as_str()));
        // Stable, and never equal to any legacy UIDL even when the escape form is taken.
        m.insert(7, "pb-000000056b080e83").unwrap();
        assert_eq!(
            m.serve(5, uv, &f),
            Served::Escaped("pb-000000056b080e83-1".into())
        );
        // Another UIDVALIDITY: the map says nothing about those UIDs.
        assert_eq!(m.serve(1, uv + 1, &f), Served::Generated("1".into()));
    }

    #[test]
    fn metadata_chunks_round_trip_and_respect_the_size() {
        let mut m = UidlMap::new(42);
        for uid in 1..=500u32 {
            m.insert(uid * 3, &format!("{:08x}{:08x}", uid, 99))
                .unwrap();
        }
        let (head, chunks) = m.to_metadata(1000, "g1").unwrap();
        assert!(chunks.len() > 5);
        assert_eq!(head.chunks, chunks.len());
        assert_eq!(head.gen, "g1");
        assert!(chunks.iter().all(|c| c.len() <= 1000 && !c.is_empty()));
        assert_eq!(head.chunk, chunks.iter().map(String::len).max().unwrap());
        assert_eq!(UidlMap::from_text(&head, &chunks.join(" ")).unwrap(), m);
        // A missing chunk, or chunks of another map under this head, are refused.
        assert!(UidlMap::from_text(&head, &chunks[1..].join(" ")).is_err());
        let mut changed = m.clone();
        changed.insert(1, "new").unwrap();
        let (_, new_chunks) = changed.to_metadata(1000, "g2").unwrap();
        assert_eq!(
            UidlMap::from_text(&head, &new_chunks.join(" ")),
            Err(MapError::Checksum)
        );
        let (head2, none) = UidlMap::new(42).to_metadata(1000, "g3").unwrap();
        assert!(none.is_empty());
        assert!(head2.to_string().starts_with(
            "popbridge-uidl-map/2 42 0 gen=g3 chunks=0 chunk=0 bytes=0 sha256=e3b0c442"
        ));
        assert!(UidlMap::from_text(&head2, "").unwrap().is_empty());
        assert!(UidlMap::from_text(&head2, &chunks[0]).is_err());
        // Generations are fresh and valid names.
        let (g1, g2) = (new_generation(), new_generation());
        assert_ne!(g1, g2);
        assert!(MapHead::parse(&head2.to_string().replace("gen=g3", &format!("gen={g1}"))).is_ok());
    }

    #[test]
    fn maps_over_the_size_limit_are_not_written() {
        // 450,000 entries of 70-octet UIDLs: about 35 MB of entry text.
        let mut m = UidlMap::new(1);
        let tail = "u".repeat(60);
        for uid in 1..=450_000u32 {
            m.insert(uid, &format!("{uid:010}{tail}")).unwrap();
        }
        assert!(matches!(
            m.to_metadata(1 << 20, "g"),
            Err(MapError::TooLarge(_))
        ));
        assert!(matches!(m.to_local(), Err(MapError::TooLarge(_))));
    }
}
