//! The legacy UIDL map of one maildrop: IMAP UID → the UIDL the old POP3 server showed for that
//! message, valid for one UIDVALIDITY. Sans-I/O: validation, the text codec shared by the sled
//! cache and the IMAP METADATA copy, METADATA chunking, and the rule that decides which UIDL a
//! message is served with.
//!
//! Text form (one line, no line breaks, so any METADATA backend stores it verbatim):
//! `popbridge-uidl-map/1 <uidvalidity> <count>` followed by ` <uid>:<uidl>` per entry, in UID
//! order. A UIDL is 1..=70 octets of 0x21..0x7E (RFC 1939), so it never contains the space
//! that separates entries; the UID is split off at the first `:`.

use std::collections::{BTreeMap, HashSet};

use crate::uidl::{UidlFormat, MAX_UIDL_LEN};

const MAGIC: &str = "popbridge-uidl-map/1";

/// The METADATA entry (RFC 5464, private to the user) that holds the map's head line; its
/// chunks live at `<ENTRY>/0`, `<ENTRY>/1`, ...
pub const METADATA_ENTRY: &str = "/private/vendor/popbridge/uidl-map";

/// Most entries a map may hold (bounds memory when decoding what a server returns).
pub const MAX_ENTRIES: usize = 5_000_000;

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

    /// The one-line text form.
    pub fn encode(&self) -> String {
        let mut out = self.head();
        for (uid, uidl) in &self.entries {
            out.push(' ');
            out.push_str(&uid.to_string());
            out.push(':');
            out.push_str(uidl);
        }
        out
    }

    fn head(&self) -> String {
        format!("{MAGIC} {} {}", self.uid_validity, self.entries.len())
    }

    /// Parses the text form, checking every entry and the count.
    pub fn decode(text: &str) -> Result<UidlMap, MapError> {
        let mut tokens = text.split(' ');
        let (uid_validity, count) = parse_head(&mut tokens)?;
        let mut map = UidlMap::new(uid_validity);
        for token in tokens {
            decode_entry(&mut map, token)?;
        }
        if map.len() != count {
            return Err(MapError::Malformed(format!(
                "head says {count} entries, found {}",
                map.len()
            )));
        }
        Ok(map)
    }

    /// The METADATA form: a head value for [`METADATA_ENTRY`] (`<text head> chunks=<k>`) and
    /// `k` chunk values (space-separated entries) for `<ENTRY>/0..k`, each at most
    /// `chunk_bytes` long (an entry is never split). Chunks are written first and the head
    /// last, so a reader never sees a head whose chunks are not all there.
    pub fn to_metadata(&self, chunk_bytes: usize) -> (String, Vec<String>) {
        let mut chunks: Vec<String> = Vec::new();
        let mut current = String::new();
        for (uid, uidl) in &self.entries {
            let token = format!("{uid}:{uidl}");
            if !current.is_empty() && current.len() + 1 + token.len() > chunk_bytes {
                chunks.push(std::mem::take(&mut current));
            }
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(&token);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        (format!("{} chunks={}", self.head(), chunks.len()), chunks)
    }

    /// How many chunks a METADATA head announces.
    pub fn metadata_chunk_count(head: &str) -> Result<usize, MapError> {
        let mut tokens = head.split(' ');
        parse_head(&mut tokens)?;
        let chunks = tokens
            .next()
            .and_then(|t| t.strip_prefix("chunks="))
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| MapError::Malformed("head without chunks=".into()))?;
        if tokens.next().is_some() || chunks > MAX_ENTRIES {
            return Err(MapError::Malformed("bad METADATA head".into()));
        }
        Ok(chunks)
    }

    /// Reassembles the map from its METADATA head and chunks (in order).
    pub fn from_metadata(head: &str, chunks: &[&str]) -> Result<UidlMap, MapError> {
        let want = Self::metadata_chunk_count(head)?;
        if chunks.len() != want {
            return Err(MapError::Malformed(format!(
                "head announces {want} chunks, {} found",
                chunks.len()
            )));
        }
        let mut tokens = head.split(' ');
        let (uid_validity, count) = parse_head(&mut tokens)?;
        let mut map = UidlMap::new(uid_validity);
        for chunk in chunks {
            for token in chunk.split(' ').filter(|t| !t.is_empty()) {
                decode_entry(&mut map, token)?;
            }
        }
        if map.len() != count {
            return Err(MapError::Malformed(format!(
                "head says {count} entries, chunks hold {}",
                map.len()
            )));
        }
        Ok(map)
    }
}

