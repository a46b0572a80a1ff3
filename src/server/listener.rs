//! A POP3 listener: the socket (with its backlog), how it treats its clients (TLS, PROXY
//! protocol, limits), and the accept loop with one task per session and the drain at stop.

use super::ServeError;
use crate::config::Config;
use crate::pop3::connection::ConnectionLimits;
use crate::pop3::locks::MaildropLocks;
use crate::pop3::session::SessionConfig;
use crate::uidl::UidlFormat;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::limits::{AuthPenalty, ConnectionLimiter, ConnectionSlot, Rejected};
use crate::live::Live;
use crate::metrics::metrics;
use crate::pop3::connection::{self, ClientPolicy, SessionOutcome};
use crate::pop3::routed::Upstream;
use crate::pop3::stream::ClientStream;
use crate::proxy_protocol;
use crate::upstream::client_address::{self, ClientAddress};
use std::net::SocketAddr;
use tokio_rustls::TlsAcceptor;

use super::LISTENER;

/// What every session of one listener shares.
pub struct Bridge<U> {
    pub upstream: U,
    pub session: Arc<SessionConfig>,
    pub limits: ConnectionLimits,
    pub locks: MaildropLocks,
}

impl<U> Bridge<U> {
    pub fn from_config(
        config: &Config,
        upstream: U,
        locks: MaildropLocks,
    ) -> Result<Self, ServeError> {
        let uidl_format = UidlFormat::parse(&config.pop3.uidl_format)
            .map_err(|e| ServeError::Uidl(e.to_string()))?;
        Ok(Bridge {
            upstream,
            session: Arc::new(SessionConfig {
                uidl_format,
                mark_seen: config.pop3.mark_seen,
                implementation: format!("popbridge {}", env!("CARGO_PKG_VERSION")),
                greeting: "popbridge ready.".into(),
                sasl_oauth: config.takes_client_tokens(),
                policy: config.advertised_policy(),
            }),
            limits: ConnectionLimits {
                idle_timeout: Duration::from_secs(config.pop3.idle_timeout_secs),
                fetch_chunk: config.imap.fetch_chunk_bytes,
            },
            locks,
        })
    }
}

/// A listening socket with an explicit accept backlog. Tokio's default of 128 overflows when
/// hundreds of clients connect at once (a cron-driven fleet, a load balancer failing over),
/// and with SYN cookies an overflowed client believes it is connected and waits forever for a
/// greeting that never comes.
pub(super) fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// How one listening socket treats its clients.
pub struct ListenerSpec {
    /// The `listener` label in metrics and logs: `pop3` or `pop3s`.
    pub name: &'static str,
    /// TLS from the first byte (POP3S).
    pub implicit_tls: Option<TlsAcceptor>,
    /// STLS on offer (plain listener with a certificate).
    pub stls: Option<TlsAcceptor>,
    pub plaintext_always: bool,
    pub plaintext_loopback: bool,
    pub handshake_timeout: Duration,
    pub auth_timeout: Duration,
    pub penalty: Option<Arc<AuthPenalty>>,
    /// Shared by all listeners: connections in total and per client address.
    pub connections: Arc<ConnectionLimiter>,
    /// Connections start with a PROXY protocol header.
    pub proxy: Option<Arc<ProxySettings>>,
}

/// PROXY protocol on one listener.
pub struct ProxySettings {
    pub trusted: Vec<ipnet::IpNet>,
    pub header_timeout: Duration,
}

impl ListenerSpec {
    /// The client's real address: the TCP peer, or what a trusted proxy's PROXY header says.
    /// `None` when the connection must be dropped (untrusted source, bad header).
    async fn client_address(&self, socket: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        let Some(proxy) = &self.proxy else {
            return Some(peer);
        };
        let reject = |reason: &'static str| {
            metrics()
                .connections_rejected
                .with_label_values(&[reason])
                .inc();
        };
        if !proxy.trusted.iter().any(|net| net.contains(&peer.ip())) {
            tracing::warn!(%peer, "PROXY protocol connection from an untrusted address refused");
            reject("untrusted_proxy");
            return None;
        }
        match proxy_protocol::read_header(socket, proxy.header_timeout).await {
            Ok(addr) => {
                let client = addr.unwrap_or(peer);
                tracing::Span::current().record("client", tracing::field::display(client));
                Some(client)
            }
            Err(e) => {
                tracing::info!(%peer, error = %e, "bad PROXY protocol header");
                reject("bad_proxy_header");
                None
            }
        }
    }

    /// Take a connection slot for `client`, or answer that the limit is reached.
    fn admit(&self, socket: &TcpStream, client: SocketAddr) -> Option<ConnectionSlot> {
        match self.connections.try_acquire(client.ip()) {
            Ok(slot) => Some(slot),
            Err(why) => {
                let reason = match why {
                    Rejected::Total => "total",
                    Rejected::PerIp => "per_ip",
                };
                metrics()
                    .connections_rejected
                    .with_label_values(&[reason])
                    .inc();
                tracing::info!(%client, listener = self.name, reason, "connection refused: limit reached");
                // Never blocks: a fresh socket's send buffer is empty. A POP3S client would not
                // understand plaintext, so it is just closed.
                if self.implicit_tls.is_none() {
                    let _ = socket
                        .try_write(b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n");
                }
                None
            }
        }
    }

    /// A plain listener that takes passwords: a trusted network.
    pub fn plain_trusted() -> ListenerSpec {
        ListenerSpec {
            name: LISTENER,
            implicit_tls: None,
            stls: None,
            plaintext_always: true,
            plaintext_loopback: true,
            handshake_timeout: Duration::from_secs(60),
            auth_timeout: Duration::from_secs(60),
            penalty: None,
            connections: ConnectionLimiter::new(usize::MAX, usize::MAX),
            proxy: None,
        }
    }

    fn client_policy(&self, peer: SocketAddr) -> ClientPolicy {
        ClientPolicy {
            stls: self.stls.clone(),
            plaintext_auth: self.plaintext_always
                || (self.plaintext_loopback && peer.ip().is_loopback()),
            handshake_timeout: self.handshake_timeout,
            auth_timeout: self.auth_timeout,
            peer: Some(peer.ip()),
            penalty: self.penalty.clone(),
        }
    }
}

