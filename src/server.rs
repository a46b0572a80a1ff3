//! The listener: accept loop, one task per POP3 session, and a graceful stop. Takes an already
//! bound listener so tests can bind port 0.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::backends::{BackendError, RoutedUpstream};
use crate::client_tls::{CertError, ReloadableCert};
use crate::config::Config;
use crate::config::PlaintextAuth;
use crate::http::{self, Health};
use crate::limits::{AuthPenalty, ConnectionLimiter, ConnectionSlot, Rejected};
use crate::live::Live;
use crate::maildrop::imap::ImapUpstream;
use crate::metrics::metrics;
use crate::pop3::connection::{self, ClientPolicy, ConnectionLimits, SessionOutcome};
use crate::pop3::locks::MaildropLocks;
use crate::pop3::routed::Upstream;
use crate::pop3::session::SessionConfig;
use crate::pop3::stream::ClientStream;
use crate::proxy_protocol;
use crate::routing::{Router, RoutingError};
use crate::state::{StateError, StateStore};
use crate::uidl::UidlFormat;
use crate::upstream::SetupError;
use std::net::SocketAddr;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Upstream(#[from] SetupError),
    #[error("invalid pop3.uidl_format: {0}")]
    Uidl(String),
    #[error("client TLS: {0}")]
    Cert(#[from] CertError),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("routing: {0}")]
    Routing(#[from] RoutingError),
}

/// The `listener` label of session metrics for the plain POP3 listener.
const LISTENER: &str = "pop3";

/// How often certificate files are checked for a renewal.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// How often the routing file is checked for a change.
const ROUTES_CHECK_INTERVAL: Duration = Duration::from_secs(3);

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
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// What lives for the whole process, across configuration reloads.
struct Shared {
    state: Arc<StateStore>,
    /// One maildrop lock table for old and new sessions alike.
    locks: MaildropLocks,
    connections: Arc<ConnectionLimiter>,
    penalty: Arc<AuthPenalty>,
    acceptor: Option<TlsAcceptor>,
}

/// What a configuration builds: the bridge and the listener policies for new sessions.
struct Generation {
    upstream: Arc<ImapUpstream>,
    bridge: Arc<Bridge<Arc<RoutedUpstream>>>,
    pop3: Arc<ListenerSpec>,
    pop3s: Option<Arc<ListenerSpec>>,
}

impl Generation {
    fn build(
        config: &Config,
        shared: &Shared,
        routes: &Arc<Live<Router>>,
    ) -> Result<Generation, ServeError> {
        let routed = Arc::new(RoutedUpstream::new(
            config,
            Some(shared.state.clone()),
            routes.clone(),
        )?);
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
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
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
    changed
}

/// Run popbridge as configured until SIGINT or SIGTERM; SIGHUP reloads `path`.
pub async fn serve(config: Config, path: PathBuf) -> Result<(), ServeError> {
    let cert = match &config.pop3.tls {
        Some(tls) => {
            let cert = ReloadableCert::load(&tls.cert, &tls.key)?;
            cert.clone().watch(CERT_CHECK_INTERVAL);
            Some(cert)
        }
        None => None,
    };
    let limits = &config.limits;
    let shared = Shared {
        state: Arc::new(StateStore::open(&config.state.dir)?),
        locks: MaildropLocks::default(),
        connections: ConnectionLimiter::new(limits.max_connections, limits.max_connections_per_ip),
        penalty: AuthPenalty::new(
            Duration::from_millis(limits.auth_penalty_base_ms),
            Duration::from_secs(limits.auth_penalty_max_secs),
            Duration::from_secs(limits.auth_penalty_window_secs),
        ),
        acceptor: cert.as_ref().map(|c| c.acceptor()).transpose()?,
    };
    let router = Router::from_config(&config)?;
    let (exact, domains) = router.len();
    tracing::info!(exact, domains, "routing table loaded");
    // The current generation's routing table. Each generation keeps its own (the file watcher
    // updates the current one), so a session never routes by rules newer than its backends.
    let routes: Arc<Live<Live<Router>>> =
        Arc::new(Live::new(Arc::new(Live::new(Arc::new(router)))));
    let routes_basis = Arc::new(Live::new(Arc::new(config.clone())));
    let generation = Generation::build(&config, &shared, &routes.get())?;
    let bridge = Arc::new(Live::new(generation.bridge));
    let (stop_tx, stop_rx) = watch::channel(false);

    let health = Health::new(generation.upstream);
    let metrics_task = match config.metrics.listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            tracing::info!(listen = %addr, "metrics and health endpoint listening");
            Some(tokio::spawn(http::serve(
                listener,
                health.clone(),
                stop_rx.clone(),
            )))
        }
        None => None,
    };

    let routes_task = tokio::spawn(watch_routes(
        routes.clone(),
        routes_basis.clone(),
        ROUTES_CHECK_INTERVAL,
        stop_rx.clone(),
    ));

    let pop3_spec = Arc::new(Live::new(generation.pop3));
    let pop3s_spec = generation.pop3s.map(|s| Arc::new(Live::new(s)));
    let mut listeners = vec![(config.pop3.listen, pop3_spec.clone())];
    if let (Some(addr), Some(spec)) = (config.pop3.listen_tls, &pop3s_spec) {
        listeners.push((addr, spec.clone()));
    }

    let drain = Duration::from_secs(config.pop3.shutdown_drain_secs);
    let mut servers = Vec::new();
    for (addr, spec) in listeners {
        let listener = bind(addr, config.pop3.listen_backlog)
            .map_err(|source| ServeError::Bind { addr, source })?;
        let current = spec.get();
        tracing::info!(
            listener = current.name,
            listen = %listener.local_addr().unwrap_or(addr),
            stls = current.stls.is_some(),
            upstream = %format!("{}:{}", config.imap.host, config.imap.port()),
            mailbox = %config.imap.mailbox,
            deletion = ?config.deletion.mode,
            "popbridge listening"
        );
        servers.push(tokio::spawn(run(
            listener,
            spec,
            bridge.clone(),
            stop_rx.clone(),
            drain,
        )));
    }
    health.listening.store(true, Ordering::Release);

    let mut running = config;
    let reload = |running: &mut Config| {
        let new = match Config::load(&path) {
            Ok(new) => new,
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: configuration not reloaded, keeping the old one");
                return;
            }
        };
        let pinned = restart_only_changes(running, &new);
        if !pinned.is_empty() {
            tracing::warn!(keys = ?pinned, "SIGHUP: these settings only change with a restart; keeping their old values");
        }
        // A bad routing file refuses the whole reload: old routes, old everything.
        // A big routing file takes a moment: let the runtime move other tasks off this thread.
        let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        let build = || Router::from_config(&new);
        let built = if multi_thread {
            tokio::task::block_in_place(build)
        } else {
            build()
        };
        let router = match built {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: configuration not reloaded, keeping the old one and the old routes");
                return;
            }
        };
        let (exact, domains) = router.len();
        let fresh = Arc::new(Live::new(Arc::new(router)));
        match Generation::build(&new, &shared, &fresh) {
            Ok(g) => {
                routes.set(fresh);
                routes_basis.set(Arc::new(new.clone()));
                tracing::info!(exact, domains, "SIGHUP: routing table reloaded");
                bridge.set(g.bridge);
                pop3_spec.set(g.pop3);
                if let (Some(live), Some(spec)) = (&pop3s_spec, g.pop3s) {
                    live.set(spec);
                }
                health.upstream.set(g.upstream);
                tracing::info!(path = %path.display(), "SIGHUP: configuration reloaded; new sessions use it");
                *running = new;
            }
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: configuration not reloaded, keeping the old one");
            }
        }
    };
    wait_for_stop_signal(cert.as_deref(), || reload(&mut running)).await?;
    tracing::info!(drain_secs = drain.as_secs(), "stopping: no new sessions");
    health.listening.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    for server in servers {
        let _ = server.await;
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = routes_task.await;
    shared.state.flush();
    tracing::info!("stopped");
    Ok(())
}

