//! The RFC 2449 policy a POP3 session advertises in CAPA: `LOGIN-DELAY` (the least time
//! between two logins of one user, enforced by [`crate::limits::LoginGate`]) and `EXPIRE`
//! (how long mail left on the server is kept). Each backend has its own; before login, when
//! they differ, CAPA shows the strictest with `USER`, and after login the user's own.

use std::fmt;

/// RFC 2449 `EXPIRE`: the least number of days mail a client leaves on the server is kept.
/// Ordered from the strictest: `Days(0)` < `Days(n)` < `Never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Expire {
    Days(u32),
    Never,
}

impl fmt::Display for Expire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expire::Days(d) => write!(f, "{d}"),
            Expire::Never => f.write_str("NEVER"),
        }
    }
}

/// One backend's policy: what a user of it is shown after login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPolicy {
    /// Seconds; 0 means none.
    pub login_delay_secs: u64,
    pub expire: Expire,
}

impl Default for UserPolicy {
    fn default() -> Self {
        UserPolicy {
            login_delay_secs: 0,
            expire: Expire::Never,
        }
    }
}

/// What CAPA says before login, over every backend a login may be routed to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertised {
    /// The delay, and whether it differs per user. `None`: no backend has one.
    pub login_delay: Option<(u64, bool)>,
    /// The retention, and whether it differs per user. `None`: not advertised at all.
    pub expire: Option<(Expire, bool)>,
}

impl Advertised {
    /// Over the policies of every backend. Where they differ, the strictest value is shown
    /// with `USER` (RFC 2449 6.5 and 6.7): the longest delay (a client that waits that long
    /// is never refused) and the shortest retention (a client that trusts it loses nothing).
    pub fn over(policies: impl IntoIterator<Item = UserPolicy>) -> Advertised {
        let all: Vec<UserPolicy> = policies.into_iter().collect();
        let Some(first) = all.first() else {
            return Advertised::default();
        };
        let delays_differ = all
            .iter()
            .any(|p| p.login_delay_secs != first.login_delay_secs);
        let longest = all.iter().map(|p| p.login_delay_secs).max().unwrap_or(0);
        let expire_differs = all.iter().any(|p| p.expire != first.expire);
        let shortest = all.iter().map(|p| p.expire).min().unwrap_or(Expire::Never);
        Advertised {
            login_delay: (longest > 0).then_some((longest, delays_differ)),
            expire: Some((shortest, expire_differs)),
        }
    }

    /// The CAPA lines: before login (`user` is `None`) this advertisement, after login the
    /// user's own values (then without `USER`).
    pub fn capa_lines(&self, user: Option<UserPolicy>) -> Vec<String> {
        let mut lines = Vec::new();
        match user {
            Some(p) => {
                if self.login_delay.is_some() {
                    lines.push(format!("LOGIN-DELAY {}", p.login_delay_secs));
                }
                if self.expire.is_some() {
                    lines.push(format!("EXPIRE {}", p.expire));
                }
            }
            None => {
                let user = |differs: bool| if differs { " USER" } else { "" };
                if let Some((secs, differs)) = self.login_delay {
                    lines.push(format!("LOGIN-DELAY {secs}{}", user(differs)));
                }
                if let Some((expire, differs)) = self.expire {
                    lines.push(format!("EXPIRE {expire}{}", user(differs)));
                }
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(secs: u64, expire: Expire) -> UserPolicy {
        UserPolicy {
            login_delay_secs: secs,
            expire,
        }
    }

    #[test]
    fn one_policy_everywhere_has_no_user_argument() {
        let a = Advertised::over([p(0, Expire::Never), p(0, Expire::Never)]);
        assert_eq!(a.capa_lines(None), vec!["EXPIRE NEVER"]);
        let a = Advertised::over([p(300, Expire::Days(30))]);
        assert_eq!(a.capa_lines(None), vec!["LOGIN-DELAY 300", "EXPIRE 30"]);
        assert_eq!(
            a.capa_lines(Some(p(300, Expire::Days(30)))),
            vec!["LOGIN-DELAY 300", "EXPIRE 30"]
        );
    }

    #[test]
    fn differing_policies_show_the_strictest_with_user_then_the_users_own() {
        let a = Advertised::over([
            p(0, Expire::Never),
            p(600, Expire::Days(7)),
            p(60, Expire::Never),
        ]);
        assert_eq!(
            a.capa_lines(None),
            vec!["LOGIN-DELAY 600 USER", "EXPIRE 7 USER"]
        );
        assert_eq!(
            a.capa_lines(Some(p(0, Expire::Never))),
            vec!["LOGIN-DELAY 0", "EXPIRE NEVER"]
        );
    }

    #[test]
    fn nothing_configured_advertises_nothing() {
        assert!(Advertised::default().capa_lines(None).is_empty());
        assert!(Advertised::default()
            .capa_lines(Some(p(5, Expire::Days(1))))
            .is_empty());
        assert!(Expire::Days(0) < Expire::Days(3) && Expire::Days(3) < Expire::Never);
    }
}
