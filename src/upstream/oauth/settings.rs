//! `[imap.oauth]` / `[backends.X.oauth]`: how a backend that takes OAuth 2.0 tokens is logged in
//! to, and where the token comes from. Checked here, so every bad setting is named by its key.

use std::path::PathBuf;

use serde::Deserialize;

/// Where the token a session logs in with comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenSource {
    /// The POP3 client brings it (AUTH XOAUTH2 / OAUTHBEARER); popbridge passes it on.
    Client,
    /// An application credential of the operator's (client credentials, or a JWT bearer grant
    /// naming the user); the POP3 password is checked by `password_file` or
    /// `verify_password_with`.
    App,
    /// The user's own delegated grant: a refresh token from `popbridge oauth authorize`, kept
    /// encrypted with a key derived from the user's POP3 password.
    User,
}

/// The SASL mechanism used upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaslMechanism {
    /// Google's and Microsoft's mechanism.
    #[default]
    Xoauth2,
    /// RFC 7628.
    Oauthbearer,
}

/// Whose endpoints and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Endpoints given by `token_url` (and `device_url`).
    #[default]
    Custom,
    /// Microsoft 365 (Entra ID): needs `tenant`.
    Microsoft,
    /// Google Workspace / Gmail.
    Google,
}

/// How an application token is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppGrant {
    /// RFC 6749 4.4: one token for the application (Microsoft 365's IMAP.AccessAsApp).
    #[default]
    ClientCredentials,
    /// RFC 7523 2.1: a signed assertion naming the user (Google service accounts with
    /// domain-wide delegation); needs `client_key_file`.
    JwtBearer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthSettings {
    pub tokens: TokenSource,
    #[serde(default)]
    pub mechanism: SaslMechanism,
    #[serde(default)]
    pub provider: Provider,
    /// Microsoft 365: the directory (tenant) id or domain.
    pub tenant: Option<String>,
    /// The token endpoint (required for `provider = "custom"`).
    pub token_url: Option<String>,
    /// The device authorization endpoint (RFC 8628), for `popbridge oauth authorize`.
    pub device_url: Option<String>,
    pub client_id: Option<String>,
    /// File holding the client secret (first line).
    pub client_secret_file: Option<PathBuf>,
    /// PEM RSA private key: the client authenticates with a signed assertion (RFC 7523
    /// `private_key_jwt`), or signs the JWT bearer grant.
    pub client_key_file: Option<PathBuf>,
    /// `kid` of that key, when the provider wants one.
    pub client_key_id: Option<String>,
    /// The issuer in JWT bearer grants (Google: the service account's e-mail); defaults to
    /// `client_id`.
    pub client_email: Option<String>,
    #[serde(default)]
    pub grant: AppGrant,
    /// Scopes asked for; defaults to the provider's IMAP scope.
    pub scope: Option<String>,
    /// `tokens = "app"`: a file of `user:hash` lines (argon2id, or bcrypt) checking the POP3
    /// password; reloaded when it changes and on SIGHUP.
    pub password_file: Option<PathBuf>,
    /// `tokens = "user"`: the directory of encrypted refresh tokens.
    pub token_store: Option<PathBuf>,
    /// Deadline for each token-endpoint request.
    #[serde(default = "default_http_timeout")]
    pub http_timeout_secs: u64,
    /// A cached token is renewed this long before it expires (clock skew, slow logins).
    #[serde(default = "default_margin")]
    pub expiry_margin_secs: u64,
}

fn default_http_timeout() -> u64 {
    10
}
fn default_margin() -> u64 {
    60
}

impl OAuthSettings {
    /// The token endpoint: the preset's, or `token_url`.
    pub fn token_url(&self) -> Option<String> {
        match self.provider {
            Provider::Custom => self.token_url.clone(),
            Provider::Microsoft => self.token_url.clone().or_else(|| {
                self.tenant
                    .as_ref()
                    .map(|t| format!("https://login.microsoftonline.com/{t}/oauth2/v2.0/token"))
            }),
            Provider::Google => self
                .token_url
                .clone()
                .or_else(|| Some("https://oauth2.googleapis.com/token".into())),
        }
    }

