//! Where an upstream server is and how to reach it: the settings `[imap]`, IMAP backends and
//! POP3 backends share ([`EndpointSettings`], validated in one place) and what they build
//! ([`Endpoint`]: the address, the TLS connector, the deadlines).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::tls::{self, TlsSetupError};

/// How the connection to a server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Implicit TLS from the first byte (IMAPS 993, POP3S 995).
    Tls,
    /// A plain connection upgraded before login (IMAP STARTTLS, POP3 STLS); refused if the
    /// server lacks it.
    Starttls,
    /// No encryption: only for loopback or a trusted private network.
    None,
}

/// The protocol spoken with a server: its default ports and its STARTTLS dialogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Imap,
    Pop3,
}

impl Protocol {
    pub fn default_port(self, security: Security) -> u16 {
        match (self, security) {
            (Protocol::Imap, Security::Tls) => 993,
            (Protocol::Imap, _) => 143,
            (Protocol::Pop3, Security::Tls) => 995,
            (Protocol::Pop3, _) => 110,
        }
    }
}

/// The keys every upstream server section has (`[imap]`, `[backends.X]` of either kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSettings {
    pub host: String,
    /// Defaults to the protocol's port for the security (993/143, 995/110).
    pub port: Option<u16>,
    pub security: Security,
    /// Extra trust anchor (PEM) besides the system roots; verification is always on.
    pub ca_file: Option<PathBuf>,
    /// Name checked against the server certificate; defaults to `host`.
    pub tls_server_name: Option<String>,
    pub connect_timeout_secs: u64,
    /// Deadline for the greeting and each read or write after it.
    pub command_timeout_secs: u64,
    /// Tell the server who the client is (IMAP ID, POP3 XCLIENT), when it offers that.
    pub forward_client_address: bool,
}

impl EndpointSettings {
    pub fn port(&self, protocol: Protocol) -> u16 {
        self.port
            .unwrap_or_else(|| protocol.default_port(self.security))
    }

    /// What is wrong, if anything: the key at fault (relative to the section) and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.host.trim().is_empty() {
            return Err(("host", "must not be empty".into()));
        }
        if self.port == Some(0) {
            return Err(("port", "must be 1-65535".into()));
        }
        if self.connect_timeout_secs == 0 {
            return Err(("connect_timeout_secs", "must be at least 1".into()));
        }
        if self.command_timeout_secs == 0 {
            return Err(("command_timeout_secs", "must be at least 1".into()));
        }
        if let Some(ca) = &self.ca_file {
            if self.security == Security::None {
                return Err((
                    "ca_file",
                    "is set but security = \"none\" never uses TLS".into(),
                ));
            }
            tls::load_ca_file(ca).map_err(|e| ("ca_file", e.to_string()))?;
        }
        if let Some(name) = &self.tls_server_name {
            if ServerName::try_from(name.as_str()).is_err() {
                return Err((
                    "tls_server_name",
                    format!("{name:?} is not a valid DNS name or IP address"),
                ));
            }
        }
        Ok(())
    }
}

/// Why an endpoint could not be set up from valid-looking settings.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("tls_server_name / host {0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("master_password_file: {0}")]
    Secret(String),
    #[error("oauth: {0}")]
    OAuth(String),
    #[error(
        "keep_alive_secs: the system's random source failed (for the kept connections' key salt)"
    )]
    Random,
}

/// A server ready to be connected to (see `transport`): shared by every connection to it.
#[derive(Clone)]
pub struct Endpoint {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub(super) tls: Option<(TlsConnector, ServerName<'static>)>,
    pub connect_timeout: Duration,
    /// Deadline for each read and each write; a server silent for longer is dead.
    pub io_timeout: Duration,
    /// Tell the server who the client is before login (see [`super::client_address`]).
    pub forward_client_address: bool,
}

impl Endpoint {
    /// Builds the TLS connector (system roots plus `ca_file`) when the security needs one.
    pub fn new(protocol: Protocol, s: &EndpointSettings) -> Result<Endpoint, SetupError> {
        let tls = match s.security {
            Security::None => None,
            Security::Tls | Security::Starttls => {
                let config = tls::client_config(s.ca_file.as_deref())?;
                let name = s.tls_server_name.as_deref().unwrap_or(&s.host);
                let name = ServerName::try_from(name.to_owned())
                    .map_err(|_| SetupError::ServerName(name.to_owned()))?;
                Some((TlsConnector::from(config), name))
            }
        };
        Ok(Endpoint {
            protocol,
            host: s.host.clone(),
            port: s.port(protocol),
            security: s.security,
            tls,
            connect_timeout: Duration::from_secs(s.connect_timeout_secs),
            io_timeout: Duration::from_secs(s.command_timeout_secs),
            forward_client_address: s.forward_client_address,
        })
    }

    /// `host:port`, the host lower-cased: the server's identity, whatever backend name or
    /// route reaches it.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host.to_lowercase(), self.port)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("address", &self.address())
            .field("security", &self.security)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EndpointSettings {
        EndpointSettings {
            host: "mail.example".into(),
            port: None,
            security: Security::Tls,
            ca_file: None,
            tls_server_name: None,
            connect_timeout_secs: 10,
            command_timeout_secs: 60,
            forward_client_address: false,
        }
    }

    #[test]
    fn default_ports_follow_protocol_and_security() {
        let mut s = settings();
        assert_eq!(s.port(Protocol::Imap), 993);
        assert_eq!(s.port(Protocol::Pop3), 995);
        s.security = Security::Starttls;
        assert_eq!(s.port(Protocol::Imap), 143);
        assert_eq!(s.port(Protocol::Pop3), 110);
        s.port = Some(10143);
        assert_eq!(s.port(Protocol::Pop3), 10143);
    }

    #[test]
    fn validation_names_the_key() {
        let bad = [
            (
                EndpointSettings {
                    host: " ".into(),
                    ..settings()
                },
                "host",
            ),
            (
                EndpointSettings {
                    port: Some(0),
                    ..settings()
                },
                "port",
            ),
            (
                EndpointSettings {
                    connect_timeout_secs: 0,
                    ..settings()
                },
                "connect_timeout_secs",
            ),
            (
                EndpointSettings {
                    command_timeout_secs: 0,
                    ..settings()
                },
                "command_timeout_secs",
            ),
            (
                EndpointSettings {
                    security: Security::None,
                    ca_file: Some("/nonexistent".into()),
                    ..settings()
                },
                "ca_file",
            ),
            (
                EndpointSettings {
                    ca_file: Some("/nonexistent".into()),
                    ..settings()
                },
                "ca_file",
            ),
            (
                EndpointSettings {
                    tls_server_name: Some("bad name!".into()),
                    ..settings()
                },
                "tls_server_name",
            ),
        ];
        for (s, key) in bad {
            assert_eq!(s.validate().unwrap_err().0, key, "{s:?}");
        }
        assert!(settings().validate().is_ok());
    }
}
