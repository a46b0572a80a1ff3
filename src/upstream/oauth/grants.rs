//! Token requests (RFC 6749 and friends), sans-I/O where it can be: the form each grant sends
//! and what its answer means. Client authentication by secret, or by a signed assertion
//! (RFC 7523 `private_key_jwt`); the JWT bearer grant naming a user (RFC 7523 2.1, Google's
//! domain-wide delegation); refresh (RFC 6749 6); the device authorization grant (RFC 8628).

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SecureRandom;
use serde::Deserialize;

use super::http::{Answer, HttpError};

pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const DEVICE_CODE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Every `result` of `popbridge_oauth_token_requests_total`.
pub const RESULTS: [&str; 6] = [
    "ok",
    "invalid_grant",
    "refused",
    "unavailable",
    "malformed",
    "setup",
];

/// Why no token came.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// The endpoint did not answer, or failed (timeout, refused connection, 5xx): try later.
    #[error("token endpoint unavailable: {0}")]
    Unreachable(#[from] HttpError),
    #[error("token endpoint failed with HTTP {0}")]
    Server(u16),
    /// The endpoint refused the grant (`invalid_grant`: revoked or expired; `invalid_client`,
    /// ...). Its `error` code only: never the request.
    #[error("token endpoint refused the grant: {error}")]
    Refused { error: String },
    /// An answer that is not what RFC 6749 5.1 promises.
    #[error("token endpoint answered something unexpected: {0}")]
    Malformed(String),
    /// The client's own material (key file, secret file) cannot be used.
    #[error("OAuth client setup: {0}")]
    Setup(String),
    /// The user has no stored grant, or it cannot be unlocked.
    #[error("no usable grant for this user: {0}")]
    NoGrant(&'static str),
}

impl OAuthError {
    /// Whether the user (or operator) must act: the grant is gone (re-authorize), not the
    /// endpoint (retry later).
    pub fn is_refusal(&self) -> bool {
        matches!(self, OAuthError::Refused { .. } | OAuthError::NoGrant(_))
    }

    /// The `result` label of `popbridge_oauth_token_requests_total` (one of [`RESULTS`]).
    pub fn label(&self) -> &'static str {
        match self {
            OAuthError::Unreachable(_) | OAuthError::Server(_) => "unavailable",
            OAuthError::Refused { error } if error == "invalid_grant" => "invalid_grant",
            OAuthError::Refused { .. } => "refused",
            OAuthError::Malformed(_) => "malformed",
            OAuthError::Setup(_) | OAuthError::NoGrant(_) => "setup",
        }
    }
}

/// A token endpoint's answer (RFC 6749 5.1).
#[derive(Deserialize)]
pub struct TokenAnswer {
    pub access_token: String,
    /// Seconds; absent means unknown (treated as one hour).
    pub expires_in: Option<u64>,
    /// A new refresh token (rotation), when the endpoint issues one.
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for TokenAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAnswer")
            .field("expires_in", &self.expires_in)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
}

/// What a token endpoint's answer means.
pub fn token_answer(a: &Answer) -> Result<TokenAnswer, OAuthError> {
    match a.status {
        200..=299 => serde_json::from_slice::<TokenAnswer>(&a.body)
            .map_err(|e| OAuthError::Malformed(format!("token answer: {e}")))
            .and_then(|t| {
                if t.access_token.is_empty() {
                    Err(OAuthError::Malformed("empty access_token".into()))
                } else {
                    Ok(t)
                }
            }),
        400..=499 => Err(refusal(a)),
        s => Err(OAuthError::Server(s)),
    }
}

/// A 4xx answer's `error` code (RFC 6749 5.2), or the status when there is none.
pub fn refusal(a: &Answer) -> OAuthError {
    let error = serde_json::from_slice::<ErrorAnswer>(&a.body)
        .map(|e| e.error)
        .unwrap_or_else(|_| format!("http_{}", a.status));
    // The code goes into logs and metrics: keep it a short token.
    let error = error
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect();
    OAuthError::Refused { error }
}

