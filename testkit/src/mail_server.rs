//! The upstream IMAP servers the end-to-end tests run popbridge against, behind one trait.

use crate::clients::{imap_state, ImapState};
use crate::cyrus::Cyrus;
use crate::dovecot::Dovecot;

/// An upstream IMAP server the end-to-end tests can run popbridge against: the private
/// [`Dovecot`] or the private [`Cyrus`]. Tests written against this trait run on both.
pub trait MailServer {
    /// e.g. "dovecot", for messages.
    fn name(&self) -> &'static str;
    /// Plain IMAP on 127.0.0.1.
    fn imap_port(&self) -> u16;
    fn add_user(&self, user: &str, password: &str);
    /// Gives `messages` UIDs in this order, after any seeded before (CRLF line ends: Cyrus
    /// refuses bare LF).
    fn seed(&self, user: &str, messages: &[&[u8]]);
    /// The account as Python's imaplib sees it.
    fn imap_state(&self, user: &str, password: &str, mailbox: &str) -> ImapState {
        imap_state(self.imap_port(), user, password, mailbox)
    }
}

impl MailServer for Dovecot {
    fn name(&self) -> &'static str {
        "dovecot"
    }
    fn imap_port(&self) -> u16 {
        Dovecot::imap_port(self)
    }
    fn add_user(&self, user: &str, password: &str) {
        Dovecot::add_user(self, user, password)
    }
    fn seed(&self, user: &str, messages: &[&[u8]]) {
        Dovecot::seed(self, user, messages)
    }
}

impl MailServer for Cyrus {
    fn name(&self) -> &'static str {
        "cyrus"
    }
    fn imap_port(&self) -> u16 {
        Cyrus::imap_port(self)
    }
    fn add_user(&self, user: &str, password: &str) {
        Cyrus::add_user(self, user, password)
    }
    fn seed(&self, user: &str, messages: &[&[u8]]) {
        Cyrus::seed(self, user, messages)
    }
}
