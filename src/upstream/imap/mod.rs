//! IMAP towards the store: the command engine of one connection ([`engine`]), the connection
//! ([`conn`]) with its streamed FETCH of message bodies ([`fetch`], with the pure parser
//! [`fetch_parse`], and the queue of FETCHes sent ahead, [`prefetch`]),
//! session setup and every login mechanism popbridge uses ([`session`], [`login`]), and
//! METADATA ([`metadata`]), RFC 8474 EMAILIDs ([`objectid`]).

pub mod conn;
pub mod engine;
pub mod fetch;
pub mod fetch_parse;
pub mod login;
pub mod metadata;
pub mod objectid;
pub mod prefetch;
pub mod session;
pub mod uids;

pub use conn::{BodyStart, FetchOrder, ImapConnection};
pub use engine::{Completion, ConnLimits, ImapError, Untagged};
pub use uids::uid_sets;
