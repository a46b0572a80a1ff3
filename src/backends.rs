//! The routed upstream: one [`ImapUpstream`] per IMAP backend, one [`Pop3Backend`] per legacy
//! POP3 backend, and the [`Router`] that picks one for each login. Thin glue between
//! [`crate::routing`] (sans-I/O) and the session driver.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{BackendConfig, Config, ImapConfig, SharedMap, ViewDele, DEFAULT_BACKEND};
use crate::limits::{LoginGate, Refusal};
use crate::live::Live;
use crate::maildrop::imap::{ImapMaildrop, ImapUpstream};
use crate::maildrop::{Credential, MaildropError, Mailstore, Signal};
use crate::metrics::metrics;
use crate::pop3::policy::UserPolicy;
use crate::pop3::relay::Pop3Backend;
use crate::pop3::routed::{Gated, Opened, Routed, Upstream};
use crate::routing::Router;
use crate::state::{state_prefix, StateStore};
use crate::uidl::UidlFormat;
use crate::upstream::SetupError;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend {backend:?}: {source}")]
    Setup { backend: String, source: SetupError },
    #[error("backend {backend:?}: uidl_format: {message}")]
    Uidl { backend: String, message: String },
}

/// Who checks a client's password before a master-user login.
enum Verifier {
    Imap(Arc<ImapUpstream>),
    Pop3(Arc<Pop3Backend>),
}

enum Backend {
    Imap {
        upstream: Arc<ImapUpstream>,
        uidl_format: Option<UidlFormat>,
        /// Its `fetch_chunk_bytes`: its connections' response limit follows from it, so its
        /// sessions must ask for pieces of this size, not the listener's.
        fetch_chunk: u32,
        /// Set for master-user backends: the name of the backend that checks the password.
        verify_with: Option<String>,
    },
    Pop3(Arc<Pop3Backend>),
}

/// Label used in metrics for logins refused because no rule matched.
pub const UNROUTED: &str = "none";

/// Every backend of one configuration, and the live routing table.
pub struct RoutedUpstream {
    router: Arc<Live<Router>>,
    backends: HashMap<String, (Arc<str>, Backend)>,
    default_imap: Arc<ImapUpstream>,
    /// LOGIN-DELAY and backoff, shared by every listener and generation; `None`: no gate.
    gate: Option<Arc<LoginGate>>,
    /// Each backend's LOGIN-DELAY and EXPIRE: for its accounts, and for its per-device view.
    policies: HashMap<String, (UserPolicy, Option<UserPolicy>)>,
    /// The per-device view's login prefix and DELE, when some backend offers the view.
    views: Option<(String, ViewDele)>,
}

/// The account behind a login in the per-device view form (`recent:alice` -> `alice`), when
/// `login` starts with `prefix` (ASCII case aside) and has more after it.
pub fn view_account<'a>(prefix: &str, login: &'a str) -> Option<&'a str> {
    let head = login.get(..prefix.len())?;
    let rest = &login[prefix.len()..];
    (head.eq_ignore_ascii_case(prefix) && !rest.is_empty()).then_some(rest)
}

impl RoutedUpstream {
    pub fn new(
        config: &Config,
        state: Option<Arc<StateStore>>,
        router: Arc<Live<Router>>,
    ) -> Result<RoutedUpstream, BackendError> {
        let imap = |name: &str, c: &ImapConfig| -> Result<Backend, BackendError> {
            let upstream = ImapUpstream::new(
                c,
                &config.deletion,
                state.clone(),
                &state_prefix(name),
                config.migration.shared_map == SharedMap::Metadata,
            )
            .map_err(|source| BackendError::Setup {
                backend: name.into(),
                source,
            })?;
            let uidl_format = c
                .uidl_format
                .as_deref()
                .map(UidlFormat::parse)
                .transpose()
                .map_err(|e| BackendError::Uidl {
                    backend: name.into(),
                    message: e.to_string(),
                })?;
            Ok(Backend::Imap {
                upstream: Arc::new(upstream),
                uidl_format,
                fetch_chunk: c.fetch_chunk_bytes,
                verify_with: c.verify_password_with.clone(),
            })
        };
        let mut backends = HashMap::new();
        let default = imap(DEFAULT_BACKEND, &config.imap)?;
        let Backend::Imap { upstream, .. } = &default else {
            unreachable!("built as IMAP")
        };
        let default_imap = upstream.clone();
        backends.insert(
            DEFAULT_BACKEND.to_owned(),
            (Arc::from(DEFAULT_BACKEND), default),
        );
        for (name, b) in &config.backends {
            let backend = match b {
                BackendConfig::Imap(c) => imap(name, c)?,
                BackendConfig::Pop3(c) => {
                    Backend::Pop3(Arc::new(Pop3Backend::new(name, c).map_err(|source| {
                        BackendError::Setup {
                            backend: name.clone(),
                            source,
                        }
                    })?))
                }
            };
            backends.insert(name.clone(), (Arc::from(name.as_str()), backend));
        }
        let m = metrics();
        for (name, (_, b)) in &backends {
            m.initialize_backend(name, matches!(b, Backend::Pop3(_)));
        }
        m.initialize_backend(UNROUTED, false);
        let policies = backends
            .keys()
            .map(|name| {
                let policies = (config.user_policy(name), config.view_policy(name));
                (name.clone(), policies)
            })
            .collect();
        Ok(RoutedUpstream {
            router,
            backends,
            default_imap,
            gate: None,
            policies,
            views: config
                .views_enabled()
                .then(|| (config.views.prefix.clone(), config.views.dele)),
        })
    }

