//! popbridge: POP3 clients served from an upstream IMAP mailbox.
//!
//! The way a byte travels: client socket → [`pop3::command`] (frame and parse a line) →
//! [`pop3::session`] (the sans-I/O state machine decides) → [`pop3::connection`] (performs the
//! action against a [`maildrop::Maildrop`]) → [`imap`] (upstream) → back through
//! [`pop3::response`] (status lines, streaming dot-stuffer) → client socket.
//!
//! | module | job |
//! |---|---|
//! | [`config`] | TOML schema and start-up validation |
//! | [`server`] | listener, accept loop, graceful stop |
//! | [`pop3`] | the POP3 protocol: parser, session state machine, responses, tokio driver |
//! | [`maildrop`] | the contract between a POP3 session and its store (+ an in-memory store) |
//! | [`imap`] | upstream IMAP: connection driver, TLS, the IMAP-backed maildrop |
//! | [`uidl`] | Dovecot-compatible UIDL format strings |
//! | [`state`] | the sled cache (sizes, UIDVALIDITY, migrated UIDL maps) |
//! | [`migrate`] | legacy UIDL maps, `popbridge migrate` (uidls, import, verify) |
//! | [`metrics`] | Prometheus metrics (one process-wide registry) |
//! | [`http`] | `/metrics`, `/healthz`, `/readyz` over hyper |
//! | [`routing`] | which backend serves which login (sans-I/O) |
//! | [`backends`] | the routed upstream: IMAP backends, legacy POP3 passthrough, master login |

pub mod backends;
pub mod client_tls;
pub mod config;
pub mod http;
pub mod limits;
pub mod live;
pub mod maildrop;
pub mod metrics;
pub mod migrate;
pub mod pop3;
pub mod proxy_protocol;
pub mod routing;
pub mod server;
pub mod state;
pub mod uidl;
pub mod upstream;