fn parse_head<'a>(tokens: &mut impl Iterator<Item = &'a str>) -> Result<(u32, usize), MapError> {
    if tokens.next() != Some(MAGIC) {
        return Err(MapError::Malformed(format!("does not start with {MAGIC}")));
    }
    let uid_validity = tokens
        .next()
        .and_then(|t| t.parse::<u32>().ok())
        .ok_or_else(|| MapError::Malformed("bad UIDVALIDITY".into()))?;
    let count = tokens
        .next()
        .and_then(|t| t.parse::<usize>().ok())
        .ok_or_else(|| MapError::Malformed("bad entry count".into()))?;
    if count > MAX_ENTRIES {
        return Err(MapError::TooBig);
    }
    Ok((uid_validity, count))
}

fn decode_entry(map: &mut UidlMap, token: &str) -> Result<(), MapError> {
    let (uid, uidl) = token
        .split_once(':')
        .ok_or_else(|| MapError::Malformed(format!("entry {token:?} is not uid:uidl")))?;
    let uid = uid
        .parse::<u32>()
        .map_err(|_| MapError::Malformed(format!("entry {token:?}: bad UID")))?;
    if uid <= map.entries.keys().next_back().copied().unwrap_or(0) {
        return Err(MapError::Malformed(format!(
            "entry {token:?} out of UID order"
        )));
    }
    map.insert(uid, uidl)
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

    #[test]
    fn text_form_round_trips_and_is_one_line() {
        let m = sample();
        let text = m.encode();
        assert_eq!(
            text,
            "popbridge-uidl-map/1 1795690115 3 3:1500000000.1 4:1500000000.2 10:weird:uidl=with-colons"
        );
        assert!(!text.contains('\n'));
        assert_eq!(UidlMap::decode(&text).unwrap(), m);
        let empty = UidlMap::new(7);
        assert_eq!(UidlMap::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn damaged_text_is_refused() {
        let good = sample().encode();
        for bad in [
            String::new(),
            "popbridge-uidl-map/2 1 0".into(),
            good.replace(" 3 3:", " 4 3:"),
            good.replace("4:", "2:"),
            good.replace("4:1500000000.2", "4:1500000000.1"),
            good.replace("10:", "x:"),
            good.replace("3:1500000000.1", "3"),
            good.replace(" 3 3:", " 99999999999 3:"),
            format!("{good} 11:"),
        ] {
            assert!(UidlMap::decode(&bad).is_err(), "{bad:?}");
        }
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
        let (head, chunks) = m.to_metadata(1000);
        assert!(chunks.len() > 5);
        assert!(chunks.iter().all(|c| c.len() <= 1000 && !c.is_empty()));
        assert_eq!(UidlMap::metadata_chunk_count(&head).unwrap(), chunks.len());
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        assert_eq!(UidlMap::from_metadata(&head, &refs).unwrap(), m);
        // A missing chunk, or chunks from another map, are refused.
        assert!(UidlMap::from_metadata(&head, &refs[1..]).is_err());
        let (head2, _) = UidlMap::new(42).to_metadata(1000);
        assert_eq!(head2, "popbridge-uidl-map/1 42 0 chunks=0");
        assert!(UidlMap::from_metadata(&head2, &refs[..0])
            .unwrap()
            .is_empty());
        assert!(UidlMap::from_metadata(&head2, &refs[..1]).is_err());
    }
}