/// How the client proves who it is to the token endpoint.
pub enum ClientAuth {
    /// A public client (device flow without a secret): `client_id` only.
    Public,
    Secret(String),
    /// A private key signing `client_assertion`s (RFC 7523 2.2).
    Key {
        key: EncodingKey,
        kid: Option<String>,
    },
}

impl ClientAuth {
    /// Loads the client's secret or key; `None` for both: a public client.
    pub fn load(
        secret_file: Option<&std::path::Path>,
        key_file: Option<&std::path::Path>,
        kid: Option<&str>,
    ) -> Result<ClientAuth, OAuthError> {
        if let Some(f) = key_file {
            let pem = std::fs::read(f)
                .map_err(|e| OAuthError::Setup(format!("cannot read {}: {e}", f.display())))?;
            let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| {
                OAuthError::Setup(format!("{}: not a PEM RSA private key: {e}", f.display()))
            })?;
            return Ok(ClientAuth::Key {
                key,
                kid: kid.map(str::to_owned),
            });
        }
        if let Some(f) = secret_file {
            let secret = crate::upstream::credentials::read_secret(f).map_err(OAuthError::Setup)?;
            return Ok(ClientAuth::Secret(secret));
        }
        Ok(ClientAuth::Public)
    }

    /// The form fields that authenticate `client_id` at `token_url`.
    fn fields(
        &self,
        client_id: &str,
        token_url: &str,
    ) -> Result<Vec<(String, String)>, OAuthError> {
        let mut out = vec![("client_id".to_owned(), client_id.to_owned())];
        match self {
            ClientAuth::Public => {}
            ClientAuth::Secret(s) => out.push(("client_secret".into(), s.clone())),
            ClientAuth::Key { key, kid } => {
                let claims = Claims::new(client_id, client_id, token_url, None);
                out.push(("client_assertion_type".into(), CLIENT_ASSERTION_TYPE.into()));
                out.push((
                    "client_assertion".into(),
                    sign(key, kid.as_deref(), &claims)?,
                ));
            }
        }
        Ok(out)
    }
}

/// The claims of an assertion (RFC 7523 3).
#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

impl<'a> Claims<'a> {
    fn new(iss: &'a str, sub: &'a str, aud: &'a str, scope: Option<&'a str>) -> Claims<'a> {
        let now = unix_now();
        let mut id = [0u8; 16];
        let _ = ring::rand::SystemRandom::new().fill(&mut id);
        Claims {
            iss,
            sub,
            aud,
            iat: now,
            exp: now + 300,
            jti: id.iter().map(|b| format!("{b:02x}")).collect(),
            scope,
        }
    }
}

fn sign(key: &EncodingKey, kid: Option<&str>, claims: &Claims<'_>) -> Result<String, OAuthError> {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key)
        .map_err(|e| OAuthError::Setup(format!("cannot sign the assertion: {e}")))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The form of a token request.
pub enum Grant<'a> {
    ClientCredentials {
        scope: &'a str,
    },
    /// A JWT bearer grant naming `user`, issued by `issuer` (Google: the service account).
    JwtBearer {
        issuer: &'a str,
        user: &'a str,
        scope: &'a str,
    },
    Refresh {
        refresh_token: &'a str,
    },
    Device {
        device_code: &'a str,
    },
}

