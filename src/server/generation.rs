//! What a configuration builds (a generation: the routed upstream, the bridge and the listener
//! policies for new sessions) and what lives across reloads (the state, the lock table, the
//! limits); which keys only a restart can change.

use std::sync::Arc;
use std::time::Duration;

use crate::backends::RoutedUpstream;
use crate::config::Config;
use crate::config::PlaintextAuth;
use crate::limits::{AuthPenalty, ConnectionLimiter, LoginGate};
use crate::live::Live;
use crate::maildrop::imap::ImapUpstream;
use crate::pop3::locks::MaildropLocks;
use crate::routing::Router;
use crate::state::StateStore;
use tokio_rustls::TlsAcceptor;

use super::listener::{Bridge, ListenerSpec, ProxySettings};
use super::ServeError;

/// What lives for the whole process, across configuration reloads.
pub(super) struct Shared {
    pub(super) state: Arc<StateStore>,
    /// One maildrop lock table for old and new sessions alike.
    pub(super) locks: MaildropLocks,
    pub(super) connections: Arc<ConnectionLimiter>,
    pub(super) penalty: Arc<AuthPenalty>,
    /// LOGIN-DELAY and the backoff after upstream pressure, for every listener.
    pub(super) gate: Arc<LoginGate>,
    pub(super) acceptor: Option<TlsAcceptor>,
}

/// What a configuration builds: the bridge and the listener policies for new sessions.
pub(super) struct Generation {
    pub(super) upstream: Arc<ImapUpstream>,
    pub(super) bridge: Arc<Bridge<Arc<RoutedUpstream>>>,
    pub(super) pop3: Arc<ListenerSpec>,
    pub(super) pop3s: Option<Arc<ListenerSpec>>,
}

impl Generation {
    pub(super) fn build(
        config: &Config,
        shared: &Shared,
        routes: &Arc<Live<Router>>,
    ) -> Result<Generation, ServeError> {
        let routed = Arc::new(
            RoutedUpstream::new(config, Some(shared.state.clone()), routes.clone())?
                .with_gate(shared.gate.clone()),
        );
        let upstream = routed.default_imap();
        let bridge = Arc::new(Bridge::from_config(config, routed, shared.locks.clone())?);
        let proxy = Arc::new(ProxySettings {
            trusted: config.proxy_protocol.trusted_networks.clone(),
            header_timeout: Duration::from_secs(config.proxy_protocol.header_timeout_secs),
        });
        let spec = |name: &'static str, implicit_tls: Option<TlsAcceptor>| {
            Arc::new(ListenerSpec {
                name,
                stls: if implicit_tls.is_some() {
                    None
                } else {
                    shared.acceptor.clone()
                },
                implicit_tls,
                plaintext_always: config.pop3.plaintext_auth == PlaintextAuth::Always,
                plaintext_loopback: config.pop3.plaintext_auth_loopback,
                handshake_timeout: Duration::from_secs(config.pop3.tls_handshake_timeout_secs),
                auth_timeout: Duration::from_secs(config.limits.auth_timeout_secs),
                penalty: Some(shared.penalty.clone()),
                connections: shared.connections.clone(),
                proxy: config
                    .proxy_protocol
                    .listeners
                    .iter()
                    .any(|l| l == name)
                    .then(|| proxy.clone()),
            })
        };
        Ok(Generation {
            upstream,
            bridge,
            pop3: spec("pop3", None),
            pop3s: shared.acceptor.clone().map(|a| spec("pop3s", Some(a))),
        })
    }
}

/// Keys a running process cannot change: sockets, the state directory, certificate paths
/// and the shared limit tables. A reload that changes them keeps the old values and says so.
pub(super) fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.pop3.listen != new.pop3.listen {
        changed.push("pop3.listen");
    }
    if old.pop3.listen_tls != new.pop3.listen_tls {
        changed.push("pop3.listen_tls");
    }
    let paths = |c: &Config| c.pop3.tls.as_ref().map(|t| (t.cert.clone(), t.key.clone()));
    if paths(old) != paths(new) {
        changed.push("pop3.tls");
    }
    if old.metrics.listen != new.metrics.listen {
        changed.push("metrics.listen");
    }
    if old.state.dir != new.state.dir {
        changed.push("state.dir");
    }
    let l = (&old.limits, &new.limits);
    if (l.0.max_connections, l.0.max_connections_per_ip)
        != (l.1.max_connections, l.1.max_connections_per_ip)
        || (
            l.0.auth_penalty_base_ms,
            l.0.auth_penalty_max_secs,
            l.0.auth_penalty_window_secs,
        ) != (
            l.1.auth_penalty_base_ms,
            l.1.auth_penalty_max_secs,
            l.1.auth_penalty_window_secs,
        )
    {
        changed.push("limits (connection caps and login penalty)");
    }
    if (l.0.backoff_base_secs, l.0.backoff_max_secs)
        != (l.1.backoff_base_secs, l.1.backoff_max_secs)
    {
        changed.push("limits.backoff_base_secs, limits.backoff_max_secs");
    }
    changed
}