/// Accept POP3 clients on `listener` until `stop` turns true; then wait up to `drain` for the
/// running sessions, and close the rest at once without applying their deletions.
pub async fn run<U: Upstream + 'static>(
    listener: TcpListener,
    spec: Arc<Live<ListenerSpec>>,
    bridge: Arc<Live<Bridge<U>>>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let (kill_tx, kill_rx) = watch::channel(false);
    let mut sessions = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    // The configuration in force when the client connected, for all its session.
                    let spec = spec.get();
                    let bridge = bridge.get();
                    // Small responses must not wait for the client's delayed ACK.
                    if let Err(e) = socket.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "TCP_NODELAY failed");
                    }
                    let kill = kill_rx.clone();
                    let mut killed = kill_rx.clone();
                    next_id += 1;
                    let id = next_id;
                    let span = tracing::info_span!(
                        "session",
                        listener = spec.name,
                        id = next_id,
                        %peer,
                        client = tracing::field::Empty,
                        user = tracing::field::Empty
                    );
                    let session = async move {
                        let m = metrics();
                        let listener = spec.name;
                        // Until the POP3 session runs (a PROXY header or a TLS handshake still
                        // on its way), the kill at the end of a drain simply drops it.
                        let prelude = async {
                            let mut socket = socket;
                            let local = socket.local_addr().ok();
                            let client = spec.client_address(&mut socket, peer).await?;
                            let slot = spec.admit(&socket, client)?;
                            m.sessions_started.with_label_values(&[listener]).inc();
                            let active = Active::new(m.sessions_active.with_label_values(&[listener]));
                            let io = match &spec.implicit_tls {
                                None => Ok(ClientStream::Plain(socket)),
                                Some(acceptor) => {
                                    let handshake = acceptor.accept(socket);
                                    match tokio::time::timeout(spec.handshake_timeout, handshake).await {
                                        Ok(Ok(tls)) => Ok(ClientStream::Tls(Box::new(tls))),
                                        Ok(Err(e)) => {
                                            tracing::info!(error = %e, "TLS handshake failed");
                                            Err(SessionOutcome::ClientGone)
                                        }
                                        Err(_) => Err(SessionOutcome::Timeout),
                                    }
                                }
                            };
                            Some((client, local, slot, active, io))
                        };
                        let started = Instant::now();
                        let prelude = tokio::select! {
                            biased;
                            p = prelude => p,
                            _ = killed.wait_for(|k| *k) => None,
                        };
                        let Some((client, local, _slot, _active, io)) = prelude else {
                            return;
                        };
                        let outcome = match io {
                            Ok(io) => {
                                // From here on the session answers the kill itself.
                                let policy = spec.client_policy(client);
                                let served = connection::serve_client(
                                    io,
                                    &policy,
                                    &bridge.upstream,
                                    &bridge.locks,
                                    &bridge.session,
                                    &bridge.limits,
                                    kill,
                                );
                                // Who the client is, for backends that forward it upstream.
                                match local {
                                    Some(local) => {
                                        let address = ClientAddress {
                                            client,
                                            local,
                                            session: session_id(listener, id),
                                        };
                                        client_address::scope(address, served).await
                                    }
                                    None => served.await,
                                }
                            }
                            Err(o) => o,
                        };
                        m.sessions_ended
                            .with_label_values(&[listener, outcome.label()])
                            .inc();
                        m.session_duration
                            .with_label_values(&[listener])
                            .observe(started.elapsed().as_secs_f64());
                    };
                    sessions.spawn(session.instrument(span));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(drain, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = sessions.len(),
            "drain time over: closing remaining sessions without applying their deletions"
        );
        // Every session ends at once on the kill, whatever it waits for (a client that stopped
        // reading a RETR, an upstream; a QUIT whose commit is under way gets no answer, as
        // when the process is killed). They need only unwind.
        let _ = kill_tx.send(true);
        while sessions.join_next().await.is_some() {}
    }
}

/// `popbridge_sessions_active` of one listener, counted for as long as this lives (however
/// the session's task ends, even dropped mid-handshake by the kill).
struct Active(prometheus::IntGauge);

impl Active {
    fn new(gauge: prometheus::IntGauge) -> Active {
        gauge.inc();
        Active(gauge)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The session id sent upstream with the client's address: the process, the listener and
/// the session's number (as in popbridge's log lines: `id=N`), unique on this host.
fn session_id(listener: &str, id: u64) -> String {
    // The process id once, not a system call per session.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let pid = *PID.get_or_init(std::process::id);
    format!("popbridge-{pid}-{listener}-{id}")
}
