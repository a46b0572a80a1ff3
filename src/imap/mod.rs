//! The upstream side: IMAP connections (plain, TLS, STARTTLS) and the maildrop they serve.

pub mod conn;
pub mod fetch_stream;
pub mod legacy;
pub mod maildrop;
pub mod metadata;
pub mod tls;

pub use maildrop::{ImapMaildrop, ImapUpstream, UpstreamSetupError};
