//! Prometheus metrics: one process-wide registry, so deep code (the IMAP driver) can count
//! without threading a handle through every call. Label values come from small fixed sets;
//! never a user name or an address.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 0.5 ms to 60 s: loopback commands and slow upstreams both resolve.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Session lengths from a second to an hour.
const SESSION_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
];

/// The outcomes of `popbridge_upstream_keepalive_total`.
pub const KEEPALIVE_OUTCOMES: [&str; 5] = ["parked", "reused", "expired", "evicted", "stale"];

pub struct Metrics {
    pub registry: Registry,
    pub sessions_active: IntGaugeVec,
    pub sessions_started: IntCounterVec,
    pub sessions_ended: IntCounterVec,
    pub session_duration: HistogramVec,
    pub logins: IntCounterVec,
    pub commands: IntCounterVec,
    pub command_duration: HistogramVec,
    pub client_sent_bytes: IntCounter,
    pub upstream_received_bytes: IntCounter,
    pub messages_retrieved: IntCounter,
    pub deletions: IntCounterVec,
    pub upstream_connect_duration: Histogram,
    pub upstream_login_duration: Histogram,
    pub upstream_command_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub upstream_up: IntGauge,
    pub accepting: IntGauge,
    pub connections_rejected: IntCounterVec,
    pub uidl_changed_sessions: IntCounter,
    pub retr_repeated: IntCounter,
    pub retr_gone: IntCounter,
    pub folders_skipped: IntCounter,
    pub retention_removed: IntCounterVec,
    pub backend_logins: IntCounterVec,
    pub relay_sessions: IntCounterVec,
    pub relay_bytes: IntCounterVec,
    pub uidl_maps: IntCounterVec,
    pub upstream_logins: IntCounterVec,
    pub oauth_token_requests: IntCounterVec,
    pub oauth_token_request_duration: Histogram,
    pub oauth_token_cache: IntCounterVec,
    pub upstream_pressure: IntCounterVec,
    pub logins_refused_early: IntCounterVec,
    pub backoffs: IntCounterVec,
    pub upstream_keepalive: IntCounterVec,
    pub upstream_keepalive_parked: IntGauge,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn histogram(r: &Registry, name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let sessions_active = IntGaugeVec::new(
            Opts::new("popbridge_sessions_active", "POP3 sessions open now."),
            &["listener"],
        )
        .expect("valid metric");
        r.register(Box::new(sessions_active.clone()))
            .expect("unique metric");
        let upstream_up = IntGauge::new(
            "popbridge_upstream_up",
            "1 if the upstream IMAP server answered the last readiness probe with a greeting.",
        )
        .expect("valid metric");
        r.register(Box::new(upstream_up.clone()))
            .expect("unique metric");
        let accepting = IntGauge::new(
            "popbridge_accepting",
            "1 while this node takes new sessions: listeners bound and no stop signal yet \
             (0 through the lame duck phase and the drain).",
        )
        .expect("valid metric");
        r.register(Box::new(accepting.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "popbridge_build_info",
                "Always 1; the version and the commit it was built from are in the labels.",
            ),
            &["version", "commit"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("POPBRIDGE_COMMIT")])
            .set(1);
        r.register(Box::new(build_info)).expect("unique metric");
        // process_start_time_seconds, process_open_fds, process_resident_memory_bytes, ...
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("unique metric");

        Metrics {
            sessions_active,
            sessions_started: counter_vec(
                &r,
                "popbridge_sessions_started_total",
                "POP3 connections accepted.",
                &["listener"],
            ),
            sessions_ended: counter_vec(
                &r,
                "popbridge_sessions_ended_total",
                "POP3 sessions ended, by how they ended.",
                &["listener", "outcome"],
            ),
            session_duration: histogram_vec(
                &r,
                "popbridge_session_duration_seconds",
                "Length of POP3 sessions.",
                &["listener"],
                SESSION_BUCKETS,
            ),
            logins: counter_vec(
                &r,
                "popbridge_logins_total",
                "POP3 login attempts, by result.",
                &["result"],
            ),
            commands: counter_vec(
                &r,
                "popbridge_pop3_commands_total",
                "POP3 commands answered, by command and outcome (+OK or -ERR).",
                &["command", "outcome"],
            ),
            command_duration: histogram_vec(
                &r,
                "popbridge_pop3_command_duration_seconds",
                "Time from a POP3 command's line to its complete answer being queued or sent.",
                &["command"],
                LATENCY_BUCKETS,
            ),
            client_sent_bytes: counter(
                &r,
                "popbridge_client_sent_bytes_total",
                "Octets written to POP3 clients.",
            ),
            upstream_received_bytes: counter(
                &r,
                "popbridge_upstream_received_bytes_total",
                "Octets read from upstream IMAP servers (after TLS).",
            ),
            messages_retrieved: counter(
                &r,
                "popbridge_messages_retrieved_total",
                "Messages sent completely in answer to RETR.",
            ),
            deletions: counter_vec(
                &r,
                "popbridge_deletions_total",
                "Messages deleted by a committed QUIT, by deletion mode.",
                &["mode"],
            ),
            upstream_connect_duration: histogram(
                &r,
                "popbridge_upstream_connect_duration_seconds",
                "Time to connect to the upstream: TCP, TLS or STARTTLS, and the greeting.",
            ),
            upstream_login_duration: histogram(
                &r,
                "popbridge_upstream_login_duration_seconds",
                "Time of the upstream LOGIN command.",
            ),
            upstream_command_duration: histogram_vec(
                &r,
                "popbridge_upstream_command_duration_seconds",
                "Time of upstream IMAP commands, by command.",
                &["command"],
                LATENCY_BUCKETS,
            ),
            upstream_errors: counter_vec(
                &r,
                "popbridge_upstream_errors_total",
                "Upstream failures, by kind.",
                &["kind"],
            ),
            upstream_up,
            accepting,
            connections_rejected: counter_vec(
                &r,
                "popbridge_connections_rejected_total",
                "Connections turned away: at a connection limit (total, per_ip) or for PROXY protocol (untrusted_proxy, bad_proxy_header).",
                &["reason"],
            ),
            uidl_changed_sessions: counter(
                &r,
                "popbridge_uidl_changed_sessions_total",
                "Sessions whose UIDLs changed since the user's previous session (UIDVALIDITY changed): the client will download everything again.",
            ),
            retr_repeated: counter(
                &r,
                "popbridge_retr_repeated_total",
                "RETRs of a message the same user already retrieved in an earlier session.",
            ),
            retr_gone: counter(
                &r,
                "popbridge_retr_gone_total",
                "RETRs and TOPs answered -ERR because another client removed the message since the session's listing.",
            ),
            folders_skipped: counter(
                &r,
                "popbridge_folders_skipped_total",
                "Listings that left out a folder of a several-folder maildrop (missing, read-only, or unable to store the hide keyword).",
            ),
            retention_removed: counter_vec(
                &r,
                "popbridge_retention_removed_total",
                "Hidden messages past the retention period removed at a commit, by action (expunge, move).",
                &["action"],
            ),
            backend_logins: counter_vec(
                &r,
                "popbridge_backend_logins_total",
                "POP3 login attempts by routed backend (a configured backend name, or `none` for a refused unknown user) and result.",
                &["backend", "result"],
            ),
            relay_sessions: counter_vec(
                &r,
                "popbridge_relay_sessions_total",
                "Sessions relayed to a legacy POP3 backend, by backend and how the relay ended.",
                &["backend", "outcome"],
            ),
            relay_bytes: counter_vec(
                &r,
                "popbridge_relay_bytes_total",
                "Bytes relayed to and from legacy POP3 backends, by backend and direction.",
                &["backend", "direction"],
            ),
            uidl_maps: counter_vec(
                &r,
                "popbridge_uidl_maps_total",
                "Migrated legacy UIDL maps looked up at login, by outcome: cache (decoded earlier, or the sled copy; with METADATA, after its head matched), metadata (chunks read from the IMAP server), stale (a map for another UIDVALIDITY, ignored), error (METADATA unreadable or over the limits: login refused with SYS/TEMP).",
                &["outcome"],
            ),
            upstream_keepalive: counter_vec(
                &r,
                "popbridge_upstream_keepalive_total",
                "Upstream connections kept after a session for the user's next one (imap.keep_alive_secs), by outcome: parked (kept at a clean session end), reused (taken by the user's next session instead of a login), expired (logged out after keep_alive_secs), evicted (logged out to make room, keep_alive_max), stale (found closed or failing when taken: a fresh login instead).",
                &["outcome"],
            ),
            upstream_keepalive_parked: {
                let g = IntGauge::new(
                    "popbridge_upstream_keepalive_parked",
                    "Upstream connections kept for users' next sessions right now.",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            upstream_logins: counter_vec(
                &r,
                "popbridge_upstream_logins_total",
                "Upstream IMAP logins by mechanism (login, plain, xoauth2, oauthbearer) and result (ok, refused, failed: no answer).",
                &["mechanism", "result"],
            ),
            oauth_token_requests: counter_vec(
                &r,
                "popbridge_oauth_token_requests_total",
                "OAuth 2.0 token endpoint requests by provider, grant (client_credentials, jwt_bearer, refresh_token, device_code) and result (ok, invalid_grant: the user must authorize again, refused, unavailable, malformed, setup).",
                &["provider", "grant", "result"],
            ),
            oauth_token_request_duration: histogram(
                &r,
                "popbridge_oauth_token_request_duration_seconds",
                "Time of OAuth 2.0 token endpoint requests (refreshes included).",
            ),
            oauth_token_cache: counter_vec(
                &r,
                "popbridge_oauth_token_cache_total",
                "Access tokens looked up in the cache before a login: hit (still fresh), miss (requested from the token endpoint).",
                &["result"],
            ),
            upstream_pressure: counter_vec(
                &r,
                "popbridge_upstream_pressure_total",
                "Upstream answers that asked popbridge to slow down or come back later (RFC 5530 codes at login, SELECT or FETCH), by backend and code: throttled (THROTTLED), limit (LIMIT), inuse (INUSE), unavailable (UNAVAILABLE).",
                &["backend", "code"],
            ),
            logins_refused_early: counter_vec(
                &r,
                "popbridge_logins_refused_early_total",
                "Logins answered at once without contacting the upstream, by backend and reason: login_delay (RFC 2449 LOGIN-DELAY: the user logged in too recently), backoff (the backend or the user is backing off after upstream pressure).",
                &["backend", "reason"],
            ),
            backoffs: counter_vec(
                &r,
                "popbridge_backoffs_total",
                "Backoffs started or extended after upstream pressure, by backend and scope (user: one user of the backend; backend: all of it).",
                &["backend", "scope"],
            ),
            registry: r,
        }
    }

    /// Create the per-backend series at zero (backend names come from the configuration, so
    /// the label set stays bounded).
    pub fn initialize_backend(&self, backend: &str, relayed: bool) {
        for result in LOGIN_RESULTS {
            self.backend_logins.with_label_values(&[backend, result]);
        }
        for code in PRESSURE_CODES {
            self.upstream_pressure.with_label_values(&[backend, code]);
        }
        for reason in EARLY_REFUSALS {
            self.logins_refused_early
                .with_label_values(&[backend, reason]);
        }
        for scope in ["user", "backend"] {
            self.backoffs.with_label_values(&[backend, scope]);
        }
        if relayed {
            for outcome in ["closed", "timeout", "shutdown", "error"] {
                self.relay_sessions.with_label_values(&[backend, outcome]);
            }
            for direction in ["client_to_server", "server_to_client"] {
                self.relay_bytes.with_label_values(&[backend, direction]);
            }
        }
    }

    /// Create every series of the fixed label sets at zero, so rates and alerts see a 0
    /// instead of no data before the first event.
    fn initialize_series(&self) {
        for mechanism in ["login", "plain", "xoauth2", "oauthbearer"] {
            for result in ["ok", "refused", "failed"] {
                self.upstream_logins.with_label_values(&[mechanism, result]);
            }
        }
        for outcome in KEEPALIVE_OUTCOMES {
            self.upstream_keepalive.with_label_values(&[outcome]);
        }
        for result in ["hit", "miss"] {
            self.oauth_token_cache.with_label_values(&[result]);
        }
        self.sessions_active.with_label_values(&["pop3"]).set(0);
        self.sessions_started.with_label_values(&["pop3"]);
        for outcome in OUTCOMES {
            self.sessions_ended.with_label_values(&["pop3", outcome]);
        }
        for result in LOGIN_RESULTS {
            self.logins.with_label_values(&[result]);
        }
        for command in COMMANDS.iter().chain(&["OTHER"]) {
            for outcome in ["ok", "err"] {
                self.commands.with_label_values(&[command, outcome]);
            }
        }
        for outcome in ["cache", "metadata", "stale", "error"] {
            self.uidl_maps.with_label_values(&[outcome]);
        }
        for mode in ["hide", "expunge", "move"] {
            self.deletions.with_label_values(&[mode]);
        }
        for action in ["expunge", "move"] {
            self.retention_removed.with_label_values(&[action]);
        }
        for reason in ["total", "per_ip", "untrusted_proxy", "bad_proxy_header"] {
            self.connections_rejected.with_label_values(&[reason]);
        }
        for kind in UPSTREAM_ERROR_KINDS {
            self.upstream_errors.with_label_values(&[kind]);
        }
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics::new();
    m.initialize_series();
    m
});

/// Every value of the `outcome` label of `popbridge_sessions_ended_total` (see
/// `SessionOutcome::label`), pre-initialised at 0.
pub const OUTCOMES: [&str; 6] = [
    "quit",
    "timeout",
    "client_gone",
    "upstream_error",
    "shutdown",
    "too_many_errors",
];
/// Every value of the `result` label of `popbridge_logins_total` (see
/// `MaildropError::login_label`), pre-initialised at 0.
pub const LOGIN_RESULTS: [&str; 7] = [
    "ok",
    "bad_credentials",
    "upstream_unavailable",
    "refused",
    "in_use",
    "upstream_busy",
    "login_delay",
];

/// The `code` labels of `popbridge_upstream_pressure_total`: the RFC 5530 signals an upstream
/// sent ([`crate::maildrop::Signal::label`], popbridge's own `login_delay` aside).
pub const PRESSURE_CODES: [&str; 4] = ["throttled", "limit", "inuse", "unavailable"];

/// The `reason` labels of `popbridge_logins_refused_early_total`: a login answered at once,
/// without contacting the upstream.
pub const EARLY_REFUSALS: [&str; 2] = ["login_delay", "backoff"];
const UPSTREAM_ERROR_KINDS: [&str; 8] = [
    "connect",
    "timeout",
    "closed",
    "tls",
    "protocol",
    "bye",
    "io",
    "command_failed",
];
const COMMANDS: [&str; 15] = [
    "USER", "PASS", "APOP", "AUTH", "CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT",
    "TOP", "UIDL", "STLS",
];

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The command label of a POP3 line: its keyword if it is one we know, else `OTHER`, so a
/// client sending garbage cannot create new series.
pub fn command_label(line: &[u8]) -> &'static str {
    let word = line.split(|&b| b == b' ').next().unwrap_or_default();
    COMMANDS
        .iter()
        .find(|k| k.as_bytes().eq_ignore_ascii_case(word))
        .copied()
        .unwrap_or("OTHER")
}

/// Observe the time since `start` into `h` when dropped or finished.
pub struct Timer<'a> {
    start: Instant,
    histogram: &'a Histogram,
}

impl<'a> Timer<'a> {
    pub fn start(histogram: &'a Histogram) -> Self {
        Timer {
            start: Instant::now(),
            histogram,
        }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_error_kinds_are_preinitialized() {
        let text = String::from_utf8(metrics().render()).unwrap();
        assert!(
            text.contains("popbridge_upstream_errors_total{kind=\"tls\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn command_labels_are_bounded() {
        assert_eq!(command_label(b"retr 1"), "RETR");
        assert_eq!(command_label(b"PASS secret words"), "PASS");
        assert_eq!(command_label(b"top"), "TOP");
        assert_eq!(command_label(b"XYZZY"), "OTHER");
        assert_eq!(command_label(b"\xff\xfe"), "OTHER");
        assert_eq!(command_label(b""), "OTHER");
    }

    #[test]
    fn render_has_every_family_and_no_password_label() {
        let m = metrics();
        m.logins.with_label_values(&["ok"]).inc();
        m.sessions_active.with_label_values(&["pop3"]).set(0);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "popbridge_build_info",
            "popbridge_logins_total",
            "popbridge_sessions_active",
            "popbridge_upstream_up",
            "popbridge_accepting",
            "popbridge_client_sent_bytes_total",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
