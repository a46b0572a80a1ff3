//! UIDLs of a maildrop served from several folders (`mailboxes`). Messages in the first folder
//! keep the configured format (or their migrated legacy UIDL) exactly, so switching the option
//! on makes no client download anything again. Messages in any later folder get
//! `<uid 8 hex><uidvalidity 8 hex>~<folder tag 8 hex>` (25 characters), the tag being the
//! 32-bit FNV-1a hash of the folder's name. It cannot collide:
//!
//! - with the first folder's generated UIDLs: a format's output is its literals and digits,
//!   and the configuration refuses a format with `~` in it when several folders are served;
//!   the escape form of [`super::map::UidlMap::serve`] (`pb-...`) has no `~` either;
//! - with a migrated legacy UIDL: checked against the map, and `~<n>` appended until free
//!   (stable for as long as the map is, like the escape form);
//! - between later folders: the configuration refuses two folders with the same tag, and
//!   within a folder UID and UIDVALIDITY are unique.
//!
//! A message moved between folders gets a new UID in its new folder, so it gets a new UIDL
//! there (a client sees it as new mail; see the README), unless the server offers OBJECTID:
//! then it keeps the UIDL it was first listed with (see [`super::moved`]).
//!
//! In the snapshot, messages of later folders carry *handles* instead of UIDs (counting down
//! from `u32::MAX`); [`OtherUidls`] gives their UIDLs. Messages of the first folder keep
//! their UID as handle.

use std::collections::HashMap;

use super::map::UidlMap;
use super::moved::Origin;

/// What separates the folder tag in a later folder's UIDL.
pub const MARK: char = '~';

/// The tag of a folder: FNV-1a (32 bits) of its name.
pub fn folder_tag(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The UIDL of message `uid` in a later folder tagged `tag`, avoiding any UIDL of `legacy`.
pub fn folder_uidl(tag: u32, uid: u32, uid_validity: u32, legacy: Option<&UidlMap>) -> String {
    let base = format!("{uid:08x}{uid_validity:08x}{MARK}{tag:08x}");
    let Some(map) = legacy else {
        return base;
    };
    let mut candidate = base.clone();
    let mut n = 1u32;
    while map.holds_uidl(&candidate) {
        candidate = format!("{base}{MARK}{n}");
        n += 1;
    }
    candidate
}

/// The handle of the `i`-th message (0-based, in listing order) of the later folders.
pub fn handle(i: usize) -> u32 {
    u32::MAX - u32::try_from(i).unwrap_or(u32::MAX)
}

/// The UIDLs of the messages of later folders, by handle (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtherUidls {
    uidls: Vec<String>,
    /// Messages moved between folders, served under the UIDL they were first listed with
    /// (see [`super::moved`]), by handle (first-folder UID or later-folder handle).
    pins: HashMap<u32, Origin>,
}

impl OtherUidls {
    /// `uidls[i]` is the UIDL of the message with handle [`handle`]`(i)`.
    pub fn new(uidls: Vec<String>) -> OtherUidls {
        OtherUidls {
            uidls,
            pins: HashMap::new(),
        }
    }

    /// Serve these handles under the UIDLs they were first listed with.
    pub fn pin(&mut self, pins: HashMap<u32, Origin>) {
        self.pins = pins;
    }

    /// Where the message with this handle was first listed, when it was moved since.
    pub fn pinned(&self, h: u32) -> Option<&Origin> {
        self.pins.get(&h)
    }

    /// The lowest handle in use (`u32::MAX` + 1 - count), `None` when empty.
    pub fn lowest_handle(&self) -> Option<u32> {
        self.uidls.len().checked_sub(1).map(handle)
    }

    /// The UIDL of the message with this handle, if it is one of a later folder.
    pub fn get(&self, h: u32) -> Option<&str> {
        let i = (u32::MAX - h) as usize;
        self.uidls.get(i).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.uidls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uidls.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uidl::UidlFormat;

    #[test]
    fn form_and_handles() {
        let tag = folder_tag("Junk");
        let u = folder_uidl(tag, 1, 0x6b08_0e83, None);
        assert_eq!(u, format!("000000016b080e83~{tag:08x}"));
        assert_eq!(u.len(), 25);
        assert!(crate::uidl::map::is_legal_uidl(&u));
        // The first folder's UIDL of the same UID and UIDVALIDITY is the prefix, never equal.
        assert_ne!(UidlFormat::default().format(1, 0x6b08_0e83), u);
        assert_ne!(folder_tag("Junk"), folder_tag("Spam"));
        let o = OtherUidls::new(vec!["a".into(), "b".into()]);
        assert_eq!(o.get(handle(0)), Some("a"));
        assert_eq!(o.get(handle(1)), Some("b"));
        assert_eq!(o.get(handle(2)), None);
        assert_eq!(o.get(5), None);
        assert_eq!(o.lowest_handle(), Some(u32::MAX - 1));
        assert_eq!(OtherUidls::default().lowest_handle(), None);
    }

    #[test]
    fn a_legacy_uidl_is_never_served_twice() {
        let tag = folder_tag("Junk");
        let base = folder_uidl(tag, 7, 9, None);
        let mut map = UidlMap::new(9);
        map.insert(1, &base).unwrap();
        map.insert(2, &format!("{base}~1")).unwrap();
        assert_eq!(folder_uidl(tag, 7, 9, Some(&map)), format!("{base}~2"));
        assert_eq!(
            folder_uidl(tag, 8, 9, Some(&map)),
            folder_uidl(tag, 8, 9, None)
        );
    }
}
