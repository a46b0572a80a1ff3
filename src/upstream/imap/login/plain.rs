//! `AUTHENTICATE PLAIN` (RFC 4616): `authzid NUL authcid NUL password`. With an empty
//! `authzid` the user logs in as itself; with the user as `authzid` and the operator's master
//! user as `authcid` (Dovecot's master passdb, Cyrus's proxy users) the operator logs in for
//! the user.

use imap_next::imap_types::auth::AuthMechanism;

use super::{LoginCommand, Mechanism};
use crate::upstream::credentials::{self, Unsendable};

pub struct Plain<'a> {
    /// Who to act as; `None` for the `authcid` itself.
    pub authzid: Option<&'a str>,
    pub authcid: &'a str,
    pub password: &'a str,
}

impl<'a> Plain<'a> {
    /// The master-user form: `master` (with its password) logs in for `user`.
    pub fn master(user: &'a str, master: &'a str, password: &'a str) -> Plain<'a> {
        Plain {
            authzid: Some(user),
            authcid: master,
            password,
        }
    }
}

impl Mechanism for Plain<'_> {
    fn name(&self) -> &'static str {
        "PLAIN"
    }

    fn command(&self, sasl_ir: bool) -> Result<LoginCommand, Unsendable> {
        // An empty authorization identity would log the master user in as itself.
        if self.authcid.is_empty() || self.authzid == Some("") {
            return Err(Unsendable::empty("user name"));
        }
        let authzid = self.authzid.unwrap_or_default();
        let message = credentials::sasl_plain(authzid, self.authcid, self.password)?;
        Ok(LoginCommand::sasl(
            AuthMechanism::Plain,
            message,
            sasl_ir,
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_form_and_refusals() {
        let m = Plain::master("bob", "admin", "s3cret");
        let c = m.command(true).unwrap();
        assert!(c.continuation.is_none());
        let c = m.command(false).unwrap();
        assert_eq!(c.continuation.as_deref(), Some(&b"bob\0admin\0s3cret"[..]));
        for bad in [
            Plain::master("b\0ob", "admin", "s"),
            Plain::master("bob", "ad\nmin", "s"),
            Plain::master("bob", "admin", "s\r"),
            Plain::master("bob", "", "s"),
            Plain::master("", "admin", "s"),
        ] {
            assert!(bad.command(true).is_err());
        }
    }
}
