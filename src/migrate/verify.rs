//! `popbridge migrate verify`: what the legacy server shows a user against what popbridge
//! would show them (count, UIDLs, sizes, message bytes), with popbridge's view taken in-process
//! through the same upstream, snapshot and UIDL code `serve` uses.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::journal::Class;
use super::matcher::without_skipped_headers;
use super::report::{Difference, LoginsUsed, Note, SizeDiff, UserOutcome, VerifyReport};
use super::users::{credential, imap_backend, legacy_session, master, pop3_backend};
use super::users::{Logins, UserSpec};
use super::wave::{Gates, WaveJob};
use super::{Credential, MigrateError, MAX_MESSAGE};
use crate::config::{Config, ImapConfig, Pop3BackendConfig, SharedMap};
use crate::maildrop::imap::ImapUpstream;
use crate::maildrop::{Maildrop, Mailstore};
use crate::state::StateStore;
use crate::uidl::UidlFormat;
use crate::upstream::pop3::ListedMessage;

/// What a POP3 client would see of one message: its UIDL, LIST size, and the length and
/// SHA-256 of its bytes (CRLF line ends, ending in CRLF, unstuffed), computed as each message
/// is read so that only one message is in memory at a time; plus the SHA-256 of those bytes
/// without the headers servers add or rewrite (to tell such a difference from a real one).
#[derive(Debug, Clone)]
struct Seen {
    uidl: String,
    size: u64,
    len: usize,
    sha256: [u8; 32],
    sha256_unskipped: [u8; 32],
}

impl Seen {
    fn new(uidl: String, size: u64, bytes: &[u8]) -> Seen {
        let digest = |b: &[u8]| {
            let mut out = [0u8; 32];
            out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
            out
        };
        Seen {
            uidl,
            size,
            len: bytes.len(),
            sha256: digest(bytes),
            sha256_unskipped: digest(&without_skipped_headers(bytes)),
        }
    }
}

/// CRLF line ends and a final CRLF: what a POP3 client receives after unstuffing.
fn pop3_form(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32 + 2);
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' && (i == 0 || bytes[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Compares the legacy server's view with popbridge's (both in POP3 order) and lists every
/// difference. A LIST size that differs while the bytes are identical is only a note (servers
/// differ in how they count line ends, and clients key on UIDLs, not sizes); see README.
fn compare(legacy: &[Seen], bridge: &[Seen]) -> (Vec<Difference>, Vec<Note>) {
    let mut diffs = Vec::new();
    let mut notes = Vec::new();
    if legacy.len() != bridge.len() {
        diffs.push(Difference::Count {
            legacy: legacy.len(),
            bridge: bridge.len(),
        });
    }
    let by_uidl: HashMap<&str, (usize, &Seen)> = bridge
        .iter()
        .enumerate()
        .map(|(i, s)| (s.uidl.as_str(), (i, s)))
        .collect();
    let legacy_uidls: HashSet<&str> = legacy.iter().map(|s| s.uidl.as_str()).collect();
    for (i, l) in legacy.iter().enumerate() {
        let uidl = || l.uidl.clone();
        match by_uidl.get(l.uidl.as_str()) {
            None => diffs.push(Difference::Missing {
                number: i + 1,
                uidl: uidl(),
            }),
            Some((j, b)) => {
                let header_only = l.sha256 != b.sha256 && l.sha256_unskipped == b.sha256_unskipped;
                if header_only {
                    notes.push(Note::HeadersOnly { uidl: uidl() });
                } else if l.sha256 != b.sha256 {
                    diffs.push(Difference::Bytes {
                        uidl: uidl(),
                        legacy_len: l.len,
                        bridge_len: b.len,
                    });
                } else if l.size != b.size {
                    notes.push(Note::ListSize {
                        uidl: uidl(),
                        legacy: l.size,
                        bridge: b.size,
                    });
                }
                if i != *j {
                    notes.push(Note::Order {
                        uidl: uidl(),
                        legacy: i + 1,
                        bridge: j + 1,
                    });
                }
            }
        }
    }
    for (j, b) in bridge.iter().enumerate() {
        if !legacy_uidls.contains(b.uidl.as_str()) {
            diffs.push(Difference::Extra {
                number: j + 1,
                uidl: b.uidl.clone(),
            });
        }
    }
    (diffs, notes)
}

