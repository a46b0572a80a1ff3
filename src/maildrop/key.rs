//! What "the same mailbox" is: the server that holds it, the login sent there, and the folder.
//! The RFC 1939 lock, the sled cache entries, the decoded legacy UIDL maps and log lines all use
//! [`MaildropKey`], so they always agree, whatever backend name or route led to the mailbox.

use std::fmt;
use std::sync::Arc;

/// Names one maildrop. The server (`host:port`) and the login compare case-insensitively
/// (they are kept lower-cased); folder names are case-sensitive in IMAP (but `INBOX`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MaildropKey {
    server: Arc<str>,
    login: Arc<str>,
    mailbox: Arc<str>,
}

impl MaildropKey {
    /// `server` is the endpoint's `host:port`, `login` the login sent to it.
    pub fn new(server: &str, login: &str, mailbox: &str) -> MaildropKey {
        let mailbox = if mailbox.eq_ignore_ascii_case("INBOX") {
            "INBOX"
        } else {
            mailbox
        };
        MaildropKey {
            server: Arc::from(server.to_lowercase()),
            login: Arc::from(login.to_lowercase()),
            mailbox: Arc::from(mailbox),
        }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// The login sent upstream, lower-cased (for log lines: never a password).
    pub fn login(&self) -> &str {
        &self.login
    }

    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }

    /// The bytes under which the local state keeps this maildrop's entries:
    /// `<server>\n<login>\0<mailbox>` (no host or login holds a line feed, no folder name a
    /// NUL, so two maildrops never share them).
    pub fn state_id(&self) -> Vec<u8> {
        let mut id =
            Vec::with_capacity(self.server.len() + self.login.len() + self.mailbox.len() + 2);
        id.extend_from_slice(self.server.as_bytes());
        id.push(b'\n');
        id.extend_from_slice(self.login.as_bytes());
        id.push(0);
        id.extend_from_slice(self.mailbox.as_bytes());
        id
    }
}

impl fmt::Display for MaildropKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}/{}", self.login, self.server, self.mailbox)
    }
}

impl fmt::Debug for MaildropKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MaildropKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_mailbox_one_key_whatever_the_case() {
        let a = MaildropKey::new("Mail.Example:993", "Bob", "inbox");
        let b = MaildropKey::new("mail.example:993", "bob", "INBOX");
        assert_eq!(a, b);
        assert_eq!(a.state_id(), b.state_id());
        assert_eq!(a.to_string(), "bob at mail.example:993/INBOX");
        // Another folder, server or login is another maildrop.
        for other in [
            MaildropKey::new("mail.example:993", "bob", "Junk"),
            MaildropKey::new("mail.example:143", "bob", "INBOX"),
            MaildropKey::new("mail.example:993", "bobby", "INBOX"),
        ] {
            assert_ne!(a, other);
            assert_ne!(a.state_id(), other.state_id());
        }
        // Folder names other than INBOX keep their case (IMAP compares them exactly).
        assert_ne!(
            MaildropKey::new("s:1", "u", "Junk"),
            MaildropKey::new("s:1", "u", "junk")
        );
    }
}
