//! The client's address as popbridge trusts it (the TCP peer, or what a trusted PROXY header
//! said), handed to the upstream so its own penalties, limits and logs see the real client:
//! IMAP `ID` (RFC 2971) with Dovecot's `x-originating-ip` family, POP3 `XCLIENT`. Only for
//! backends with `forward_client_address = true`, and only to servers that offer it.
//!
//! The server layer runs each POP3 session inside [`scope`]; the login code reads it with
//! [`current`] (a task-local value: it follows the session's task, never another session's).

use std::future::Future;
use std::net::SocketAddr;

/// Who is on the other end of a POP3 session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAddress {
    /// The client, as popbridge trusts it (after the PROXY protocol, if any).
    pub client: SocketAddr,
    /// The address the client reached popbridge on.
    pub local: SocketAddr,
    /// popbridge's id of the session (its log lines carry it too).
    pub session: String,
}

tokio::task_local! {
    static CLIENT: ClientAddress;
}

/// Runs `f` (a POP3 session) with `address` as its client.
pub async fn scope<F: Future>(address: ClientAddress, f: F) -> F::Output {
    CLIENT.scope(address, f).await
}

/// The client of the session running this code, if it runs inside [`scope`].
pub fn current() -> Option<ClientAddress> {
    CLIENT.try_with(Clone::clone).ok()
}

impl ClientAddress {
    /// The RFC 2971 ID fields Dovecot applies from trusted networks (`login_trusted_networks`).
    pub fn id_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("x-originating-ip", self.client.ip().to_string()),
            ("x-originating-port", self.client.port().to_string()),
            ("x-connected-ip", self.local.ip().to_string()),
            ("x-connected-port", self.local.port().to_string()),
            ("x-session-id", self.session.clone()),
        ]
    }

    /// The `XCLIENT` command line (Dovecot's POP3, Postfix-style attributes), without CRLF.
    pub fn xclient_line(&self) -> String {
        format!(
            "XCLIENT ADDR={} PORT={} SESSION={}",
            self.client.ip(),
            self.client.port(),
            self.session
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClientAddress {
        ClientAddress {
            client: "[2001:db8::7]:51000".parse().unwrap(),
            local: "192.0.2.1:110".parse().unwrap(),
            session: "pb1a2b-7".into(),
        }
    }

    #[tokio::test]
    async fn current_is_the_scopes_and_none_outside() {
        assert_eq!(current(), None);
        let seen = scope(sample(), async { current() }).await;
        assert_eq!(seen, Some(sample()));
        assert_eq!(current(), None);
    }

    #[test]
    fn id_fields_and_xclient() {
        let a = sample();
        assert_eq!(
            a.id_fields(),
            vec![
                ("x-originating-ip", "2001:db8::7".to_owned()),
                ("x-originating-port", "51000".to_owned()),
                ("x-connected-ip", "192.0.2.1".to_owned()),
                ("x-connected-port", "110".to_owned()),
                ("x-session-id", "pb1a2b-7".to_owned()),
            ]
        );
        assert_eq!(
            a.xclient_line(),
            "XCLIENT ADDR=2001:db8::7 PORT=51000 SESSION=pb1a2b-7"
        );
    }
}
