//! popbridge: POP3 clients served from an upstream IMAP mailbox.
//!
//! The way a byte travels: client socket → [`pop3::command`] (frame and parse a line) →
//! [`pop3::session`] (the sans-I/O state machine decides) → [`pop3::connection`] (the tokio
//! driver performs the action: login, RETR and TOP in its own files)
//! → a [`maildrop::Maildrop`] ([`maildrop::imap`]: snapshot, retrieval, commit) →
//! [`upstream`] (the IMAP connection, streamed FETCH) → back through [`pop3::response`]
//! (status lines, streaming dot-stuffer) → client socket. docs/architecture.md draws the
//! layers; tests/architecture.rs keeps them true.
//!
//! | layer | modules |
//! |---|---|
//! | core (sans-I/O) | [`pop3`] (command, session, response), [`uidl`], [`maildrop`] (the contract), [`routing`], [`limits`], [`metrics`], [`proxy_protocol`], [`live`], [`errors`] |
//! | upstream | [`upstream`] (endpoints, transports, reader, IMAP, POP3 client), [`state`] (the sled cache), [`client_tls`] |
//! | config | [`config`]: each subsystem's settings, validated at start-up |
//! | maildrops | [`maildrop::imap`]: the IMAP-backed maildrop |
//! | drivers | [`pop3::connection`] and its parts, [`pop3::relay`], [`migrate`] |
//! | server | [`server`] (listeners, reload, stop), [`backends`] (routing to backends), [`http`] |
#![forbid(unsafe_code)]

pub mod backends;
pub mod client_tls;
pub mod config;
pub mod errors;
pub mod http;
pub mod limits;
pub mod live;
pub mod maildrop;
pub mod metrics;
pub mod migrate;
pub mod password_file;
pub mod pop3;
pub mod proxy_protocol;
pub mod routing;
pub mod server;
pub mod state;
pub mod uidl;
pub mod upstream;
