//! The login step of a POP3 connection: route the login, take the maildrop's lock, list it
//! under the lock, charge or clear the login penalty, count it, and hand a relayed login over.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::connection::{Conn, Flow, SessionOutcome};
use super::routed::{Opened, Upstream};
use super::session::LoginSecret;
use crate::maildrop::{Credential, Maildrop, MaildropError};
use crate::metrics::metrics;

impl<IO, U> Conn<'_, IO, U>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    U: Upstream,
{
    /// `USER`/`PASS` or `AUTH` asked to log in as `user`.
    pub(super) async fn login(&mut self, user: String, secret: LoginSecret) -> Flow {
        let credential = match &secret {
            LoginSecret::Password(p) => Credential::Password(p.as_str()),
            LoginSecret::Bearer(t) => Credential::Bearer(t.as_str()),
        };
        let routed = self.upstream.route(&user, credential).await;
        let backend = routed.backend;
        let gated = routed.gated;
        let shown_backend = backend.as_deref().unwrap_or("-");
        let mut relayed = None;
        let result = match routed.result {
            Ok(Opened::Maildrop {
                maildrop: mut md,
                lock_key,
                uidl_format,
                fetch_chunk,
            }) => match self.locks.try_lock(&lock_key) {
                // The listing is taken under the lock: a session that committed and
                // released it a moment ago is already reflected upstream.
                Some(lock) => match md.snapshot().await {
                    Ok(snapshot) => {
                        info!(user = %user, backend = shown_backend, maildrop = %lock_key, messages = snapshot.messages.len(), "pop3 login");
                        if let Some(chunk) = fetch_chunk {
                            self.fetch_chunk = chunk;
                        }
                        if let Some(format) = uidl_format {
                            self.session.set_uidl_format(format);
                        }
                        if let Some(g) = &gated {
                            g.logged_in();
                            self.session.set_user_policy(g.policy);
                        }
                        self.user = Some(user.clone());
                        self.maildrop = Some((md, lock));
                        Ok(Some(snapshot))
                    }
                    Err(e) => {
                        info!(user = %user, maildrop = %lock_key, error = %crate::errors::Chain(&e), "pop3 login failed: listing");
                        if let (MaildropError::Busy { signal, .. }, Some(g)) = (&e, &gated) {
                            g.pressure(*signal);
                        }
                        md.close().await;
                        Err(e)
                    }
                },
                None => {
                    info!(user = %user, maildrop = %lock_key, "pop3 login refused: maildrop in use");
                    md.close().await;
                    Err(MaildropError::InUse)
                }
            },
            Ok(Opened::Relay(up)) => {
                info!(user = %user, backend = shown_backend, "pop3 login relayed to legacy server");
                if let Some(g) = &gated {
                    g.logged_in();
                }
                self.user = Some(user.clone());
                relayed = Some(up);
                Ok(None)
            }
            Err(e) => {
                info!(user = %user, backend = shown_backend, error = %crate::errors::Chain(&e), "pop3 login failed");
                Err(e)
            }
        };
        if let Some(penalty) = &self.tls.penalty {
            // A per-device view's failures count against its account.
            let account = self.upstream.account(&user);
            match &result {
                Ok(_) => penalty.succeeded(self.tls.peer, account),
                Err(MaildropError::Auth) => {
                    let (delay, failures) = penalty.failed(self.tls.peer, account);
                    if !delay.is_zero() {
                        info!(user = %user, failures, delay_ms = delay.as_millis() as u64, "login penalty");
                        tokio::time::sleep(delay).await;
                    }
                }
                Err(_) => {}
            }
        }
        drop(secret);
        let label = result
            .as_ref()
            .map_or_else(MaildropError::login_label, |_| "ok");
        let m = metrics();
        m.logins.with_label_values(&[label]).inc();
        if let Some(b) = &backend {
            m.backend_logins.with_label_values(&[b, label]).inc();
        }
        if let Some(user) = &self.user {
            tracing::Span::current().record("user", user.as_str());
        }
        if result.is_ok() {
            // FETCH-time pressure is reported to the gate too.
            self.gated = gated;
        }
        if let Some(up) = relayed {
            // The legacy server's own +OK line: from here on the client talks to it.
            self.emit(&up.ok_line);
            return match self.flush().await {
                Ok(()) => Flow::Relay(up, backend.unwrap_or_else(|| Arc::from("-"))),
                Err(o) => Flow::End(o),
            };
        }
        let result = result.map(Option::unwrap_or_default);
        let reply = self.session.on_login(result);
        self.emit(&reply.bytes);
        if reply.close {
            Flow::EndAfterFlush(SessionOutcome::TooManyErrors)
        } else {
            Flow::Continue
        }
    }
}
