//! `AUTHENTICATE XOAUTH2` (Google's and Microsoft's mechanism): base64 of
//! `user=<user>\x01auth=Bearer <token>\x01\x01`. On failure the server sends its JSON status as
//! a challenge and waits for an empty response before it says NO.

use imap_next::imap_types::auth::AuthMechanism;

use super::{LoginCommand, Mechanism};
use crate::upstream::credentials::{self, Unsendable};

pub struct XOAuth2<'a> {
    pub user: &'a str,
    pub token: &'a str,
}

impl Mechanism for XOAuth2<'_> {
    fn name(&self) -> &'static str {
        "XOAUTH2"
    }

    fn command(&self, sasl_ir: bool) -> Result<LoginCommand, Unsendable> {
        let user = credentials::check_oauth_user(self.user)?;
        let token = credentials::check_token(self.token)?;
        let message = format!("user={user}\x01auth=Bearer {token}\x01\x01").into_bytes();
        Ok(LoginCommand::sasl(
            AuthMechanism::XOAuth2,
            message,
            sasl_ir,
            Some(Vec::new()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_and_refusals() {
        let m = XOAuth2 {
            user: "bob@example.com",
            token: "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg",
        };
        let c = m.command(false).unwrap();
        assert_eq!(
            c.continuation.as_deref(),
            Some(
                &b"user=bob@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"[..]
            )
        );
        assert_eq!(c.after_error.as_deref(), Some(&b""[..]));
        for (user, token) in [
            ("b\x01ob", "tok"),
            ("bob", "to ken"),
            ("", "tok"),
            ("bob", ""),
        ] {
            assert!(
                XOAuth2 { user, token }.command(true).is_err(),
                "{user:?} {token:?}"
            );
        }
    }
}
