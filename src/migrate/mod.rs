//! Moving POP3 users from a legacy POP3 server to an IMAP store without any client noticing:
//! `popbridge migrate` (matching legacy messages to IMAP messages, storing the legacy UIDL map,
//! [`crate::uidl::map`], and verifying what a user would see).

pub mod matcher;

pub mod store;

/// How `popbridge migrate` logs in as a user on one side.
#[derive(Clone)]
pub enum Credential {
    /// The user's own password.
    Password(String),
    /// The backend's master user: SASL PLAIN with the user as authorization identity.
    Master { user: String, password: String },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Password(_) => f.write_str("Password(***)"),
            Credential::Master { user, .. } => write!(f, "Master({user}, ***)"),
        }
    }
}
pub mod run;
