//! The listener: accept loop, one task per POP3 session, and a graceful stop. Takes an already
//! bound listener so tests can bind port 0.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::Config;
use crate::http::{self, Health};
use crate::imap::{ImapUpstream, UpstreamSetupError};
use crate::metrics::{metrics, outcome_label};
use crate::pop3::connection::{self, ConnectionLimits, MaildropLocks, Upstream};
use crate::pop3::session::SessionConfig;
use crate::state::{StateError, StateStore};
use crate::uidl::UidlFormat;

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
    Upstream(#[from] UpstreamSetupError),
    #[error("invalid pop3.uidl_format: {0}")]
    Uidl(String),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}

/// The `listener` label of session metrics for the plain POP3 listener.
const LISTENER: &str = "pop3";

/// What every session of one listener shares.
pub struct Bridge<U> {
    pub upstream: U,
    pub session: Arc<SessionConfig>,
    pub limits: ConnectionLimits,
    pub locks: MaildropLocks,
}

impl Bridge<Arc<ImapUpstream>> {
    pub fn from_config(config: &Config, upstream: Arc<ImapUpstream>) -> Result<Self, ServeError> {
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
            locks: MaildropLocks::default(),
        })
    }
}

/// Run popbridge as configured until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let state = Arc::new(StateStore::open(&config.state.dir)?);
    let upstream = Arc::new(ImapUpstream::new(&config, Some(state.clone()))?);
    let bridge = Arc::new(Bridge::from_config(&config, upstream.clone())?);
    let (stop_tx, stop_rx) = watch::channel(false);

    let health = Health::new(upstream);
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

    let addr = config.pop3.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    health.listening.store(true, Ordering::Release);
    tracing::info!(
        listen = %listener.local_addr().unwrap_or(addr),
        upstream = %format!("{}:{}", config.imap.host, config.imap.port()),
        mailbox = %config.imap.mailbox,
        deletion = ?config.deletion.mode,
        "popbridge listening"
    );
    let drain = Duration::from_secs(config.pop3.shutdown_drain_secs);
    let server = tokio::spawn(run(listener, bridge, stop_rx, drain));
    wait_for_stop_signal().await?;
    tracing::info!(drain_secs = drain.as_secs(), "stopping: no new sessions");
    health.listening.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    state.flush();
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_stop_signal() -> Result<(), ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Accept POP3 clients on `listener` until `stop` turns true; then wait up to `drain` for the
/// running sessions, and close the rest without applying their deletions.
pub async fn run<U: Upstream + 'static>(
    listener: TcpListener,
    bridge: Arc<Bridge<U>>,
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
                    // Small responses must not wait for the client's delayed ACK.
                    if let Err(e) = socket.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "TCP_NODELAY failed");
                    }
                    let bridge = bridge.clone();
                    let kill = kill_rx.clone();
                    next_id += 1;
                    let span = tracing::info_span!(
                        "session",
                        id = next_id,
                        %peer,
                        user = tracing::field::Empty
                    );
                    sessions.spawn(
                        async move {
                            let m = metrics();
                            m.sessions_started.with_label_values(&[LISTENER]).inc();
                            let active = m.sessions_active.with_label_values(&[LISTENER]);
                            active.inc();
                            let started = Instant::now();
                            let outcome = connection::serve(
                                socket,
                                &bridge.upstream,
                                &bridge.locks,
                                &bridge.session,
                                &bridge.limits,
                                kill,
                            )
                            .await;
                            active.dec();
                            m.sessions_ended
                                .with_label_values(&[LISTENER, outcome_label(outcome)])
                                .inc();
                            m.session_duration
                                .with_label_values(&[LISTENER])
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
