//! What popbridge sends as a user name or password, checked in one place before any byte of it
//! goes to a server, and the secrets operators keep in files.

use std::path::Path;

/// A credential that cannot be sent: CR or LF would end the command line (a second command
/// smuggled into IMAP LOGIN or POP3 USER/PASS), NUL would shift the parts of a SASL message
/// (another identity, or a password cut short).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {what} {why}")]
pub struct Unsendable {
    pub what: &'static str,
    pub why: &'static str,
}

impl Unsendable {
    pub const LINE_BREAK_OR_NUL: &'static str = "contains CR, LF or NUL and cannot be sent";

    /// `what` is empty where it must not be.
    pub fn empty(what: &'static str) -> Unsendable {
        Unsendable {
            what,
            why: "is empty",
        }
    }
}

/// `s`, if it can be sent as the `what` (a user name, a password, ...).
pub fn check<'a>(what: &'static str, s: &'a str) -> Result<&'a str, Unsendable> {
    if s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(Unsendable {
            what,
            why: Unsendable::LINE_BREAK_OR_NUL,
        });
    }
    Ok(s)
}

/// A bearer token as RFC 6750 defines it (`b64token`: letters, digits, `-._~+/`, then `=`s):
/// nothing else may go into an `auth=Bearer` field (a `\x01` would end it and forge another).
pub fn check_token(token: &str) -> Result<&str, Unsendable> {
    let body = token.trim_end_matches('=');
    let ok = !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if !ok {
        return Err(Unsendable {
            what: "access token",
            why: "is not an RFC 6750 bearer token",
        });
    }
    Ok(token)
}

/// A user name for a SASL OAuth message: [`check`], and no `\x01` (the field separator of
/// XOAUTH2 and OAUTHBEARER) or `,` (OAUTHBEARER's header separator, escaped there).
pub fn check_oauth_user(user: &str) -> Result<&str, Unsendable> {
    check("user name", user)?;
    if user.is_empty() || user.contains('\x01') {
        return Err(Unsendable {
            what: "user name",
            why: "is empty or contains \\x01",
        });
    }
    Ok(user)
}

/// The SASL PLAIN message `authzid NUL authcid NUL password` (RFC 4616); an empty `authzid`
/// logs in as `authcid` itself, another one is a master user acting for that user.
pub fn sasl_plain(authzid: &str, authcid: &str, password: &str) -> Result<Vec<u8>, Unsendable> {
    check("authorization identity", authzid)?;
    check("user name", authcid)?;
    check("password", password)?;
    let mut out = Vec::with_capacity(authzid.len() + authcid.len() + password.len() + 2);
    out.extend_from_slice(authzid.as_bytes());
    out.push(0);
    out.extend_from_slice(authcid.as_bytes());
    out.push(0);
    out.extend_from_slice(password.as_bytes());
    Ok(out)
}

/// The first line of a secret file (a master user's password), without its line ending.
pub fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(line.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_and_nul_are_refused_everywhere() {
        for bad in ["a\r\nDELE 1", "a\nb", "a\rb", "a\0b"] {
            assert_eq!(check("password", bad).unwrap_err().what, "password");
            assert!(sasl_plain(bad, "u", "p").is_err());
            assert!(sasl_plain("", bad, "p").is_err());
            assert!(sasl_plain("", "u", bad).is_err());
        }
        assert_eq!(sasl_plain("", "bob", "pw").unwrap(), b"\0bob\0pw");
        assert_eq!(sasl_plain("bob", "admin", "s").unwrap(), b"bob\0admin\0s");
        assert!(check_token("ya29.a0Af-_~+/x==").is_ok());
        for bad in ["", "==", "a b", "a\x01auth=x", "tok\r\n", "t\u{e9}"] {
            assert!(check_token(bad).is_err(), "{bad:?}");
        }
        assert!(check_oauth_user("bob@example.com").is_ok());
        assert!(check_oauth_user("bob\x01x").is_err());
        let e = check("user name", "x\0").unwrap_err();
        assert!(e.to_string().contains("CR, LF or NUL"), "{e}");
    }
}
