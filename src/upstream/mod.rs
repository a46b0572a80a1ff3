//! Talking to servers: everything popbridge does on a connection it opens, in one layer that
//! `serve`, the POP3 relay and `migrate` share.
//!
//! | module | job |
//! |---|---|
//! | [`client_address`] | the client's trusted address, forwarded upstream (IMAP ID, POP3 XCLIENT) |
//! | [`endpoint`] | where a server is, how to reach it; the settings every server section shares |
//! | [`tls`] | the rustls client configuration (system roots plus `ca_file`, always verified) |
//! | [`transport`] | TCP, implicit TLS, STARTTLS/STLS |
//! | [`reader`] | bounded, deadline-aware reading: lines, exact counts |
//! | [`credentials`] | what may be sent as a user name or password; secrets from files |
//! | [`imap`] | the IMAP connection, streamed FETCH, session setup and login mechanisms |
//! | [`pop3`] | the POP3 client: login, UIDL/LIST/TOP/RETR, hand-off to the relay |
//! | [`oauth`] | OAuth 2.0 tokens for stores that take only tokens: grants, cache, sealed refresh tokens |

pub mod client_address;
pub mod credentials;
pub mod endpoint;
pub mod imap;
pub mod oauth;
pub mod pop3;
pub mod reader;
pub mod tls;
pub mod transport;

pub use endpoint::{Endpoint, EndpointSettings, Protocol, Security, SetupError};
pub use transport::AsyncStream;