/// When the routing file changes (its modification time, size or inode), rebuild the routing
/// table from it and the configuration in force; a bad file keeps the old table.
async fn watch_routes(
    routes: Arc<Live<Live<Router>>>,
    basis: Arc<Live<Config>>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    type Stamp = Option<(std::time::SystemTime, u64, u64)>;
    fn stamp(path: &std::path::Path) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    }
    let mut last: Option<(PathBuf, Stamp)> = basis
        .get()
        .routing
        .file
        .clone()
        .map(|p| (p.clone(), stamp(&p)));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
        let config = basis.get();
        let Some(path) = config.routing.file.clone() else {
            last = None;
            continue;
        };
        let now = stamp(&path);
        match &last {
            Some((p, s)) if *p == path && *s == now => continue,
            Some((p, _)) if *p == path => {}
            // A new path came with a SIGHUP, which loaded it.
            _ => {
                last = Some((path, now));
                continue;
            }
        }
        last = Some((path.clone(), now));
        let c = config.clone();
        match tokio::task::spawn_blocking(move || Router::from_config(&*c)).await {
            Ok(Ok(router)) => {
                let (exact, domains) = router.len();
                routes.get().set(Arc::new(router));
                tracing::info!(path = %path.display(), exact, domains, "routing file changed: routes reloaded");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "routing file changed but not reloaded, keeping the old routes");
            }
            Err(e) => tracing::warn!(error = %e, "routing reload task failed"),
        }
    }
}

