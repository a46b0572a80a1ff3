//! What a running server waits for: changes of the routing file, and the signals (SIGHUP
//! reloads, SIGINT/SIGTERM stop, a second one cuts the lame duck phase short).

use super::ServeError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::client_tls::ReloadableCert;
use crate::config::Config;
use crate::live::Live;
use crate::routing::Router;

/// When the routing file changes (its modification time, size or inode), rebuild the routing
/// table from it and the configuration in force; a bad file keeps the old table.
pub(super) async fn watch_routes(
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

/// The signals a running server answers: SIGHUP reloads, SIGINT and SIGTERM stop.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (from then on these signals no longer end the process by default).
    pub(super) fn install() -> Result<Signals, ServeError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(ServeError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(ServeError::Signal)?,
            hup: signal(SignalKind::hangup()).map_err(ServeError::Signal)?,
        })
    }

    /// Wait for SIGINT or SIGTERM; on SIGHUP reload the client certificate, call `on_hangup`
    /// and keep waiting.
    pub(super) async fn wait_for_stop(
        &mut self,
        cert: Option<&ReloadableCert>,
        mut on_hangup: impl FnMut(),
    ) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => {
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

    /// Resolves at the next SIGINT or SIGTERM (a second stop signal); SIGHUP is not answered
    /// while stopping.
    pub(super) async fn next_stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
