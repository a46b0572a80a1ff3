//! IMAP `LOGIN user password` (RFC 3501 6.2.3): the client's own credentials.

use imap_next::imap_types::command::CommandBody;

use super::{LoginCommand, Mechanism};
use crate::upstream::credentials::{self, Unsendable};

pub struct Password<'a> {
    pub user: &'a str,
    pub password: &'a str,
}

impl Mechanism for Password<'_> {
    fn name(&self) -> &'static str {
        "LOGIN"
    }

    fn command(&self, _sasl_ir: bool) -> Result<LoginCommand, Unsendable> {
        let user = credentials::check("user name", self.user)?;
        let password = credentials::check("password", self.password)?;
        // imap-types refuses what no string form can carry (an empty user name is fine).
        let command =
            CommandBody::login(user.to_owned(), password.to_owned()).map_err(|_| Unsendable {
                what: "user name or password",
                why: "cannot be sent in an IMAP LOGIN",
            })?;
        Ok(LoginCommand {
            command,
            continuation: None,
            after_error: None,
        })
    }
}
