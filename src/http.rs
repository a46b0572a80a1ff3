//! The operator's HTTP endpoint (hyper): `/metrics` for Prometheus, `/healthz` (the process
//! answers) and `/readyz` (listeners bound, not stopping, and the upstream IMAP server greets
//! us; checked without logging in) for load balancers and Kubernetes probes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::live::Live;
use crate::maildrop::imap::ImapUpstream;
use crate::metrics::metrics;

/// How often the upstream is probed in the background for `popbridge_upstream_up`.
const PROBE_INTERVAL: Duration = Duration::from_secs(15);

/// What `/readyz` looks at.
pub struct Health {
    /// Set once every POP3 listener is bound.
    pub listening: AtomicBool,
    /// Set by the stop signal: from then on `/readyz` answers 503, through the lame duck
    /// phase (listeners still accepting) and the drain, so balancers stop sending sessions.
    pub stopping: AtomicBool,
    /// Replaced when a SIGHUP reloads the configuration.
    pub upstream: Live<ImapUpstream>,
}

impl Health {
    pub fn new(upstream: Arc<ImapUpstream>) -> Arc<Health> {
        Arc::new(Health {
            listening: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            upstream: Live::new(upstream),
        })
    }

    /// The POP3 listeners are bound: new sessions are welcome.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
        metrics().accepting.set(1);
    }

    /// The stop signal came: `/readyz` answers 503 from now on.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
        metrics().accepting.set(0);
    }

    /// Probe the upstream now and record the answer in `popbridge_upstream_up`.
    async fn probe(&self) -> Result<(), String> {
        let upstream = self.upstream.get();
        let result = upstream.probe().await.map_err(|e| e.to_string());
        metrics().upstream_up.set(i64::from(result.is_ok()));
        result
    }
}

/// Serve HTTP on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    let prober = {
        let health = health.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = health.probe().await {
                    tracing::warn!(error = %e, "upstream readiness probe failed");
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        })
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(route(req, &health).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            // Bound the life of a connection: a scraper needs milliseconds, not minutes.
            match tokio::time::timeout(Duration::from_secs(60), conn).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection error"),
                Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
    prober.abort();
}

async fn route(req: Request<Incoming>, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(metrics().render())))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if health.stopping.load(Ordering::Acquire) {
                return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "stopping\n");
            }
            if !health.listening.load(Ordering::Acquire) {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not listening yet\n",
                );
            }
            match health.probe().await {
                Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n"),
                Err(e) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    &format!("upstream unreachable: {e}\n"),
                ),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

fn reply(status: StatusCode, content_type: &str, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
