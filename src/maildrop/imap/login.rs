//! How a session logs in upstream: the credential it sends (the client's password, a master
//! user's PLAIN, or an OAuth 2.0 token by `oauth.tokens`), the key a kept connection is found
//! under (`keepalive`), and how a refused login reads to the client (RFC 5530 codes, RFC 7628
//! status).

use std::sync::Arc;

use super::{pressure_error, ImapUpstream, Keep};
use crate::maildrop::{Credential, MaildropError};
use crate::upstream::imap::login::{oauthbearer, password, plain, xoauth2, Mechanism};
use crate::upstream::imap::session::{self, SessionError};
use crate::upstream::imap::Completion;
use crate::upstream::oauth::grants::OAuthError;
use crate::upstream::oauth::settings::{SaslMechanism, TokenSource};
use crate::upstream::oauth::{AccessToken, OAuthClient};

impl ImapUpstream {
    /// The token `user` logs in with, by this backend's `oauth.tokens`: the client's own, an
    /// application token (after the password file, if any, accepted the password), or the
    /// user's delegated grant unlocked by the password.
    pub(super) async fn token_for(
        &self,
        oauth: &OAuthClient,
        user: &str,
        credential: Credential<'_>,
    ) -> Result<AccessToken, MaildropError> {
        match (oauth.tokens(), credential) {
            (TokenSource::Client, Credential::Bearer(t)) => Ok(AccessToken::from(t)),
            (TokenSource::Client, Credential::Password(_)) => {
                tracing::info!(user, "this backend takes the client's OAuth token (AUTH XOAUTH2 or OAUTHBEARER), not a password");
                Err(MaildropError::Auth)
            }
            (_, Credential::Bearer(_)) => {
                tracing::info!(
                    user,
                    "this backend takes a password, not the client's token"
                );
                Err(MaildropError::Auth)
            }
            (TokenSource::App, Credential::Password(pw)) => {
                if let Some(f) = &self.password_file {
                    if !f.verify_async(user, pw).await {
                        return Err(MaildropError::Auth);
                    }
                }
                oauth
                    .app_token(user)
                    .await
                    .map_err(|e| oauth_error(user, e))
            }
            (TokenSource::User, Credential::Password(pw)) => oauth
                .user_token(user, pw)
                .await
                .map_err(|e| oauth_error(user, e)),
        }
    }

    /// Logs in with an OAuth token, the user's password or, with a master user,
    /// `AUTHENTICATE PLAIN` with the user as authorization identity (Dovecot's master passdb).
    /// A token of ours the server refuses (revoked, or expired early) is forgotten and the
    /// login tried once more with a new one; a client's own token is not retried.
    pub(super) async fn log_in(
        &self,
        user: &str,
        credential: Credential<'_>,
    ) -> Result<session::Session, MaildropError> {
        let Some(oauth) = &self.oauth else {
            return self.log_in_with(user, credential, None).await;
        };
        let token = self.token_for(oauth, user, credential).await?;
        match self.log_in_with(user, credential, Some(&token)).await {
            Err(MaildropError::Auth) if oauth.tokens() != TokenSource::Client => {
                oauth.forget(user, &token).await;
                let token = self.token_for(oauth, user, credential).await?;
                self.log_in_with(user, credential, Some(&token)).await
            }
            other => other,
        }
    }

    pub(super) async fn log_in_with(
        &self,
        user: &str,
        credential: Credential<'_>,
        token: Option<&AccessToken>,
    ) -> Result<session::Session, MaildropError> {
        let (by_password, by_master, by_xoauth2, by_bearer);
        let mechanism: &dyn Mechanism = match (token, &self.master, credential) {
            (Some(token), ..) => match self.oauth.as_ref().map(|o| o.mechanism()) {
                Some(SaslMechanism::Oauthbearer) => {
                    by_bearer = oauthbearer::OAuthBearer {
                        user,
                        token,
                        host: &self.endpoint.host,
                        port: self.endpoint.port,
                    };
                    &by_bearer
                }
                _ => {
                    by_xoauth2 = xoauth2::XOAuth2 { user, token };
                    &by_xoauth2
                }
            },
            (None, _, Credential::Bearer(_)) => {
                tracing::info!(user, "this backend takes passwords, not OAuth tokens");
                return Err(MaildropError::Auth);
            }
            (None, None, Credential::Password(password)) => {
                by_password = password::Password { user, password };
                &by_password
            }
            (None, Some((master, master_pw)), Credential::Password(_)) => {
                by_master = plain::Plain::master(user, master, master_pw.as_str());
                &by_master
            }
        };
        session::open(&self.endpoint, self.limits, mechanism)
            .await
            .map_err(login_error)
    }

