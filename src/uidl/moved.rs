//! UIDLs that follow a message moved between the folders of a maildrop, on a server that
//! offers OBJECTID (RFC 8474): the server keeps a message's EMAILID across MOVE, and popbridge
//! keeps, per maildrop, which UIDL each EMAILID was first listed under ([`Origins`]). A
//! message listed again elsewhere is served under that UIDL ([`resolve`]). Sans-I/O.
//!
//! An [`Origin`] names a UIDL without spelling it: a first-folder UID (served through the
//! format and any legacy map, which the POP3 session applies) or a later folder's UIDL. The
//! served UIDLs stay unique: the format and the legacy map give distinct UIDLs to distinct
//! first-folder UIDs, later folders' UIDLs never equal a first-folder one (see
//! [`super::folders`]), so two messages get the same UIDL exactly when their origins are
//! equal; [`resolve`] drops every pin whose origin another listed message has (the message is
//! then served where it is, and logged), and ignores an EMAILID listed twice (a copy).
//!
//! The map is a cache: without it (state lost, another node of a fleet) a moved message gets
//! the UIDL of where it is, today's documented behaviour (downloaded once more), never a lost
//! or re-shown message (what is listed is still what the server's SEARCH returns).

use std::collections::HashMap;

use super::map::is_legal_uidl;

/// Longest object identifier (RFC 8474: 1 to 255 characters).
pub const MAX_OBJECTID: usize = 255;

/// Whether `s` is an RFC 8474 objectid: 1 to 255 of `A-Z a-z 0-9 _ -`.
pub fn is_objectid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_OBJECTID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Most EMAILIDs remembered per maildrop (a bigger listing is served by location only).
pub const MAX_ORIGINS: usize = 100_000;

/// The UIDL a message was first listed under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The first folder's message with this UID, under this UIDVALIDITY.
    First { uid_validity: u32, uid: u32 },
    /// A later folder's UIDL, as served.
    Other(String),
}

/// EMAILID -> the UIDL it was first listed under.
pub type Origins = HashMap<String, Origin>;

/// One listed message: its snapshot handle, the UIDL of where it is, its EMAILID if known.
#[derive(Debug, Clone)]
pub struct Listed {
    pub handle: u32,
    pub here: Origin,
    pub email_id: Option<String>,
}

/// What [`resolve`] decided.
#[derive(Debug, Default)]
pub struct Resolved {
    /// Handles served under another UIDL than where they are.
    pub pins: HashMap<u32, Origin>,
    /// The map to keep, when it changed.
    pub store: Option<Origins>,
    /// Pins dropped because their UIDL was another listed message's.
    pub collisions: usize,
}

/// Pins for the moved messages of `listed` (served under the UIDL `known` has for their
/// EMAILID), and the map with every unmapped listed message added under the UIDL it is served
/// with now. `prune`: the listing is complete (every folder, no view), so EMAILIDs no longer
/// listed are forgotten. `first_validity`: the first folder's UIDVALIDITY (an origin under
/// another one cannot be served again, and is replaced).
pub fn resolve(listed: &[Listed], known: &Origins, first_validity: u32, prune: bool) -> Resolved {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for l in listed {
        if let Some(e) = &l.email_id {
            *count.entry(e.as_str()).or_default() += 1;
        }
    }
    fn unique<'a>(l: &'a Listed, count: &HashMap<&str, usize>) -> Option<&'a str> {
        l.email_id
            .as_deref()
            .filter(|e| count.get(e).copied() == Some(1))
    }
    let usable = |o: &Origin| match o {
        Origin::First { uid_validity, .. } => *uid_validity == first_validity,
        Origin::Other(_) => true,
    };
    let mut pins: HashMap<u32, Origin> = HashMap::new();
    for l in listed {
        if let Some(o) = unique(l, &count).and_then(|e| known.get(e)) {
            if *o != l.here && usable(o) {
                pins.insert(l.handle, o.clone());
            }
        }
    }
    // Drop pins until every served origin is unique (dropping one can make its message's
    // own location collide with another pin, hence the loop; it only removes pins).
    let mut collisions = 0;
    loop {
        let mut served: HashMap<&Origin, usize> = HashMap::new();
        for l in listed {
            *served
                .entry(pins.get(&l.handle).unwrap_or(&l.here))
                .or_default() += 1;
        }
        let clashing: Vec<u32> = listed
            .iter()
            .filter(|l| pins.get(&l.handle).is_some_and(|o| served[o] > 1))
            .map(|l| l.handle)
            .collect();
        if clashing.is_empty() {
            break;
        }
        collisions += clashing.len();
        for h in clashing {
            pins.remove(&h);
        }
    }
    let mut next: Origins = if prune {
        listed
            .iter()
            .filter_map(|l| l.email_id.as_ref())
            .filter_map(|e| known.get_key_value(e))
            .map(|(e, o)| (e.clone(), o.clone()))
            .collect()
    } else {
        known.clone()
    };
    for l in listed {
        let Some(e) = unique(l, &count) else { continue };
        let served = pins.get(&l.handle).unwrap_or(&l.here);
        if next.get(e) != Some(served) && (next.contains_key(e) || next.len() < MAX_ORIGINS) {
            next.insert(e.to_owned(), served.clone());
        }
    }
    let store = (next != *known).then_some(next);
    Resolved {
        pins,
        store,
        collisions,
    }
}