/// Wait for SIGINT or SIGTERM; on SIGHUP reload the client certificate and keep waiting.
async fn wait_for_stop_signal(
    cert: Option<&ReloadableCert>,
    mut on_hangup: impl FnMut(),
) -> Result<(), ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ServeError::Signal)?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                match cert.map(ReloadableCert::reload) {
                    Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Some(Err(e)) => tracing::warn!(error = %e, "SIGHUP: cannot load TLS certificate; keeping the old one"),
                    None => {}
                }
                on_hangup();
            }
        }
    }
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
/// running sessions, and close the rest without applying their deletions.
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
                    next_id += 1;
                    let span = tracing::info_span!(
                        "session",
                        listener = spec.name,
                        id = next_id,
                        %peer,
                        client = tracing::field::Empty,
                        user = tracing::field::Empty
                    );
                    sessions.spawn(
                        async move {
                            let mut socket = socket;
                            let Some(client) = spec.client_address(&mut socket, peer).await else {
                                return;
                            };
                            let Some(_slot) = spec.admit(&socket, client) else {
                                return;
                            };
                            let m = metrics();
                            let listener = spec.name;
                            m.sessions_started.with_label_values(&[listener]).inc();
                            let active = m.sessions_active.with_label_values(&[listener]);
                            active.inc();
                            let started = Instant::now();
                            let tls = spec.client_policy(client);
                            let outcome = match &spec.implicit_tls {
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
                            let outcome = match outcome {
                                Ok(io) => {
                                    connection::serve_client(
                                        io,
                                        &tls,
                                        &bridge.upstream,
                                        &bridge.locks,
                                        &bridge.session,
                                        &bridge.limits,
                                        kill,
                                    )
                                    .await
                                }
                                Err(o) => o,
                            };
                            active.dec();
                            m.sessions_ended
                                .with_label_values(&[listener, outcome.label()])
                                .inc();
                            m.session_duration
                                .with_label_values(&[listener])
                                .observe(started.elapsed().as_secs_f64());
                        }
                        .instrument(span),
                    );
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
        let _ = kill_tx.send(true);
        let grace = tokio::time::timeout(Duration::from_secs(5), async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if grace.is_err() {
            sessions.abort_all();
        }
    }
}
