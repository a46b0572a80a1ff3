//! POP3 server side: framing and parsing ([`command`]), replies and body encoding
//! ([`response`]), the sans-I/O state machine ([`session`]) and the tokio driver
//! ([`connection`]).

pub mod command;
pub mod connection;
pub mod relay;
pub mod response;
pub mod session;
pub mod stream;

pub use command::{Command, CommandError, LineBuffer, Password, TooLong};
pub use connection::{
    serve, ConnectionLimits, MaildropLock, MaildropLocks, SessionOutcome, Upstream,
};
pub use response::{DotStuffer, RespCode};
pub use session::{Action, Session, SessionConfig};
