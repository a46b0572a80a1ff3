//! POP3 server side: framing and parsing ([`command`]), replies and body encoding
//! ([`response`]), the sans-I/O state machine ([`session`]) and the tokio driver
//! ([`connection`]).

pub mod command;
pub mod connection;
pub mod locks;
mod login;
pub mod policy;
pub mod relay;
pub mod response;
mod retrieve;
pub mod routed;
pub mod session;
pub mod stream;

pub use command::{Command, CommandError, LineBuffer, Password, TooLong};
pub use connection::{serve, ConnectionLimits, SessionOutcome};
pub use locks::{MaildropLock, MaildropLocks};
pub use response::{DotStuffer, RespCode};
pub use routed::{Opened, Routed, Unrouted, Upstream};
pub use session::{Action, Reply, Session, SessionConfig};