    /// The key a password login of `user` is kept under (see [`keepalive`]), when this
    /// backend keeps connections.
    pub(super) fn keep_key(
        &self,
        user: &str,
        credential: Credential<'_>,
        view: bool,
    ) -> Option<Keep> {
        let pool = self.keep_alive.as_ref()?;
        let Credential::Password(password) = credential else {
            return None;
        };
        if self.oauth.is_some() {
            return None;
        }
        let (form, master): (&[u8], &[u8]) = match &self.master {
            Some((m, _)) => (b"master-plain", m.as_bytes()),
            None => (b"login", b""),
        };
        let endpoint = self.endpoint.address();
        let key = pool.key(&[
            endpoint.as_bytes(),
            form,
            user.as_bytes(),
            password.as_bytes(),
            master,
            self.mailbox.as_bytes(),
            if view { b"view" } else { b"maildrop" },
        ]);
        Some(Keep {
            pool: Arc::clone(pool),
            key,
            capabilities: session::Capabilities::default(),
        })
    }
}

/// Why no token came, as the client is told: a user's grant that is gone or does not open
/// (wrong password) is an authentication failure; the token endpoint failing is the server's.
fn oauth_error(user: &str, e: OAuthError) -> MaildropError {
    match &e {
        OAuthError::NoGrant(why) => {
            tracing::info!(user, reason = why, "no usable OAuth grant for this login");
            if why.contains("password") {
                MaildropError::Auth
            } else {
                MaildropError::Reauthorize
            }
        }
        OAuthError::Refused { error } if error == "invalid_grant" => {
            tracing::warn!(
                user,
                "the user's OAuth grant was revoked or has expired: the user must authorize again"
            );
            MaildropError::Reauthorize
        }
        _ => {
            tracing::warn!(user, error = %e, "no OAuth token");
            MaildropError::unavailable_by("no OAuth token", e)
        }
    }
}

/// A login that did not open a session, as the client is told.
pub(super) fn login_error(e: SessionError) -> MaildropError {
    match e {
        SessionError::Refused { done, challenge } => {
            if let Some(status) = challenge {
                // RFC 7628's JSON status: why the server refused the token (never the token).
                tracing::info!(status = %status, "upstream refused the OAuth token");
            }
            login_failure(&done)
        }
        // Credentials no server could be sent are credentials that cannot be right.
        SessionError::Unsendable(_) => MaildropError::Auth,
        other => MaildropError::unavailable_by("cannot log in", other),
    }
}

/// LOGIN said NO or BAD. RFC 5530 codes tell a temporary server failure or pressure (never
/// answered `[AUTH]`, never charged the login penalty) from bad credentials.
fn login_failure(done: &Completion) -> MaildropError {
    if let Some(e) = pressure_error("upstream login refused", done) {
        return e;
    }
    let code = done.other_code().unwrap_or_default();
    if ["SERVERBUG", "CONTACTADMIN"]
        .iter()
        .any(|c| code.starts_with(c))
    {
        MaildropError::unavailable(format!("upstream login failed: {}", done.text))
    } else if matches!(
        done.code,
        Some(imap_next::imap_types::response::Code::Alert)
    ) {
        // Meant for the user ("log in with a browser", "use an app password"): the user has
        // to act on their credentials, so [AUTH]; the operator sees why.
        tracing::info!(alert = %done.text, "upstream refused the login with an ALERT");
        MaildropError::Auth
    } else if code.starts_with("PRIVACYREQUIRED") {
        MaildropError::Unsupported("upstream requires TLS before login (set imap.security)".into())
    } else {
        MaildropError::Auth
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_next::imap_types::response::{Code, StatusKind};

    #[test]
    fn login_failure_classification() {
        let c = |code: Option<Code<'static>>| Completion {
            kind: StatusKind::No,
            code,
            text: "x".into(),
        };
        assert_eq!(login_failure(&c(None)), MaildropError::Auth);
        let unavailable = Code::Other(imap_next::imap_types::response::CodeOther::unvalidated(
            &b"UNAVAILABLE"[..],
        ));
        assert!(matches!(
            login_failure(&c(Some(unavailable))),
            MaildropError::Busy {
                signal: crate::maildrop::Signal::Unavailable,
                ..
            }
        ));
        assert_eq!(login_failure(&c(Some(Code::Alert))), MaildropError::Auth);
        let throttled = Code::Other(imap_next::imap_types::response::CodeOther::unvalidated(
            &b"THROTTLED"[..],
        ));
        assert!(matches!(
            login_failure(&c(Some(throttled))),
            MaildropError::Busy {
                signal: crate::maildrop::Signal::Throttled,
                ..
            }
        ));
    }
}
