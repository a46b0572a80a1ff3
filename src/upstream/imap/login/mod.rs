//! How popbridge proves who it logs in as. One file per mechanism: [`password`] (IMAP `LOGIN`),
//! [`plain`] (SASL PLAIN, also the master-user form with the user as authorization identity),
//! [`xoauth2`] and [`oauthbearer`] (OAuth 2.0 bearer tokens, RFC 7628 and Google's/Microsoft's
//! XOAUTH2).
//! A mechanism only builds the command; [`super::session::open`] runs it, with SASL-IR when
//! the server offers it and the two-step form (the response after the server's `+`) when not.

pub mod oauthbearer;
pub mod password;
pub mod plain;
pub mod xoauth2;

use imap_next::imap_types::command::CommandBody;

use crate::upstream::credentials::Unsendable;

/// The first command of a login, and what to answer the server's continuation request with.
pub struct LoginCommand {
    pub command: CommandBody<'static>,
    /// The SASL response owed after `+` (two-step AUTHENTICATE), if any.
    pub continuation: Option<Vec<u8>>,
    /// What to answer an error challenge with (RFC 7628 3.2.3: the server sends its JSON
    /// status as a challenge and waits for the client before it says NO).
    pub after_error: Option<Vec<u8>>,
}

impl LoginCommand {
    /// A SASL mechanism's first message: as the initial response when the server takes one
    /// (`sasl_ir`), otherwise after the server's `+`.
    pub fn sasl(
        mechanism: imap_next::imap_types::auth::AuthMechanism<'static>,
        message: Vec<u8>,
        sasl_ir: bool,
        after_error: Option<Vec<u8>>,
    ) -> LoginCommand {
        use imap_next::imap_types::secret::Secret;
        use std::borrow::Cow;
        let (initial_response, continuation) = if sasl_ir {
            (Some(Secret::new(Cow::Owned(message))), None)
        } else {
            (None, Some(message))
        };
        LoginCommand {
            command: CommandBody::Authenticate {
                mechanism,
                initial_response,
            },
            continuation,
            after_error,
        }
    }
}

/// A login mechanism. Credentials are checked (CR, LF, NUL) before anything is built.
pub trait Mechanism: Send + Sync {
    /// Its name in logs and metrics (`LOGIN`, `PLAIN`, ...).
    fn name(&self) -> &'static str;

    /// The login command; `sasl_ir`: the server takes an initial response (RFC 4959).
    fn command(&self, sasl_ir: bool) -> Result<LoginCommand, Unsendable>;
}
