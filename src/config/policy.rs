//! The RFC 2449 policy each backend shows and enforces: LOGIN-DELAY (`login_delay_secs`, per
//! backend over `limits.login_delay_secs`) and EXPIRE ([`expire`]), and the checks of the
//! backoff keys in `[limits]`.

use super::{BackendConfig, Config, DeletionMode, DEFAULT_BACKEND};
use crate::pop3::policy::{Advertised, Expire, UserPolicy};

/// Longest LOGIN-DELAY accepted: a day.
const MAX_LOGIN_DELAY_SECS: u64 = 86_400;

/// RFC 2449 EXPIRE of one backend: the least time mail a POP3 client leaves on the server
/// (never DELEs) stays there.
///
/// popbridge removes only what a client's QUIT committed: `deletion.mode` (expunge, move,
/// hide) decides what a DELE does, and retention of hidden mail (`retention_days`) only
/// removes mail a DELE already took out of every POP3 listing. Neither ever removes mail a
/// client left, so the answer is `NEVER` unless the operator declares that the store expires
/// mail itself (`declared_days`: an autoexpunge, a provider's policy).
pub fn expire(
    _deletion: DeletionMode,
    _retention_days: Option<u32>,
    declared_days: Option<u32>,
) -> Expire {
    declared_days.map_or(Expire::Never, Expire::Days)
}

impl Config {
    /// The LOGIN-DELAY and EXPIRE of users routed to `backend` (`imap` for `[imap]`).
    pub fn user_policy(&self, backend: &str) -> UserPolicy {
        let (delay, declared) = if backend == DEFAULT_BACKEND {
            (self.imap.login_delay_secs, self.imap.expire_days)
        } else {
            match self.backends.get(backend) {
                Some(BackendConfig::Imap(c)) => (c.login_delay_secs, c.expire_days),
                Some(BackendConfig::Pop3(c)) => (c.login_delay_secs, c.expire_days),
                None => (None, None),
            }
        };
        UserPolicy {
            login_delay_secs: delay.unwrap_or(self.limits.login_delay_secs),
            expire: expire(self.deletion.mode, None, declared),
        }
    }

    /// What CAPA shows before login, over every backend.
    pub fn advertised_policy(&self) -> Advertised {
        let names =
            std::iter::once(DEFAULT_BACKEND).chain(self.backends.keys().map(|k| k.as_str()));
        Advertised::over(names.map(|n| self.user_policy(n)))
    }

    pub(super) fn validate_policy(&self) -> Result<(), (String, String)> {
        let l = &self.limits;
        if l.backoff_base_secs == 0 {
            return Err((
                "limits.backoff_base_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if l.backoff_max_secs < l.backoff_base_secs {
            return Err((
                "limits.backoff_max_secs".into(),
                "must not be less than limits.backoff_base_secs".into(),
            ));
        }
        let delays = [
            ("limits".to_owned(), Some(l.login_delay_secs)),
            ("imap".to_owned(), self.imap.login_delay_secs),
        ]
        .into_iter()
        .chain(self.backends.iter().map(|(n, b)| {
            let d = match b {
                BackendConfig::Imap(c) => c.login_delay_secs,
                BackendConfig::Pop3(c) => c.login_delay_secs,
            };
            (format!("backends.{n}"), d)
        }));
        for (prefix, delay) in delays {
            if delay.is_some_and(|d| d > MAX_LOGIN_DELAY_SECS) {
                return Err((
                    format!("{prefix}.login_delay_secs"),
                    format!("must be at most {MAX_LOGIN_DELAY_SECS} (a day)"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expire_is_never_unless_the_store_expires_mail_itself() {
        for mode in [
            DeletionMode::Hide,
            DeletionMode::Expunge,
            DeletionMode::Move,
        ] {
            assert_eq!(expire(mode, None, None), Expire::Never);
            assert_eq!(expire(mode, Some(30), None), Expire::Never);
            assert_eq!(expire(mode, None, Some(14)), Expire::Days(14));
        }
    }
}
