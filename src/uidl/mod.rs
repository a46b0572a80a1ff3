//! UIDLs: the formats popbridge generates them in ([`format`], Dovecot's `pop3_uidl_format`
//! syntax) and the legacy UIDL maps migrated from old POP3 servers ([`map`]), and UIDLs that follow moved messages ([`moved`]). Sans-I/O.

pub mod folders;
pub mod format;
pub mod map;
pub mod moved;

pub use format::{
    expand_preset, UidlFormat, UidlFormatError, DEFAULT_UIDL_FORMAT, MAX_UIDL_LEN, PRESETS,
};
pub use map::UidlMap;
