//! What the `migrate` jobs return: per user, the counts, where the map went, the verdict, the
//! conflicts and differences found and the warnings raised, as data. The `popbridge` binary
//! prints them (one report line per user, `DIFF` and `note` lines for verify); the wording of
//! each item is its `Display`.

use std::fmt;
use std::path::PathBuf;

use super::MigrateError;
use crate::state::StateError;
use crate::uidl::map::MapError;

/// One user of a wave: what was done for them, or why it failed, and the warnings raised on
/// the way (also when it failed: they were raised before).
#[derive(Debug)]
pub struct UserOutcome<R> {
    /// The client login (`--user`, a users-file or import-file line).
    pub user: String,
    pub warnings: Vec<Warning>,
    pub result: Result<R, MigrateError>,
}

/// The login used on a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendLogin {
    pub backend: String,
    pub login: String,
}

/// Which logins a user's work used on each side (see [`super::users::Logins`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginsUsed {
    /// The client login.
    pub user: String,
    /// The legacy side, for the jobs that log in there.
    pub legacy: Option<BackendLogin>,
    pub new: BackendLogin,
}

impl LoginsUsed {
    /// The sides whose login differs from the client login (what a report names), legacy
    /// first.
    pub fn differing(&self) -> Vec<&BackendLogin> {
        self.legacy
            .iter()
            .chain(std::iter::once(&self.new))
            .filter(|b| b.login != self.user)
            .collect()
    }
}

/// Where a user's map went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Refused: nothing was written.
    Nowhere,
    /// Every copy that should hold the map already did.
    Unchanged,
    /// Written to METADATA and/or the local state (at least one).
    Written { metadata: bool, sled: bool },
}

impl fmt::Display for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stored::Nowhere => f.write_str("nowhere"),
            Stored::Unchanged => f.write_str("unchanged"),
            Stored::Written { metadata, sled } => {
                let copies: Vec<&str> = [(*metadata, "metadata"), (*sled, "sled")]
                    .into_iter()
                    .filter_map(|(yes, name)| yes.then_some(name))
                    .collect();
                f.write_str(&copies.join("+"))
            }
        }
    }
}

/// A user's verdict: clean, changes accepted (`--accept-changed-uidls`), or refused (nothing
/// stored: the user needs attention). The number counts the changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Accepted(usize),
    Refused(usize),
}

impl Verdict {
    /// The verdict for `changed` changes, with or without `--accept-changed-uidls`.
    pub fn of(changed: usize, accept: bool) -> Verdict {
        match (changed, accept) {
            (0, _) => Verdict::Ok,
            (n, true) => Verdict::Accepted(n),
            (n, false) => Verdict::Refused(n),
        }
    }
}

/// A mapping that was not stored because another one for the same UID or UIDL exists (the
/// existing one is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// The local state's copy contradicts METADATA's.
    LocalCopy {
        uid: u32,
        uidl: String,
        error: MapError,
    },
    /// A match contradicts an existing mapping.
    Match {
        uid: u32,
        uidl: String,
        error: MapError,
    },
    /// An import line contradicts an existing mapping.
    ImportLine {
        file: PathBuf,
        line: usize,
        error: MapError,
    },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::LocalCopy { uid, uidl, error } => write!(
                f,
                "local copy: UID {uid} / legacy UIDL {uidl}: {error} (METADATA's mapping kept)"
            ),
            Conflict::Match { uid, uidl, error } => write!(
                f,
                "UID {uid} / legacy UIDL {uidl}: {error} (existing mapping kept)"
            ),
            Conflict::ImportLine { file, line, error } => write!(
                f,
                "{}:{line}: {error} (existing mapping kept)",
                file.display()
            ),
        }
    }
}

/// Something the operator should know that does not stop the job.
#[derive(Debug)]
pub enum Warning {
    /// The local state cannot be opened (a running `popbridge serve` holds it): maps go to
    /// METADATA only.
    StateNotUpdated(StateError),
    /// `shared_map = "metadata"` but the server lacks METADATA: the map is only in the local
    /// state.
    NoMetadata { login: String },
    /// An import line names a UID the mailbox does not have (it is mapped anyway).
    UidNotInMailbox {
        file: PathBuf,
        line: usize,
        uid: u32,
        user: String,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::StateNotUpdated(e) => write!(f, "local state not updated: {e}"),
            Warning::NoMetadata { login } => write!(
                f,
                "{login}: the IMAP server does not offer METADATA; the map is only in this instance's state"
            ),
            Warning::UidNotInMailbox {
                file,
                line,
                uid,
                user,
            } => write!(
                f,
                "{}:{line}: UID {uid} is not in {user}'s mailbox (mapped anyway)",
                file.display()
            ),
        }
    }
}

/// What `migrate uidls` does with a legacy message that has no copy in the new store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LegacyWithoutCopy {
    /// Store nothing for the user (they need attention).
    #[default]
    Refuse,
    /// Store the map without it (the message is not in the new store: a client that had not
    /// downloaded it never will).
    Drop,
}

/// What `migrate uidls` does with a new-store message that has no legacy one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NewWithoutLegacy {
    /// Store nothing for the user (they need attention).
    #[default]
    Refuse,
    /// Store the map: the message is served as new mail (a generated UIDL; clients download
    /// it once).
    New,
}

/// The policies of a `migrate uidls` wave (`--accept-changed-uidls` accepts everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policies {
    pub legacy_without_copy: LegacyWithoutCopy,
    pub new_without_legacy: NewWithoutLegacy,
}

