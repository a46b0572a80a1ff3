//! How popbridge proves who it logs in as. One file per mechanism: [`password`] (IMAP `LOGIN`),
//! [`plain`] (SASL PLAIN, also the master-user form with the user as authorization identity).
//! A mechanism only builds the command; [`super::session::open`] runs it, with SASL-IR when
//! the server offers it and the two-step form (the response after the server's `+`) when not.

pub mod password;
pub mod plain;

use imap_next::imap_types::command::CommandBody;

use crate::upstream::credentials::Unsendable;

/// The first command of a login, and what to answer the server's continuation request with.
pub struct LoginCommand {
    pub command: CommandBody<'static>,
    /// The SASL response owed after `+` (two-step AUTHENTICATE), if any.
    pub continuation: Option<Vec<u8>>,
}

/// A login mechanism. Credentials are checked (CR, LF, NUL) before anything is built.
pub trait Mechanism: Send + Sync {
    /// Its name in logs and metrics (`LOGIN`, `PLAIN`, ...).
    fn name(&self) -> &'static str;

    /// The login command; `sasl_ir`: the server takes an initial response (RFC 4959).
    fn command(&self, sasl_ir: bool) -> Result<LoginCommand, Unsendable>;
}