    /// The device authorization endpoint: the preset's, or `device_url`.
    pub fn device_url(&self) -> Option<String> {
        match self.provider {
            Provider::Custom => self.device_url.clone(),
            Provider::Microsoft => self.device_url.clone().or_else(|| {
                self.tenant.as_ref().map(|t| {
                    format!("https://login.microsoftonline.com/{t}/oauth2/v2.0/devicecode")
                })
            }),
            // Google's device grant does not give the Gmail scope (`tokens = "user"` is refused).
            Provider::Google => self.device_url.clone(),
        }
    }

    /// The scopes asked for: `scope`, or the provider's for this token source.
    pub fn scope(&self) -> String {
        if let Some(s) = &self.scope {
            return s.clone();
        }
        match (self.provider, self.tokens) {
            (Provider::Microsoft, TokenSource::App) => {
                "https://outlook.office365.com/.default".into()
            }
            (Provider::Microsoft, _) => {
                "https://outlook.office.com/IMAP.AccessAsUser.All offline_access".into()
            }
            (Provider::Google, _) => "https://mail.google.com/".into(),
            (Provider::Custom, _) => "imap".into(),
        }
    }

    /// What is wrong, if anything: the key at fault (relative to the `oauth` table) and why.
    /// `verify_password_with` is the server section's own key, given here for `app`.
    pub fn validate(&self, verify_password_with: bool) -> Result<(), (&'static str, String)> {
        if self.provider == Provider::Microsoft && self.tenant.is_none() && self.token_url.is_none()
        {
            return Err(("tenant", "is required with provider = \"microsoft\"".into()));
        }
        if self.http_timeout_secs == 0 {
            return Err(("http_timeout_secs", "must be at least 1".into()));
        }
        for (key, url) in [
            ("token_url", &self.token_url),
            ("device_url", &self.device_url),
        ] {
            if let Some(u) = url {
                check_url(u).map_err(|e| (key, e))?;
            }
        }
        let needs_endpoint = self.tokens != TokenSource::Client;
        if needs_endpoint {
            if self.token_url().is_none() {
                return Err((
                    "token_url",
                    "is required with provider = \"custom\" unless tokens = \"client\"".into(),
                ));
            }
            if self.client_id.as_deref().unwrap_or("").is_empty() {
                return Err(("client_id", "is required unless tokens = \"client\"".into()));
            }
        }
        for (key, file) in [
            ("client_secret_file", &self.client_secret_file),
            ("client_key_file", &self.client_key_file),
            ("password_file", &self.password_file),
        ] {
            if let Some(f) = file {
                std::fs::metadata(f)
                    .map_err(|e| (key, format!("cannot read {}: {e}", f.display())))?;
            }
        }
        match self.tokens {
            TokenSource::Client => {
                if self.password_file.is_some() || self.token_store.is_some() {
                    return Err((
                        "tokens",
                        "is \"client\": password_file and token_store do not apply".into(),
                    ));
                }
            }
            TokenSource::App => {
                match (self.password_file.is_some(), verify_password_with) {
                    (false, false) => {
                        return Err((
                            "password_file",
                            "or the section's verify_password_with is required with tokens = \"app\": something must check the POP3 password".into(),
                        ))
                    }
                    (true, true) => {
                        return Err((
                            "password_file",
                            "and verify_password_with both check the password: keep one".into(),
                        ))
                    }
                    _ => {}
                }
                match (self.grant, &self.client_secret_file, &self.client_key_file) {
                    (AppGrant::JwtBearer, _, None) => {
                        return Err((
                            "client_key_file",
                            "is required with grant = \"jwt_bearer\" (the key signs the grant)"
                                .into(),
                        ))
                    }
                    (AppGrant::ClientCredentials, None, None) => {
                        return Err((
                            "client_secret_file",
                            "or client_key_file is required with tokens = \"app\"".into(),
                        ))
                    }
                    (AppGrant::ClientCredentials, Some(_), Some(_)) => {
                        return Err((
                            "client_secret_file",
                            "and client_key_file both authenticate the client: keep one".into(),
                        ))
                    }
                    _ => {}
                }
            }
            TokenSource::User => {
                if self.provider == Provider::Google {
                    return Err((
                        "tokens",
                        "cannot be \"user\" with provider = \"google\": Google's device authorization grant does not allow the Gmail scope; use tokens = \"app\" (a service account with domain-wide delegation) or \"client\"".into(),
                    ));
                }
                if self.token_store.is_none() {
                    return Err((
                        "token_store",
                        "is required with tokens = \"user\" (where the encrypted refresh tokens are)".into(),
                    ));
                }
                if self.password_file.is_some() || verify_password_with {
                    return Err((
                        "tokens",
                        "is \"user\": the POP3 password unlocks the user's refresh token, so password_file and verify_password_with do not apply".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// HTTPS, or plain HTTP to loopback only (tests, a local token service).
pub fn check_url(url: &str) -> Result<(), String> {
    let parts = Url::parse(url)?;
    match parts.scheme {
        "https" => Ok(()),
        "http" if matches!(parts.host, "127.0.0.1" | "localhost" | "::1") => Ok(()),
        "http" => Err(format!(
            "{url:?}: plain http is allowed only to loopback; use https"
        )),
        _ => Err(format!("{url:?}: the scheme must be https")),
    }
}

/// The parts of an `http(s)://host[:port]/path` URL that a token request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url<'a> {
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: &'a str,
}

impl<'a> Url<'a> {
    pub fn parse(url: &'a str) -> Result<Url<'a>, String> {
        let bad = || format!("{url:?} is not an http(s) URL");
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let default_port = match scheme {
            "https" => 443,
            "http" => 80,
            _ => return Err(format!("{url:?}: the scheme must be https")),
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6.split_once(']').ok_or_else(bad)?;
                (h, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        if host.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => default_port,
        };
        Ok(Url {
            scheme,
            host,
            port,
            path: if path.is_empty() { "/" } else { path },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> OAuthSettings {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn presets_and_urls() {
        let m = parse("tokens = \"app\"\nprovider = \"microsoft\"\ntenant = \"contoso.com\"");
        assert_eq!(
            m.token_url().unwrap(),
            "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"
        );
        assert_eq!(m.scope(), "https://outlook.office365.com/.default");
        let g = parse("tokens = \"app\"\nprovider = \"google\"\ngrant = \"jwt_bearer\"");
        assert_eq!(
            g.token_url().unwrap(),
            "https://oauth2.googleapis.com/token"
        );
        assert_eq!(g.scope(), "https://mail.google.com/");
        assert!(check_url("https://id.example/token").is_ok());
        assert!(check_url("http://127.0.0.1:8080/token").is_ok());
        assert!(check_url("http://id.example/token").is_err());
        assert!(check_url("ftp://x/y").is_err());
        assert!(check_url("http://[::1]:9/t").is_ok());
        assert_eq!(
            Url::parse("http://127.0.0.1:8080/token?x=1").unwrap(),
            Url {
                scheme: "http",
                host: "127.0.0.1",
                port: 8080,
                path: "/token?x=1"
            }
        );
        assert_eq!(Url::parse("https://id.example").unwrap().port, 443);
        assert!(Url::parse("https://user@id.example/").is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            ("tokens = \"app\"\nprovider = \"microsoft\"", false, "tenant"),
            ("tokens = \"app\"\nclient_id = \"c\"", false, "token_url"),
            ("tokens = \"app\"\ntoken_url = \"https://t/\"", false, "client_id"),
            ("tokens = \"app\"\ntoken_url = \"http://id.example/t\"\nclient_id = \"c\"", true, "token_url"),
            ("tokens = \"app\"\ntoken_url = \"https://t/\"\nclient_id = \"c\"", false, "password_file"),
            ("tokens = \"app\"\ntoken_url = \"https://t/\"\nclient_id = \"c\"", true, "client_secret_file"),
            ("tokens = \"app\"\ntoken_url = \"https://t/\"\nclient_id = \"c\"\ngrant = \"jwt_bearer\"", true, "client_key_file"),
            ("tokens = \"user\"\ntoken_url = \"https://t/\"\nclient_id = \"c\"", false, "token_store"),
            ("tokens = \"user\"\ntoken_url = \"https://t/\"\nclient_id = \"c\"\ntoken_store = \"/x\"", true, "tokens"),
            ("tokens = \"client\"\ntoken_store = \"/x\"", false, "tokens"),
            ("tokens = \"user\"\nprovider = \"google\"\nclient_id = \"c\"\ntoken_store = \"/x\"", false, "tokens"),
            ("tokens = \"app\"\ntoken_url = \"https://t/\"\nclient_id = \"c\"\nclient_secret_file = \"/nonexistent\"", true, "client_secret_file"),
        ];
        for (text, verify, key) in cases {
            assert_eq!(parse(text).validate(verify).unwrap_err().0, key, "{text}");
        }
        assert!(parse("tokens = \"client\"").validate(false).is_ok());
    }
}
