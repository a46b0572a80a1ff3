//! `AUTHENTICATE OAUTHBEARER` (RFC 7628): the GS2 header naming the user, then
//! `\x01`-separated key/value pairs (the server's host and port, the bearer token). On failure
//! the server sends its JSON status as a challenge; the client answers `\x01` (RFC 7628 3.2.3).

use imap_next::imap_types::auth::AuthMechanism;

use super::{LoginCommand, Mechanism};
use crate::upstream::credentials::{self, Unsendable};

pub struct OAuthBearer<'a> {
    pub user: &'a str,
    pub token: &'a str,
    /// The server's name and port as the client reached it (RFC 7628 3.1: `host`, `port`).
    pub host: &'a str,
    pub port: u16,
}

impl Mechanism for OAuthBearer<'_> {
    fn name(&self) -> &'static str {
        "OAUTHBEARER"
    }

    fn command(&self, sasl_ir: bool) -> Result<LoginCommand, Unsendable> {
        let user = credentials::check_oauth_user(self.user)?;
        let token = credentials::check_token(self.token)?;
        // RFC 5801 saslname: `,` and `=` are escaped as `=2C` and `=3D`.
        let authzid = user.replace('=', "=3D").replace(',', "=2C");
        let message = format!(
            "n,a={authzid},\x01host={}\x01port={}\x01auth=Bearer {token}\x01\x01",
            self.host, self.port
        )
        .into_bytes();
        Ok(LoginCommand::sasl(
            AuthMechanism::OAuthBearer,
            message,
            sasl_ir,
            Some(b"\x01".to_vec()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gs2_header_escapes_and_pairs() {
        let m = OAuthBearer {
            user: "a,b=c@example.com",
            token: "vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==",
            host: "imap.example.com",
            port: 993,
        };
        let c = m.command(true).unwrap();
        assert!(c.continuation.is_none());
        assert_eq!(c.after_error.as_deref(), Some(&b"\x01"[..]));
        let c = m.command(false).unwrap();
        assert_eq!(
            c.continuation.as_deref(),
            Some(
                &b"n,a=a=2Cb=3Dc@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==\x01\x01"[..]
            )
        );
    }
}