/// The map as text, one EMAILID a line: `<emailid> F <uidvalidity> <uid>` or
/// `<emailid> U <uidl>`.
pub fn encode(origins: &Origins) -> String {
    let mut lines: Vec<String> = origins
        .iter()
        .map(|(e, o)| match o {
            Origin::First { uid_validity, uid } => format!("{e} F {uid_validity} {uid}\n"),
            Origin::Other(u) => format!("{e} U {u}\n"),
        })
        .collect();
    lines.sort_unstable();
    lines.concat()
}

/// The map from [`encode`]'s text; `None` when damaged or over [`MAX_ORIGINS`] (then it is
/// ignored: a cache).
pub fn decode(text: &str) -> Option<Origins> {
    let mut out = Origins::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ' ');
        let (e, kind, rest) = (parts.next()?, parts.next()?, parts.next()?);
        if !is_objectid(e) {
            return None;
        }
        let origin = match kind {
            "F" => {
                let (v, u) = rest.split_once(' ')?;
                Origin::First {
                    uid_validity: v.parse().ok()?,
                    uid: u.parse().ok().filter(|&u| u != 0)?,
                }
            }
            "U" if is_legal_uidl(rest) => Origin::Other(rest.to_owned()),
            _ => return None,
        };
        out.insert(e.to_owned(), origin);
        if out.len() > MAX_ORIGINS {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(uid: u32) -> Origin {
        Origin::First {
            uid_validity: 9,
            uid,
        }
    }

    fn l(handle: u32, here: Origin, e: Option<&str>) -> Listed {
        Listed {
            handle,
            here,
            email_id: e.map(str::to_owned),
        }
    }

    #[test]
    fn a_moved_message_keeps_its_first_uidl() {
        let junk = Origin::Other("00000002x~j".into());
        // First session: INBOX 1 (E1), Junk 2 (E2): both recorded where they are.
        let s1 = [
            l(1, first(1), Some("E1")),
            l(u32::MAX, junk.clone(), Some("E2")),
        ];
        let r = resolve(&s1, &Origins::new(), 9, true);
        assert!(r.pins.is_empty());
        let map = r.store.unwrap();
        assert_eq!(map["E2"], junk);
        // E2 moved to INBOX as UID 3; E1 moved to Junk.
        let s2 = [
            l(3, first(3), Some("E2")),
            l(u32::MAX, Origin::Other("00000005x~j".into()), Some("E1")),
        ];
        let r = resolve(&s2, &map, 9, true);
        assert_eq!(r.pins[&3], junk);
        assert_eq!(r.pins[&u32::MAX], first(1));
        assert!(r.store.is_none(), "nothing new to remember");
        // The text form round-trips.
        assert_eq!(decode(&encode(&map)).unwrap(), map);
    }

    #[test]
    fn collisions_copies_and_other_validities_fall_back() {
        let mut known = Origins::new();
        known.insert("E1".into(), first(1));
        known.insert("E2".into(), first(1));
        known.insert(
            "E3".into(),
            Origin::First {
                uid_validity: 8,
                uid: 4,
            },
        );
        // E1's pin equals E2's pin: both dropped. UID 1 is also still listed.
        let s = [
            l(1, first(1), None),
            l(5, first(5), Some("E1")),
            l(6, first(6), Some("E2")),
            l(7, first(7), Some("E3")),
            // A copy: the same EMAILID twice is never pinned.
            l(8, first(8), Some("E4")),
            l(9, first(9), Some("E4")),
        ];
        known.insert("E4".into(), first(2));
        let r = resolve(&s, &known, 9, true);
        assert!(r.pins.is_empty(), "{:?}", r.pins);
        assert_eq!(r.collisions, 2);
        let map = r.store.unwrap();
        assert_eq!(map["E1"], first(5), "remembered as now served");
        assert_eq!(map["E3"], first(7), "another UIDVALIDITY is replaced");
        assert_eq!(map["E4"], first(2), "a copy changes nothing");
    }

    #[test]
    fn prune_only_when_complete() {
        let mut known = Origins::new();
        known.insert("gone".into(), first(1));
        let s = [l(2, first(2), Some("E2"))];
        let kept = resolve(&s, &known, 9, false).store.unwrap();
        assert!(kept.contains_key("gone") && kept.contains_key("E2"));
        let pruned = resolve(&s, &known, 9, true).store.unwrap();
        assert!(!pruned.contains_key("gone") && pruned.contains_key("E2"));
    }

    #[test]
    fn damaged_text_is_ignored() {
        assert!(decode("E1 F 9\n").is_none());
        assert!(decode("bad id F 9 1\n").is_none());
        assert!(decode("E1 X 9 1\n").is_none());
        assert!(decode("E1 F 9 0\n").is_none());
        assert_eq!(decode("").unwrap(), Origins::new());
    }
}