    /// Answer logins at once, before any upstream is contacted, while `gate` says so
    /// (LOGIN-DELAY, backoff after upstream pressure).
    pub fn with_gate(mut self, gate: Arc<LoginGate>) -> RoutedUpstream {
        self.gate = Some(gate);
        self
    }

    /// Log out every IMAP backend's kept connections (`keep_alive_secs`) at once, waiting at
    /// most `bound` in all (a stopping server).
    pub async fn log_out_kept(&self, bound: std::time::Duration) {
        let mut set = tokio::task::JoinSet::new();
        for (_, b) in self.backends.values() {
            if let Backend::Imap { upstream, .. } = b {
                let upstream = Arc::clone(upstream);
                set.spawn(async move { upstream.log_out_kept(bound).await });
            }
        }
        let _ =
            tokio::time::timeout(bound, async { while set.join_next().await.is_some() {} }).await;
    }

    /// The `[imap]` upstream (probed by `/readyz`).
    pub fn default_imap(&self) -> Arc<ImapUpstream> {
        self.default_imap.clone()
    }

    fn verifier(&self, name: &str) -> Option<Verifier> {
        match self.backends.get(name) {
            Some((_, Backend::Imap { upstream, .. })) => Some(Verifier::Imap(upstream.clone())),
            Some((_, Backend::Pop3(p))) => Some(Verifier::Pop3(p.clone())),
            None => None,
        }
    }

    async fn open(
        &self,
        name: &str,
        backend: &Backend,
        login: &str,
        credential: Credential<'_>,
        view: Option<&str>,
    ) -> Result<Opened<ImapMaildrop>, MaildropError> {
        if view.is_some() && matches!(backend, Backend::Pop3(_)) {
            tracing::info!(
                backend = name,
                "per-device view asked of a legacy POP3 backend, which has none"
            );
            return Err(MaildropError::Unsupported(
                "per-device views are not available for this mailbox".into(),
            ));
        }
        match (backend, credential) {
            (Backend::Pop3(p), Credential::Password(password)) => {
                Ok(Opened::Relay(Box::new(p.login(login, password).await?)))
            }
            (Backend::Pop3(_), Credential::Bearer(_)) => {
                tracing::info!(
                    backend = name,
                    "a legacy POP3 backend takes passwords, not OAuth tokens"
                );
                Err(MaildropError::Auth)
            }
            (
                Backend::Imap {
                    upstream,
                    uidl_format,
                    fetch_chunk,
                    verify_with,
                },
                credential,
            ) => {
                if let Some(v) = verify_with {
                    // A master login (or an application's token) would let any password in:
                    // check the client's first.
                    let Credential::Password(password) = credential else {
                        return Err(MaildropError::Auth);
                    };
                    let checked = match self.verifier(v) {
                        Some(Verifier::Imap(i)) => i.check_password(login, password).await,
                        Some(Verifier::Pop3(p)) => p
                            .check_password(login, password)
                            .await
                            .map_err(MaildropError::from),
                        None => Err(MaildropError::unavailable(format!(
                            "verify_password_with names no backend: {v:?}"
                        ))),
                    };
                    if let Err(e) = checked {
                        tracing::info!(backend = name, verified_with = %v, error = %crate::errors::Chain(&e), "password check failed");
                        return Err(e);
                    }
                }
                let maildrop = match (view, &self.views) {
                    (Some(form), Some((_, dele))) => {
                        upstream.login_view(login, form, credential, *dele).await?
                    }
                    _ => upstream.login(login, credential).await?,
                };
                // One lock per mailbox, however many backend names or routes reach it: two
                // names for one server must not let two sessions commit at once (RFC 1939).
                let lock_key = maildrop.key().clone();
                Ok(Opened::Maildrop {
                    maildrop,
                    lock_key,
                    uidl_format: uidl_format.clone(),
                    fetch_chunk: Some(*fetch_chunk),
                })
            }
        }
    }
}

