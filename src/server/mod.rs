//! The server: what `popbridge serve` runs. [`serve`] builds everything from the
//! configuration, opens the listeners ([`listener`]), reloads on SIGHUP (`generation.rs`), watches
//! the routing file (`watchers.rs`), tells systemd how it is doing (`notify.rs`) and stops
//! gracefully: lame duck (`/readyz` 503, still accepting), then no new sessions and the drain,
//! then whatever still runs is closed at once.

mod generation;
pub mod listener;
mod notify;
mod watchers;

pub use listener::{run, Bridge, ListenerSpec, ProxySettings};

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backends::BackendError;
use crate::client_tls::{CertError, ReloadableCert};
use crate::config::Config;
use crate::http::{self, Health};
use crate::limits::{AuthPenalty, ConnectionLimiter, LoginGate};
use crate::live::Live;
use crate::pop3::locks::MaildropLocks;
use crate::routing::{Router, RoutingError};
use crate::state::{StateError, StateStore};
use crate::upstream::SetupError;

use generation::{restart_only_changes, Generation, Shared};
use listener::bind;
use watchers::{watch_routes, Signals};

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
pub(super) const LISTENER: &str = "pop3";

/// How often certificate files are checked for a renewal.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// How often the routing file is checked for a change.
const ROUTES_CHECK_INTERVAL: Duration = Duration::from_secs(3);

/// Run popbridge as configured until SIGINT or SIGTERM; SIGHUP reloads `path`.
pub async fn serve(config: Config, path: PathBuf) -> Result<(), ServeError> {
    // First of all: a SIGTERM from here on stops gracefully instead of killing the process.
    let mut signals = Signals::install()?;
    raise_fd_limit(config.limits.max_connections, config.kept_connections_max());
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
        gate: LoginGate::new(
            Duration::from_secs(limits.backoff_base_secs),
            Duration::from_secs(limits.backoff_max_secs),
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
    // Turns true when the listeners stop accepting (after the lame duck phase).
    let (stop_tx, stop_rx) = watch::channel(false);
    // Turns true once the sessions are drained: the HTTP endpoint answers until then.
    let (http_stop_tx, http_stop_rx) = watch::channel(false);

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
                http_stop_rx,
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
    health.set_listening();
    notify::notify(&format!(
        "READY=1\nSTATUS=serving POP3 on {}",
        config.pop3.listen
    ));

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
    signals
        .wait_for_stop(cert.as_deref(), || {
            notify::notify("RELOADING=1");
            reload(&mut running);
            notify::notify("READY=1\nSTATUS=serving POP3");
        })
        .await;

    // Lame duck: /readyz says 503 at once, so balancers take this node out of rotation, while
    // the listeners keep accepting the sessions they still send meanwhile.
    health.set_stopping();
    let lame_duck = Duration::from_secs(running.pop3.shutdown_lame_duck_secs);
    if !lame_duck.is_zero() {
        tracing::info!(
            lame_duck_secs = lame_duck.as_secs(),
            "stopping: lame duck, /readyz answers 503 while the listeners still accept"
        );
        notify::notify(&format!(
            "STOPPING=1\nSTATUS=lame duck for {} s, then draining",
            lame_duck.as_secs()
        ));
        tokio::select! {
            _ = tokio::time::sleep(lame_duck) => {}
            _ = signals.next_stop() => {
                tracing::info!("second stop signal: lame duck cut short");
            }
        }
    } else {
        notify::notify("STOPPING=1\nSTATUS=draining");
    }
    tracing::info!(drain_secs = drain.as_secs(), "stopping: no new sessions");
    health.listening.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    for server in servers {
        let _ = server.await;
    }
    // Connections kept for users' next sessions: LOGOUT, bounded.
    bridge.get().upstream.log_out_kept(KEPT_LOGOUT_BOUND).await;
    // The HTTP endpoint answered through the drain (/readyz 503, /metrics the draining
    // sessions); now it goes too.
    let _ = http_stop_tx.send(true);
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = routes_task.await;
    shared.state.flush();
    tracing::info!("stopped");
    Ok(())
}

/// How long a stopping server waits for the LOGOUT of connections kept for users' next
/// sessions (`imap.keep_alive_secs`).
const KEPT_LOGOUT_BOUND: Duration = Duration::from_secs(2);

/// Each session holds two file descriptors (client and upstream), plus a few for the state
/// store, listeners and metrics. Raise the soft `RLIMIT_NOFILE` (often 1024 in a shell) to what
/// `max_connections` sessions need, as far as the hard limit allows; warn when that is not
/// enough (systemd: `LimitNOFILE=`).
fn raise_fd_limit(max_connections: usize, kept: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let needed = fds_needed(max_connections).saturating_add(kept);
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= needed {
        return;
    }
    let target = needed.min(limit.maximum.unwrap_or(u64::MAX));
    let mut now = soft;
    if target > soft {
        let raised = Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = soft, to = target, "open file limit raised");
                now = target;
            }
            Err(e) => tracing::debug!(error = %e, "cannot raise the open file limit"),
        }
    }
    if now < needed {
        tracing::warn!(
            limit = now,
            needed,
            max_connections,
            kept,
            "the open file limit cannot hold limits.max_connections sessions (and the upstream connections kept by keep_alive_max): raise it (systemd: LimitNOFILE=, shell: ulimit -n)"
        );
    }
}

/// File descriptors `max_connections` sessions need: two each, and 64 for the rest.
fn fds_needed(max_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptors_per_session_and_some() {
        assert_eq!(fds_needed(1000), 2064);
        assert_eq!(fds_needed(usize::MAX), u64::MAX);
    }
}