impl Grant<'_> {
    /// The `grant_type` label of the token-request metric.
    pub fn label(&self) -> &'static str {
        match self {
            Grant::ClientCredentials { .. } => "client_credentials",
            Grant::JwtBearer { .. } => "jwt_bearer",
            Grant::Refresh { .. } => "refresh_token",
            Grant::Device { .. } => "device_code",
        }
    }

    /// The whole form for `client_id` at `token_url`.
    pub fn form(
        &self,
        auth: &ClientAuth,
        client_id: &str,
        token_url: &str,
    ) -> Result<Vec<(String, String)>, OAuthError> {
        let mut form: Vec<(String, String)> = Vec::new();
        match self {
            Grant::ClientCredentials { scope } => {
                form.push(("grant_type".into(), "client_credentials".into()));
                form.push(("scope".into(), (*scope).into()));
                form.extend(auth.fields(client_id, token_url)?);
            }
            Grant::JwtBearer {
                issuer,
                user,
                scope,
            } => {
                let ClientAuth::Key { key, kid } = auth else {
                    return Err(OAuthError::Setup(
                        "the JWT bearer grant needs client_key_file".into(),
                    ));
                };
                let claims = Claims::new(issuer, user, token_url, Some(scope));
                form.push(("grant_type".into(), JWT_BEARER.into()));
                form.push(("assertion".into(), sign(key, kid.as_deref(), &claims)?));
            }
            Grant::Refresh { refresh_token } => {
                form.push(("grant_type".into(), "refresh_token".into()));
                form.push(("refresh_token".into(), (*refresh_token).into()));
                form.extend(auth.fields(client_id, token_url)?);
            }
            Grant::Device { device_code } => {
                form.push(("grant_type".into(), DEVICE_CODE.into()));
                form.push(("device_code".into(), (*device_code).into()));
                form.extend(auth.fields(client_id, token_url)?);
            }
        }
        Ok(form)
    }
}

/// A device authorization answer (RFC 8628 3.2; Google says `verification_url`).
#[derive(Debug, Deserialize)]
pub struct DeviceAnswer {
    pub device_code: String,
    pub user_code: String,
    #[serde(alias = "verification_url")]
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    pub interval: Option<u64>,
}

pub fn device_answer(a: &Answer) -> Result<DeviceAnswer, OAuthError> {
    match a.status {
        200..=299 => serde_json::from_slice(&a.body)
            .map_err(|e| OAuthError::Malformed(format!("device answer: {e}"))),
        400..=499 => Err(refusal(a)),
        s => Err(OAuthError::Server(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn answers_mean_what_rfc_6749_says() {
        let t = token_answer(&answer(200, r#"{"access_token":"at","expires_in":3599,"token_type":"Bearer","refresh_token":"rt2"}"#)).unwrap();
        assert_eq!((t.access_token.as_str(), t.expires_in), ("at", Some(3599)));
        assert_eq!(t.refresh_token.as_deref(), Some("rt2"));
        assert!(!format!("{t:?}").contains("rt2"), "no secret in Debug");
        let e = token_answer(&answer(
            400,
            r#"{"error":"invalid_grant","error_description":"revoked"}"#,
        ))
        .unwrap_err();
        assert_eq!(e.label(), "invalid_grant");
        assert!(e.is_refusal());
        assert!(matches!(
            token_answer(&answer(503, "down")),
            Err(OAuthError::Server(503))
        ));
        assert!(matches!(
            token_answer(&answer(200, "{}")),
            Err(OAuthError::Malformed(_))
        ));
        let e = token_answer(&answer(401, "<html>")).unwrap_err();
        assert!(matches!(e, OAuthError::Refused { ref error } if error == "http_401"));
    }

    #[test]
    fn forms_per_grant() {
        let auth = ClientAuth::Secret("s3cret".into());
        let form = Grant::ClientCredentials { scope: "imap" }
            .form(&auth, "app", "https://t/token")
            .unwrap();
        assert_eq!(
            form,
            [
                ("grant_type", "client_credentials"),
                ("scope", "imap"),
                ("client_id", "app"),
                ("client_secret", "s3cret")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        let form = Grant::Device { device_code: "dc" }
            .form(&ClientAuth::Public, "app", "https://t/token")
            .unwrap();
        assert_eq!(form[0].1, DEVICE_CODE);
        assert_eq!(form.len(), 3);
        assert!(Grant::JwtBearer {
            issuer: "i",
            user: "u",
            scope: "s"
        }
        .form(&auth, "app", "https://t/token")
        .is_err());
    }
}