/// `migrate verify` as the work of a wave ([`super::wave`]): [`VerifyJob::start`] checks the
/// backends and sets up popbridge's own view of the new store (once for the wave); each user
/// is then compared on their own.
pub struct VerifyJob {
    from: String,
    to: String,
    legacy: Pop3BackendConfig,
    imap: ImapConfig,
    legacy_master: Option<Credential>,
    logins: Logins,
    upstream: ImapUpstream,
    format: UidlFormat,
}

impl VerifyJob {
    /// Users on the legacy backend `from` against popbridge's view of the new store `to`.
    pub fn start(
        config: Arc<Config>,
        from: &str,
        to: &str,
        logins: Logins,
    ) -> Result<Arc<VerifyJob>, MigrateError> {
        let legacy = pop3_backend(&config, from)?.clone();
        let imap = imap_backend(&config, to)?.clone();
        let legacy_master = master(&legacy.master_user, &legacy.master_password_file)?;
        let state = StateStore::open(&config.state.dir).ok().map(Arc::new);
        if state.is_none() && config.migration.shared_map == SharedMap::None {
            return Err(MigrateError::NoMapToRead);
        }
        let upstream = ImapUpstream::new(
            &imap,
            &config.deletion,
            state,
            &crate::state::state_prefix(to),
            config.migration.shared_map == SharedMap::Metadata,
        )
        .map_err(MigrateError::BridgeSetup)?;
        let format = UidlFormat::parse(
            imap.uidl_format
                .as_deref()
                .unwrap_or(&config.pop3.uidl_format),
        )
        .map_err(MigrateError::UidlFormat)?;
        Ok(Arc::new(VerifyJob {
            from: from.to_owned(),
            to: to.to_owned(),
            legacy,
            imap,
            legacy_master,
            logins,
            upstream,
            format,
        }))
    }

    /// Whether `spec` can be verified at all: credentials on the legacy side, and on the new
    /// side a password unless the new store has a master user.
    pub fn check_credentials(&self, spec: &UserSpec) -> Result<(), MigrateError> {
        credential(&self.legacy_master, spec, "legacy")?;
        self.bridge_password(spec).map(|_| ())
    }

    fn bridge_password(&self, spec: &UserSpec) -> Result<String, MigrateError> {
        // popbridge, in-process: the same upstream, snapshot and UIDL code `serve` uses. With a
        // master user on the new store, `serve` logs in as that master user after another
        // backend checked the client's password; verify is an operator tool and skips that
        // check.
        match (&spec.password, &self.imap.master_user) {
            (_, Some(_)) => Ok(String::new()),
            (Some(p), None) => Ok(p.clone()),
            (None, None) => Err(MigrateError::Usage(format!(
                "verify logs in to the new store like a POP3 session does, with {}'s password (--password-env, or the users file), unless that backend has a master_user",
                spec.user
            ))),
        }
    }