impl Upstream for RoutedUpstream {
    type Maildrop = ImapMaildrop;

    fn account<'a>(&self, login: &'a str) -> &'a str {
        self.views
            .as_ref()
            .and_then(|(prefix, _)| view_account(prefix, login))
            .unwrap_or(login)
    }

    /// A login in the per-device view form is routed as its account (`recent:alice` as
    /// `alice`): rules, rewrites and backend are the account's; the view is opened there.
    async fn route(&self, user: &str, credential: Credential<'_>) -> Routed<ImapMaildrop> {
        let view = (self.account(user) != user).then_some(user);
        let user = self.account(user);
        let Some(route) = self.router.get().route(user) else {
            tracing::info!(user = %user, "login refused: no route for this user");
            return Routed {
                backend: Some(Arc::from(UNROUTED)),
                result: Err(MaildropError::Auth),
                gated: None,
            };
        };
        let Some((name, backend)) = self.backends.get(&*route.backend) else {
            // Only if a routing file named a backend since removed from the configuration.
            tracing::error!(backend = %route.backend, "route names an unknown backend");
            return Routed {
                backend: None,
                result: Err(MaildropError::unavailable("unknown backend")),
                gated: None,
            };
        };
        tracing::debug!(backend = %name, upstream_login = %route.login, matched = route.matched, "routed");
        let view_login = view.and_then(|_| view_form(&self.views, &route.login));
        let gated = self.gate.as_ref().map(|gate| {
            // Backoffs hold the account (the store throttles it, whatever the view); the
            // LOGIN-DELAY counts the account and its view apart (one user, two devices).
            let user_key = Gated::key(name, &route.login);
            let delay_key = Gated::key(name, view_login.as_deref().unwrap_or(&route.login));
            let secret = match credential {
                Credential::Password(p) => p,
                Credential::Bearer(t) => t,
            };
            let (account, view_policy) = self.policies.get(&**name).copied().unwrap_or_default();
            Gated {
                gate: gate.clone(),
                backend: name.clone(),
                fingerprint: gate.fingerprint(&delay_key, secret.as_bytes()),
                user_key,
                delay_key,
                policy: match view_login {
                    Some(_) => view_policy.unwrap_or(account),
                    None => account,
                },
            }
        });
        if let Some(g) = &gated {
            if let Err(refusal) = g.gate.check(
                name,
                &g.user_key,
                &g.delay_key,
                &g.fingerprint,
                Instant::now(),
            ) {
                let (reason, signal, wait) = match refusal {
                    Refusal::LoginDelay { wait } => ("login_delay", Signal::LoginDelay, wait),
                    Refusal::Backoff { signal, wait } => ("backoff", signal, wait),
                };
                metrics()
                    .logins_refused_early
                    .with_label_values(&[name, reason])
                    .inc();
                tracing::info!(backend = %name, user = %user, reason, wait_ms = wait.as_millis() as u64, "login answered at once, upstream not contacted");
                return Routed {
                    backend: Some(name.clone()),
                    result: Err(MaildropError::busy(
                        signal,
                        format!("{reason}, not asked upstream"),
                    )),
                    gated: None,
                };
            }
        }
        let result = self
            .open(
                name,
                backend,
                &route.login,
                credential,
                view_login.as_deref(),
            )
            .await;
        if let (Err(MaildropError::Busy { signal, .. }), Some(g)) = (&result, &gated) {
            g.pressure(*signal);
        }
        Routed {
            backend: Some(name.clone()),
            result,
            gated,
        }
    }
}

/// The view form of an upstream login (`recent:` + the login the backend is sent): the key of
/// the view's own lock, whatever case the client wrote the prefix in.
fn view_form(views: &Option<(String, ViewDele)>, login: &str) -> Option<String> {
    views.as_ref().map(|(prefix, _)| format!("{prefix}{login}"))
}

#[cfg(test)]
mod view_tests {
    use super::*;

    #[test]
    fn view_logins_name_their_account() {
        assert_eq!(view_account("recent:", "recent:alice"), Some("alice"));
        assert_eq!(view_account("recent:", "RECENT:alice"), Some("alice"));
        assert_eq!(view_account("recent:", "recent:"), None);
        assert_eq!(view_account("recent:", "alice"), None);
        assert_eq!(view_account("recent:", "ré"), None);
        assert_eq!(
            view_form(&Some(("recent:".into(), ViewDele::Nothing)), "alice").as_deref(),
            Some("recent:alice")
        );
    }
}
