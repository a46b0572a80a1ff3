//! SASL in the AUTHORIZATION state (RFC 5034): the mechanisms offered (PLAIN, and with
//! OAuth XOAUTH2 and OAUTHBEARER, RFC 7628) and the client responses they take, decoded into
//! a login; the decoded secret is wiped once parsed.

use base64::Engine as _;

use super::{err, Action, LoginSecret, Password, RespCode, Session};

/// The SASL mechanisms a client may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mechanism {
    Plain,
    XOAuth2,
    OAuthBearer,
}

impl Mechanism {
    pub(super) fn parse(name: &str, oauth: bool) -> Option<Mechanism> {
        match name.to_ascii_uppercase().as_str() {
            "PLAIN" => Some(Mechanism::Plain),
            "XOAUTH2" if oauth => Some(Mechanism::XOAuth2),
            "OAUTHBEARER" if oauth => Some(Mechanism::OAuthBearer),
            _ => None,
        }
    }
}

/// RFC 7628's error challenge for a refused token: the JSON status, base64.
pub(super) const OAUTH_ERROR_CHALLENGE: &[u8] = b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n";

impl Session {
    /// The mechanisms `AUTH` lists and CAPA's `SASL` line names.
    pub(super) fn mechanisms(&self) -> Vec<&'static str> {
        if self.cfg.sasl_oauth {
            vec!["PLAIN", "XOAUTH2", "OAUTHBEARER"]
        } else {
            vec!["PLAIN"]
        }
    }

    /// A client's SASL response (base64; `=` is an empty one) for `mechanism`.
    pub(super) fn sasl_response(&mut self, mechanism: Mechanism, resp: &[u8]) -> Action {
        if mechanism == Mechanism::Plain {
            return self.auth_plain(resp);
        }
        let resp = if resp == b"=" { &b""[..] } else { resp };
        let mut decoded = match base64::engine::general_purpose::STANDARD.decode(resp) {
            Ok(d) => d,
            Err(_) => return self.fail(err(None, "Invalid base64 data in SASL response.")),
        };
        let parsed = match mechanism {
            Mechanism::XOAuth2 => parse_xoauth2(&decoded),
            _ => parse_oauthbearer(&decoded),
        };
        let action = match parsed {
            Err(text) => self.fail(err(Some(RespCode::Auth), text)),
            Ok((user, token)) => {
                let token = Password::new(token.to_owned());
                self.login(user, LoginSecret::Bearer(token))
            }
        };
        decoded.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&mut decoded);
        action
    }

    /// RFC 4616: `authzid \0 authcid \0 passwd`, base64. `=` is an empty response.
    pub(super) fn auth_plain(&mut self, resp: &[u8]) -> Action {
        let resp = if resp == b"=" { &b""[..] } else { resp };
        let mut decoded = match base64::engine::general_purpose::STANDARD.decode(resp) {
            Ok(d) => d,
            Err(_) => return self.fail(err(None, "Invalid base64 data in SASL response.")),
        };
        let result = split_plain(&decoded);
        let action = match result {
            Err(text) => self.fail(err(Some(RespCode::Auth), text)),
            Ok((authzid, authcid, passwd)) => {
                if !authzid.is_empty() && authzid != authcid {
                    self.fail(err(
                        Some(RespCode::Auth),
                        "Authorization identity differs from the login name.",
                    ))
                } else {
                    let user = authcid.to_owned();
                    let password = Password::new(passwd.to_owned());
                    self.login(user, LoginSecret::Password(password))
                }
            }
        };
        decoded.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&mut decoded);
        action
    }
}

fn split_plain(d: &[u8]) -> Result<(&str, &str, &str), &'static str> {
    let mut parts = d.split(|&b| b == 0);
    let (Some(z), Some(c), Some(p), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("Invalid PLAIN response.");
    };
    let s = |b| std::str::from_utf8(b).map_err(|_| "Invalid UTF-8 in PLAIN response.");
    let (z, c, p) = (s(z)?, s(c)?, s(p)?);
    if c.is_empty() || p.is_empty() {
        return Err("Empty login name or password.");
    }
    Ok((z, c, p))
}

/// XOAUTH2's client response: `user=<user>\x01auth=Bearer <token>\x01\x01`.
fn parse_xoauth2(d: &[u8]) -> Result<(String, &str), &'static str> {
    let text = std::str::from_utf8(d).map_err(|_| "Invalid UTF-8 in XOAUTH2 response.")?;
    let (mut user, mut token) = (None, None);
    for field in text.split('\x01').filter(|f| !f.is_empty()) {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u);
        } else if let Some(a) = field.strip_prefix("auth=") {
            token = bearer(a);
        }
    }
    match (user, token) {
        (Some(u), Some(t)) if !u.is_empty() => Ok((u.to_owned(), t)),
        _ => Err("Invalid XOAUTH2 response: it needs user= and auth=Bearer."),
    }
}

/// OAUTHBEARER's client response (RFC 7628 3.1): the GS2 header `n,a=<user>,`, then
/// `\x01`-separated pairs, one of them `auth=Bearer <token>`.
fn parse_oauthbearer(d: &[u8]) -> Result<(String, &str), &'static str> {
    let text = std::str::from_utf8(d).map_err(|_| "Invalid UTF-8 in OAUTHBEARER response.")?;
    let (header, pairs) = text
        .split_once('\x01')
        .ok_or("Invalid OAUTHBEARER response.")?;
    let mut parts = header.splitn(3, ',');
    let (Some(cb), Some(authzid)) = (parts.next(), parts.next()) else {
        return Err("Invalid OAUTHBEARER header.");
    };
    if !matches!(cb, "n" | "y") {
        return Err("OAUTHBEARER channel binding is not supported.");
    }
    let user = authzid
        .strip_prefix("a=")
        .filter(|u| !u.is_empty())
        .ok_or("OAUTHBEARER needs the user in its header (a=).")?;
    let user = user.replace("=2C", ",").replace("=3D", "=");
    let token = pairs
        .split('\x01')
        .find_map(|p| p.strip_prefix("auth=").and_then(bearer))
        .ok_or("Invalid OAUTHBEARER response: no auth=Bearer.")?;
    // The borrowed token lives in `d`; the owned user came out of escapes.
    Ok((user, token))
}

/// The token of an `auth` value `Bearer <token>` (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("Bearer") && !token.is_empty()).then_some(token)
}