impl fmt::Display for Policies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = match self.legacy_without_copy {
            LegacyWithoutCopy::Refuse => "refuse",
            LegacyWithoutCopy::Drop => "drop",
        };
        let n = match self.new_without_legacy {
            NewWithoutLegacy::Refuse => "refuse",
            NewWithoutLegacy::New => "new",
        };
        write!(
            f,
            "legacy message without a copy: {l}; new-store message without a legacy one: {n}"
        )
    }
}

/// `migrate uidls` for one user.
#[derive(Debug)]
pub struct UidlsReport {
    pub logins: LoginsUsed,
    /// Messages on the legacy server and in the new store.
    pub legacy: usize,
    pub new: usize,
    /// Matched by size (in order) and by header hash.
    pub by_size: usize,
    pub by_header: usize,
    /// Matched by the `X-UIDL:` header of the new store's copy.
    pub by_x_uidl: usize,
    /// Legacy UIDLs with no match: their clients would download them again.
    pub unmatched_legacy: Vec<String>,
    pub unmatched_new: usize,
    /// Messages that share their header hash with another (legacy, new).
    pub duplicates: (usize, usize),
    /// Existing mappings kept against the copies' or the new match's (see [`Conflict`]).
    pub conflicts: Vec<Conflict>,
    pub stored: Stored,
    /// Over the unmatched legacy messages and the conflicts.
    pub verdict: Verdict,
}

impl UidlsReport {
    pub fn matched(&self) -> usize {
        self.by_size + self.by_header + self.by_x_uidl
    }
}

/// `migrate import` for one user of the file.
#[derive(Debug)]
pub struct ImportReport {
    pub logins: LoginsUsed,
    /// The file's lines for this user.
    pub lines: usize,
    pub conflicts: Vec<Conflict>,
    pub stored: Stored,
    /// Over the conflicts.
    pub verdict: Verdict,
}

/// A message whose LIST size in popbridge differs from what its RETR delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeDiff {
    pub uid: u32,
    pub listed: u64,
    pub delivered: usize,
}

impl fmt::Display for SizeDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UID {}: popbridge lists {} octets but delivers {}",
            self.uid, self.listed, self.delivered
        )
    }
}

/// A difference a client would notice between the legacy server and popbridge (README, "What
/// verify counts as a difference"). Message numbers count from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    Count {
        legacy: usize,
        bridge: usize,
    },
    /// A legacy message popbridge does not show.
    Missing {
        number: usize,
        uidl: String,
    },
    /// Same UIDL, different bytes (not only in the headers servers add or rewrite).
    Bytes {
        uidl: String,
        legacy_len: usize,
        bridge_len: usize,
    },
    /// A popbridge message the legacy server does not show.
    Extra {
        number: usize,
        uidl: String,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Count { legacy, bridge } => {
                write!(f, "message count: legacy {legacy}, popbridge {bridge}")
            }
            Difference::Missing { number, uidl } => write!(
                f,
                "legacy message {number} (UIDL {uidl}) is missing from popbridge: the client would lose or re-download it"
            ),
            Difference::Bytes {
                uidl,
                legacy_len,
                bridge_len,
            } => write!(
                f,
                "UIDL {uidl}: message bytes differ (legacy {legacy_len} octets, popbridge {bridge_len}; SHA-256 differs)"
            ),
            Difference::Extra { number, uidl } => write!(
                f,
                "popbridge message {number} (UIDL {uidl}) is not on the legacy server: the client would download it as new"
            ),
        }
    }
}

/// A difference a client would not notice (only noted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The bytes differ only in the headers servers add or rewrite.
    HeadersOnly { uidl: String },
    /// Identical bytes, LIST sizes counted differently.
    ListSize {
        uidl: String,
        legacy: u64,
        bridge: u64,
    },
    /// Another message number.
    Order {
        uidl: String,
        legacy: usize,
        bridge: usize,
    },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::HeadersOnly { uidl } => write!(
                f,
                "UIDL {uidl}: differs only in headers servers add or rewrite (Return-Path, Status, X-UID, ...)"
            ),
            Note::ListSize {
                uidl,
                legacy,
                bridge,
            } => write!(
                f,
                "UIDL {uidl}: LIST size legacy {legacy} vs popbridge {bridge} with identical bytes (line-end counting)"
            ),
            Note::Order {
                uidl,
                legacy,
                bridge,
            } => write!(
                f,
                "UIDL {uidl}: message number legacy {legacy} vs popbridge {bridge}"
            ),
        }
    }
}

/// `migrate verify` for one user.
#[derive(Debug)]
pub struct VerifyReport {
    pub logins: LoginsUsed,
    /// Messages the legacy server shows.
    pub legacy_messages: usize,
    /// In the order found (popbridge's message order).
    pub size_diffs: Vec<SizeDiff>,
    pub notes: Vec<Note>,
    pub diffs: Vec<Difference>,
}

impl VerifyReport {
    /// No difference a client would notice.
    pub fn clean(&self) -> bool {
        self.diffs.is_empty() && self.size_diffs.is_empty()
    }

    pub fn differences(&self) -> usize {
        self.diffs.len() + self.size_diffs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_and_verdicts_read_as_the_reports_print_them() {
        assert_eq!(Stored::Nowhere.to_string(), "nowhere");
        assert_eq!(Stored::Unchanged.to_string(), "unchanged");
        let written = |metadata, sled| Stored::Written { metadata, sled }.to_string();
        assert_eq!(written(true, true), "metadata+sled");
        assert_eq!(written(true, false), "metadata");
        assert_eq!(written(false, true), "sled");
        assert_eq!(Verdict::of(0, false), Verdict::Ok);
        assert_eq!(Verdict::of(0, true), Verdict::Ok);
        assert_eq!(Verdict::of(2, true), Verdict::Accepted(2));
        assert_eq!(Verdict::of(2, false), Verdict::Refused(2));
    }
}