    /// Reads every message of `spec` from both sides and compares.
    async fn verify_user(
        &self,
        spec: &UserSpec,
        logins: LoginsUsed,
        gates: &Gates,
    ) -> Result<VerifyReport, MigrateError> {
        let credential = credential(&self.legacy_master, spec, "legacy")?;
        let password = self.bridge_password(spec)?;
        let from_login = logins.legacy.as_ref().map_or("", |b| &b.login);
        let to_login = &logins.new.login;

        // The legacy server, as a client sees it.
        let permit = gates.legacy().await;
        let mut pop = legacy_session(&self.legacy, from_login, &credential).await?;
        let listed: Vec<ListedMessage> = pop.listing().await?;
        let mut legacy = Vec::with_capacity(listed.len());
        for m in &listed {
            let bytes = pop.retr(m.number, MAX_MESSAGE).await?;
            legacy.push(Seen::new(m.uidl.clone(), m.size, &bytes));
        }
        pop.quit().await;
        drop(permit);

        let _permit = gates.new_store().await;
        let mut md = self
            .upstream
            .login(to_login, crate::maildrop::Credential::Password(&password))
            .await
            .map_err(MigrateError::Bridge)?;
        let snapshot = md.snapshot().await.map_err(MigrateError::Bridge)?;
        let chunk = self.imap.fetch_chunk_bytes;
        let mut bridge = Vec::with_capacity(snapshot.messages.len());
        let mut size_diffs = Vec::new();
        for m in &snapshot.messages {
            let mut raw = Vec::new();
            loop {
                let piece = md
                    .fetch(m.uid, raw.len() as u64, chunk)
                    .await
                    .map_err(|source| MigrateError::BridgeFetch { uid: m.uid, source })?;
                if piece.is_empty() {
                    break;
                }
                raw.extend_from_slice(&piece);
                if raw.len() > MAX_MESSAGE || piece.len() < chunk as usize {
                    break;
                }
            }
            if raw.len() as u64 != m.size {
                size_diffs.push(SizeDiff {
                    uid: m.uid,
                    listed: m.size,
                    delivered: raw.len(),
                });
            }
            bridge.push(Seen::new(
                snapshot.uidl(m.uid, &self.format),
                m.size,
                &pop3_form(&raw),
            ));
        }
        md.close().await;
        let (diffs, notes) = compare(&legacy, &bridge);
        Ok(VerifyReport {
            logins,
            legacy_messages: legacy.len(),
            size_diffs,
            notes,
            diffs,
        })
    }
}

impl WaveJob for VerifyJob {
    type Item = UserSpec;
    type Report = VerifyReport;

    fn login(item: &UserSpec) -> &str {
        &item.user
    }

    fn class(r: &VerifyReport) -> Class {
        if r.clean() {
            Class::Clean
        } else {
            Class::Attention
        }
    }

    async fn run(self: Arc<Self>, spec: &UserSpec, gates: &Gates) -> UserOutcome<VerifyReport> {
        let logins = self.logins.used(Some(&self.from), &self.to, &spec.user);
        let result = self.verify_user(spec, logins, gates).await;
        UserOutcome {
            user: spec.user.clone(),
            warnings: Vec::new(),
            result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(uidl: &str, size: u64, bytes: &[u8]) -> Seen {
        Seen::new(uidl.into(), size, bytes)
    }

    #[test]
    fn compare_reports_every_kind_of_difference() {
        let l = vec![
            seen("a", 5, b"x\r\n"),
            seen("b", 5, b"y\r\n"),
            seen("c", 5, b"z\r\n"),
        ];
        let same = l.clone();
        assert_eq!(compare(&l, &same), (vec![], vec![]));
        // An added Return-Path is what servers do: a note, not a difference.
        let mut rp = l.clone();
        rp[1] = seen("b", 24, b"Return-Path: <a@b>\r\ny\r\n");
        let (d, n) = compare(&l, &rp);
        assert!(d.is_empty() && n.len() == 1, "{d:?} {n:?}");
        // Size counting differs but bytes are equal: a note only.
        let mut sized = l.clone();
        sized[0].size = 4;
        let (d, n) = compare(&l, &sized);
        assert!(d.is_empty() && n.len() == 1, "{d:?} {n:?}");
        // Altered bytes, a missing UIDL, an extra one, a count mismatch.
        let b = vec![
            seen("a", 5, b"X\r\n"),
            seen("c", 5, b"z\r\n"),
            seen("new", 5, b"n\r\n"),
            seen("b2", 1, b""),
        ];
        let (d, _) = compare(&l, &b);
        let d: Vec<String> = d.iter().map(|x| x.to_string()).collect();
        assert_eq!(d.len(), 5, "{d:#?}");
        assert!(d.iter().any(|x| x.contains("count")));
        assert!(d.iter().any(|x| x.contains("UIDL a: message bytes differ")));
        assert!(d.iter().any(|x| x.contains("(UIDL b) is missing")));
        assert!(d
            .iter()
            .any(|x| x.contains("(UIDL new) is not on the legacy")));
    }

    #[test]
    fn pop3_form_is_what_a_client_receives() {
        assert_eq!(pop3_form(b"a\nb"), b"a\r\nb\r\n");
        assert_eq!(pop3_form(b"a\r\nb\r\n"), b"a\r\nb\r\n");
        assert_eq!(pop3_form(b""), b"");
    }
}
