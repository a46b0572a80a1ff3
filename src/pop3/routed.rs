//! The driver's view of where a login goes: routed to a backend and opened there, as a maildrop
//! served through the bridge or a legacy POP3 session to relay.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::policy::UserPolicy;
use super::relay::Relayed;
use crate::limits::{Fingerprint, LoginGate};
use crate::maildrop::{Credential, Maildrop, MaildropError, MaildropKey, Mailstore, Scope, Signal};
use crate::metrics::metrics;
use crate::uidl::UidlFormat;

/// Where a POP3 login goes: routed to a backend and opened there, as a maildrop served through
/// the bridge or a legacy POP3 session to relay.
pub trait Upstream: Send + Sync {
    type Maildrop: Maildrop;

    /// The account a login stands for: the login itself, or the user behind a per-device
    /// view form (`recent:alice` -> `alice`). Login penalties count against it.
    fn account<'a>(&self, login: &'a str) -> &'a str {
        login
    }

    /// Route a login to its backend and open it there, without listing it yet (see
    /// [`Maildrop::snapshot`]).
    fn route(
        &self,
        user: &str,
        credential: Credential<'_>,
    ) -> impl Future<Output = Routed<Self::Maildrop>> + Send;
}

/// One [`Mailstore`] serving every login, unrouted, each locked under its login (the
/// driver's unit tests).
pub struct Unrouted<S>(pub S);

/// The server part of an [`Unrouted`] login's maildrop key.
pub const UNROUTED_SERVER: &str = "unrouted";

impl<S: Mailstore> Upstream for Unrouted<S> {
    type Maildrop = S::Maildrop;

    async fn route(&self, user: &str, credential: Credential<'_>) -> Routed<S::Maildrop> {
        Routed {
            backend: None,
            gated: None,
            result: self
                .0
                .login(user, credential)
                .await
                .map(|maildrop| Opened::Maildrop {
                    maildrop,
                    lock_key: MaildropKey::new(UNROUTED_SERVER, user, "INBOX"),
                    uidl_format: None,
                    fetch_chunk: None,
                }),
        }
    }
}

/// Where a login went (the backend name, for metrics and logs) and what it opened.
pub struct Routed<M> {
    pub backend: Option<Arc<str>>,
    pub result: Result<Opened<M>, MaildropError>,
    /// The user's place at the [`LoginGate`], when the login was let through it.
    pub gated: Option<Gated>,
}

/// A login the [`LoginGate`] let through: the session reports back how it went (a login
/// starts the user's LOGIN-DELAY; upstream pressure starts a backoff).
#[derive(Clone)]
pub struct Gated {
    pub gate: Arc<LoginGate>,
    pub backend: Arc<str>,
    /// The gate's key for this user of this backend (backoffs).
    pub user_key: String,
    /// The gate's key for this login's LOGIN-DELAY: the user's, or its per-device view's.
    pub delay_key: String,
    /// The credentials of this login, fingerprinted.
    pub fingerprint: Fingerprint,
    /// The backend's LOGIN-DELAY and EXPIRE, for the gate and for CAPA after login.
    pub policy: UserPolicy,
}

impl Gated {
    /// The gate's key for `login` at `backend` (case-insensitive, like the maildrop locks).
    pub fn key(backend: &str, login: &str) -> String {
        format!("{backend}\0{}", login.to_lowercase())
    }

    /// The user logged in: the next login may come after the LOGIN-DELAY.
    pub fn logged_in(&self) {
        self.gate.logged_in(
            &self.delay_key,
            self.fingerprint,
            Duration::from_secs(self.policy.login_delay_secs),
            Instant::now(),
        );
    }

    /// The upstream answered with `signal` (at login, SELECT or FETCH): count it and start
    /// or extend the user's or the backend's backoff.
    pub fn pressure(&self, signal: Signal) {
        metrics()
            .upstream_pressure
            .with_label_values(&[&self.backend, signal.label()])
            .inc();
        let Some(scope) = signal.backoff() else {
            return;
        };
        let (key, label) = match scope {
            Scope::User => (self.user_key.as_str(), "user"),
            Scope::Backend => (&*self.backend, "backend"),
        };
        let wait = self.gate.pressure(key, signal, Instant::now());
        metrics()
            .backoffs
            .with_label_values(&[&self.backend, label])
            .inc();
        tracing::warn!(
            backend = %self.backend,
            scope = label,
            signal = signal.label(),
            backoff_ms = wait.as_millis() as u64,
            "upstream under pressure: new logins answered at once until the backoff ends"
        );
    }
}

/// An open upstream for one POP3 session.
pub enum Opened<M> {
    /// Served through the bridge from this maildrop.
    Maildrop {
        maildrop: M,
        /// Key of the RFC 1939 exclusive-access lock (see [`super::locks::MaildropLocks`]).
        lock_key: MaildropKey,
        /// The backend's UIDL format, when it differs from the listener's.
        uidl_format: Option<UidlFormat>,
        /// The backend's piece size (`fetch_chunk_bytes`): its upstream responses are bounded
        /// by it. `None`: the listener's default.
        fetch_chunk: Option<u32>,
    },
    /// Logged in at a legacy POP3 server: relay the rest of the session byte for byte.
    Relay(Box<Relayed>),
}

impl<T: Upstream> Upstream for Arc<T> {
    type Maildrop = T::Maildrop;

    fn account<'a>(&self, login: &'a str) -> &'a str {
        (**self).account(login)
    }

    fn route(
        &self,
        user: &str,
        credential: Credential<'_>,
    ) -> impl Future<Output = Routed<Self::Maildrop>> + Send {
        (**self).route(user, credential)
    }
}
