//! Moving POP3 users from a legacy POP3 server to an IMAP store without any client noticing:
//! the legacy UIDL map and its storage ([`map`]), and `popbridge migrate` (matching legacy
//! messages to IMAP messages, verifying what a user would see).

pub mod map;
pub mod matcher;
