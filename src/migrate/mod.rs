//! Moving POP3 users from a legacy POP3 server to an IMAP store without any client noticing:
//! `popbridge migrate` (matching legacy messages to IMAP messages, storing the legacy UIDL map,
//! [`crate::uidl::map`], and verifying what a user would see).
//!
//! | module | job |
//! |---|---|
//! | [`matcher`] | which legacy message is which IMAP message (sans-I/O) |
//! | [`store`] | the new IMAP mailbox as `migrate` sees it (sizes, headers, METADATA) |
//! | [`users`] | who is migrated and how each side is reached: users files, logins, credentials |
//! | [`copies`] | a user's existing map copies (METADATA, local state): read, merge, write |
//! | [`uidls`] | `migrate uidls`: match a wave of users and store their maps |
//! | [`import`] | `migrate import`: maps from a `user uid legacy-uidl` file |
//! | [`verify`] | `migrate verify`: the legacy server's view against popbridge's |
//! | [`report`] | what each of them returns, per user, as data |
//! | [`wave`] | a wave's users in parallel, connections per backend, backoff when throttled |
//! | [`summary`] | a wave added up, and one JSON object per user |
//! | [`journal`] | each user's outcome on disk, so that a re-run skips the users done |
//!
//! Nothing here prints: the jobs return reports (a wave hands them over one user at a time)
//! and the `popbridge` binary prints them.

pub mod copies;
pub mod import;
pub mod journal;
pub mod matcher;
pub mod report;
pub mod store;
pub mod summary;
pub mod uidls;
pub mod users;
pub mod verify;
pub mod wave;

use std::path::PathBuf;

use crate::maildrop::MaildropError;
use crate::routing::RoutingError;
use crate::uidl::map::MapError;
use crate::uidl::UidlFormatError;
use crate::upstream::pop3::Pop3Error;
use crate::upstream::SetupError;
use store::StoreError;

/// Largest message read whole (RETR for verify and header fallbacks).
const MAX_MESSAGE: usize = 256 << 20;
/// Largest `TOP n 0` answer.
const MAX_HEADER: usize = 4 << 20;

/// How `popbridge migrate` logs in as a user on one side.
#[derive(Clone)]
pub enum Credential {
    /// The user's own password.
    Password(String),
    /// The backend's master user: SASL PLAIN with the user as authorization identity.
    Master { user: String, password: String },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Password(_) => f.write_str("Password(***)"),
            Credential::Master { user, .. } => write!(f, "Master({user}, ***)"),
        }
    }
}

/// Why a `migrate` job (or one user of a wave) stopped. The message names what failed and
/// includes the underlying error's; [`std::error::Error::source`] gives that error itself.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Bad arguments or configuration, in the operator's words.
    #[error("{0}")]
    Usage(String),
    #[error("routing: {0}")]
    Routing(#[source] RoutingError),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every bad line of an import file, each naming `file:line`.
    #[error("{}", .0.join("\n"))]
    ImportFile(Vec<String>),
    #[error("{0}")]
    UidlFormat(#[source] UidlFormatError),
    #[error("legacy POP3: {0}")]
    Pop3(#[from] Pop3Error),
    /// The legacy POP3 server refused the connection or the login for now (connection
    /// refused or reset, `-ERR [SYS/TEMP]`, `[IN-USE]`, `[LOGIN-DELAY]`): the wave slows down
    /// and tries the user again.
    #[error("legacy POP3 busy: {0}")]
    Pop3Busy(#[source] Pop3Error),
    #[error("legacy POP3 backend: {0}")]
    Setup(#[from] SetupError),
    #[error("new store: {0}")]
    Store(#[from] StoreError),
    #[error("UIDL map: {0}")]
    Map(#[from] MapError),
    /// Writing the map to the local state failed.
    #[error("state: {0}")]
    State(#[source] sled::Error),
    #[error("state: the map could be stored nowhere: the local state is in use and METADATA is not available (or migration.shared_map = \"none\")")]
    NowhereToStore,
    #[error("state: the local state is in use and migration.shared_map = \"none\": the UIDL map cannot be read")]
    NoMapToRead,
    /// popbridge's own view (`verify`) could not be set up.
    #[error("popbridge view: {0}")]
    BridgeSetup(#[source] SetupError),
    /// popbridge's own view (`verify`) failed: login or snapshot.
    #[error("popbridge view: {0}")]
    Bridge(#[source] MaildropError),
    /// popbridge's own view (`verify`) could not deliver a message.
    #[error("popbridge view: UID {uid}: {source}")]
    BridgeFetch {
        uid: u32,
        #[source]
        source: MaildropError,
    },
}

impl MigrateError {
    /// A backend throttled or refused the connection for now: worth trying the user again
    /// after a pause, rather than failing them.
    pub fn throttled(&self) -> bool {
        match self {
            MigrateError::Pop3Busy(_) | MigrateError::Store(StoreError::Busy(_)) => true,
            MigrateError::Bridge(e) => {
                matches!(e, MaildropError::Unavailable { .. } | MaildropError::InUse)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    /// The message names what failed, with the cause's words; the cause stays reachable.
    #[test]
    fn errors_keep_their_source() {
        let e = MigrateError::BridgeFetch {
            uid: 7,
            source: MaildropError::unavailable("timeout"),
        };
        assert_eq!(
            e.to_string(),
            "popbridge view: UID 7: upstream unavailable: timeout"
        );
        let source = e.source().and_then(|s| s.downcast_ref::<MaildropError>());
        assert_eq!(source, Some(&MaildropError::unavailable("timeout")));
        let e = MigrateError::Store(StoreError::Mailbox("bad name".into()));
        assert_eq!(e.to_string(), "new store: IMAP setup: bad name");
        assert!(e.source().is_some_and(|s| s.is::<StoreError>()));
    }
}
