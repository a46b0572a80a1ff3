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
        let imap = |c: &super::ImapConfig| {
            (
                c.login_delay_secs,
                c.expire_days,
                c.retention_days.filter(|&d| d > 0),
            )
        };
        let (delay, declared, retention) = if backend == DEFAULT_BACKEND {
            imap(&self.imap)
        } else {
            match self.backends.get(backend) {
                Some(BackendConfig::Imap(c)) => imap(c),
                Some(BackendConfig::Pop3(c)) => (c.login_delay_secs, c.expire_days, None),
                None => (None, None, None),
            }
        };
        UserPolicy {
            login_delay_secs: delay.unwrap_or(self.limits.login_delay_secs),
            expire: expire(self.deletion.mode, retention, declared),
        }
    }

    /// The policy of a per-device view login (`recent:alice`) at `backend`, when it offers
    /// the view: its own LOGIN-DELAY (counted apart from the account's, so a phone in the
    /// view and a desktop polling the account do not hold each other back), and EXPIRE no
    /// longer than the view's `recent_days`: older mail leaves the view's listing.
    pub fn view_policy(&self, backend: &str) -> Option<UserPolicy> {
        let c = if backend == DEFAULT_BACKEND {
            &self.imap
        } else {
            match self.backends.get(backend) {
                Some(BackendConfig::Imap(c)) => c,
                _ => return None,
            }
        };
        let days = c.recent_days.unwrap_or(self.views.recent_days);
        if days == 0 {
            return None;
        }
        let account = self.user_policy(backend);
        Some(UserPolicy {
            expire: account.expire.min(Expire::Days(days)),
            ..account
        })
    }

    /// What CAPA shows before login, over every backend (and its view, if any).
    pub fn advertised_policy(&self) -> Advertised {
        let names =
            std::iter::once(DEFAULT_BACKEND).chain(self.backends.keys().map(|k| k.as_str()));
        Advertised::over(
            names.flat_map(|n| std::iter::once(self.user_policy(n)).chain(self.view_policy(n))),
        )
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
    use super::super::fixtures::MINIMAL;
    use super::*;
    use std::path::Path;

    fn parse(extra: &str) -> Result<Config, super::super::ConfigError> {
        Config::parse(Path::new("t.toml"), &format!("{MINIMAL}\n{extra}"))
    }

    #[test]
    fn keys_default_are_checked_and_name_the_key() {
        let c = parse("").unwrap();
        assert_eq!(c.limits.login_delay_secs, 0);
        assert_eq!(
            (c.limits.backoff_base_secs, c.limits.backoff_max_secs),
            (5, 300)
        );
        assert!(!c.imap.forward_client_address);
        assert_eq!(c.user_policy("imap"), UserPolicy::default());
        assert_eq!(c.advertised_policy().capa_lines(None), vec!["EXPIRE NEVER"]);
        for (extra, key) in [
            (
                "[limits]\nbackoff_base_secs = 0",
                "limits.backoff_base_secs",
            ),
            (
                "[limits]\nbackoff_base_secs = 10\nbackoff_max_secs = 5",
                "limits.backoff_max_secs",
            ),
            (
                "[limits]\nlogin_delay_secs = 90000",
                "limits.login_delay_secs",
            ),
            (
                "[backends.b]\nkind = \"pop3\"\nhost = \"h\"\nlogin_delay_secs = 90000",
                "backends.b.login_delay_secs",
            ),
        ] {
            let e = parse(extra).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(e.to_string().contains("t.toml"), "{e}");
        }
    }

    #[test]
    fn a_view_expires_after_its_days_and_shows_in_capa_before_login() {
        let c = parse(
            "[views]\nrecent_days = 14\n\
             [backends.b]\nkind = \"imap\"\nhost = \"h\"\nexpire_days = 30",
        )
        .unwrap();
        assert_eq!(c.view_policy("b").unwrap().expire, Expire::Days(14));
        assert_eq!(c.user_policy("b").expire, Expire::Days(30));
        assert_eq!(c.view_policy("imap").unwrap().expire, Expire::Days(14));
        assert_eq!(
            c.advertised_policy().capa_lines(None),
            vec!["EXPIRE 14 USER"]
        );
        assert_eq!(parse("").unwrap().view_policy("imap"), None);
        // Retention of hidden mail removes nothing a client left: still NEVER.
        let c = parse("[deletion]\nretention_days = 30").unwrap();
        assert_eq!(c.user_policy("imap").expire, Expire::Never);
    }

    #[test]
    fn a_backend_overrides_the_global_delay_and_declares_its_expiry() {
        let c = parse(
            "[limits]\nlogin_delay_secs = 60\n\
             [backends.b]\nkind = \"imap\"\nhost = \"h\"\nlogin_delay_secs = 0\nexpire_days = 7",
        )
        .unwrap();
        assert_eq!(c.user_policy("imap").login_delay_secs, 60);
        assert_eq!(
            c.user_policy("b"),
            UserPolicy {
                login_delay_secs: 0,
                expire: Expire::Days(7)
            }
        );
        assert_eq!(
            c.advertised_policy().capa_lines(None),
            vec!["LOGIN-DELAY 60 USER", "EXPIRE 7 USER"]
        );
    }

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
