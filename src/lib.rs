//! popbridge: POP3 clients served from an upstream IMAP mailbox.
//!
//! The way a byte travels: client socket → [`pop3::command`] (frame and parse a line) →
//! [`pop3::session`] (the sans-I/O state machine decides) → [`pop3::connection`] (performs the
//! action against a [`maildrop::Maildrop`]) → [`imap`] (upstream) → back through
//! [`pop3::response`] (status lines, streaming dot-stuffer) → client socket.

pub mod maildrop;
