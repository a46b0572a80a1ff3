//! `popbridge migrate uidls`: for each user of a wave, match the legacy POP3 messages to the
//! new store's ([`super::matcher`]), merge the matches into the existing map copies and store
//! the result, unless a legacy message would show a changed UIDL.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::copies::{self, existing_map, open_state, store_map};
use super::journal::Class;
use super::matcher::{header_hash, match_by_size, match_by_x_uidl, match_rest, x_uidl};
use super::matcher::{LegacyMessage, MatchedBy};
use super::report::{Conflict, LoginsUsed, Stored, UidlsReport, UserOutcome, Verdict, Warning};
use super::report::{LegacyWithoutCopy, NewWithoutLegacy, Policies};
use super::store::Store;
use super::users::{
    credential, imap_backend, legacy_session, master, pop3_backend, Logins, UserSpec,
};
use super::wave::{Gates, WaveJob};
use super::{Credential, MigrateError, MAX_HEADER, MAX_MESSAGE};
use crate::config::{Config, ImapConfig, Pop3BackendConfig};
use crate::state::StateStore;

/// Options of `migrate uidls`.
#[derive(Clone)]
pub struct UidlsOptions {
    pub from: String,
    pub to: String,
    pub accept_changed_uidls: bool,
    /// `--from-login` / `--to-login` templates (see [`Logins`]).
    pub from_login: Option<String>,
    pub to_login: Option<String>,
    /// Skip the size pass (the legacy POP3 sizes are known to be wrong): every message goes
    /// to the header pass.
    pub no_size_pass: bool,
    /// Pair by the `X-UIDL:` header of the new store's copies first (implies the header pass
    /// for every message).
    pub x_uidl: bool,
    pub policies: Policies,
}

/// `migrate uidls` as the work of a wave ([`super::wave`]): [`UidlsJob::start`] checks the
/// options; each user is then matched and their map stored (or refused) on its own.
pub struct UidlsJob {
    config: Arc<Config>,
    opts: UidlsOptions,
    legacy: Pop3BackendConfig,
    imap: ImapConfig,
    legacy_master: Option<Credential>,
    imap_master: Option<Credential>,
    logins: Logins,
    state: Option<StateStore>,
}

impl UidlsJob {
    /// Checks the backends, master users and login templates, and opens the local state;
    /// also why the local state is not updated, if it could not be opened.
    pub fn start(
        config: Arc<Config>,
        opts: UidlsOptions,
    ) -> Result<(Arc<UidlsJob>, Option<Warning>), MigrateError> {
        let legacy = pop3_backend(&config, &opts.from)?.clone();
        let imap = imap_backend(&config, &opts.to)?.clone();
        let legacy_master = master(&legacy.master_user, &legacy.master_password_file)?;
        let imap_master = master(&imap.master_user, &imap.master_password_file)?;
        let logins = Logins::new(&config, opts.from_login.clone(), opts.to_login.clone())?;
        let (state, state_warning) = match open_state(&config) {
            Ok(s) => (Some(s), None),
            Err(w) => (None, Some(w)),
        };
        let job = UidlsJob {
            config,
            opts,
            legacy,
            imap,
            legacy_master,
            imap_master,
            logins,
            state,
        };
        Ok((Arc::new(job), state_warning))
    }

    /// Flushes the local state (at the end of the wave).
    pub fn flush(&self) {
        if let Some(s) = &self.state {
            s.flush();
        }
    }
}

impl WaveJob for UidlsJob {
    type Item = UserSpec;
    type Report = UidlsReport;

    fn login(item: &UserSpec) -> &str {
        &item.user
    }

    fn class(r: &UidlsReport) -> Class {
        match r.verdict {
            // Changed UIDLs accepted on the command line: done as the operator asked.
            Verdict::Ok | Verdict::Accepted(_) => Class::Clean,
            Verdict::Refused(_) => Class::Attention,
        }
    }

    async fn run(self: Arc<Self>, spec: &UserSpec, gates: &Gates) -> UserOutcome<UidlsReport> {
        let logins = self
            .logins
            .used(Some(&self.opts.from), &self.opts.to, &spec.user);
        let mut warnings = Vec::new();
        let result = async {
            let lc = credential(&self.legacy_master, spec, "legacy")?;
            let ic = credential(&self.imap_master, spec, "new")?;
            self.migrate_user(logins, &lc, &ic, gates, &mut warnings)
                .await
        }
        .await;
        UserOutcome {
            user: spec.user.clone(),
            warnings,
            result,
        }
    }
}

impl UidlsJob {
    async fn migrate_user(
        &self,
        logins: LoginsUsed,
        lc: &Credential,
        ic: &Credential,
        gates: &Gates,
        warnings: &mut Vec<Warning>,
    ) -> Result<UidlsReport, MigrateError> {
        let (config, accept, state) = (
            &*self.config,
            self.opts.accept_changed_uidls,
            self.state.as_ref(),
        );
        let from_login = logins.legacy.as_ref().map_or("", |b| &b.login).to_owned();
        let to_login = logins.new.login.clone();
        let to_login = to_login.as_str();
        let legacy_permit = gates.legacy().await;
        let mut pop = legacy_session(&self.legacy, &from_login, lc).await?;
        let listed = pop.listing().await?;
        let _new_permit = gates.new_store().await;
        let mut store = Store::open(&self.imap, to_login, ic).await?;
        store.v2_user = copies::v2_user(&self.opts.to, to_login);
        let new = store.messages().await?;
        let legacy: Vec<LegacyMessage> = listed
            .iter()
            .map(|m| LegacyMessage {
                uidl: m.uidl.clone(),
                size: m.size,
            })
            .collect();
        let x_mode = self.opts.x_uidl;
        let sized = if self.opts.no_size_pass || x_mode {
            0
        } else {
            match_by_size(&legacy, &new)
        };
        let (mut lh, mut nh) = (Vec::new(), Vec::new());
        let mut x_uidls: HashMap<u32, String> = HashMap::new();
        if sized < legacy.len() || sized < new.len() {
            for m in &listed[sized.min(listed.len())..] {
                let mut hash = header_hash(&pop.top0(m.number, MAX_HEADER).await?);
                if !hash.complete {
                    hash = header_hash(&pop.retr(m.number, MAX_MESSAGE).await?);
                }
                lh.push(Some(hash));
            }
            let rest: Vec<u32> = new[sized.min(new.len())..].iter().map(|m| m.uid).collect();
            // Hashed as each header (or whole message) arrives: only hashes are kept.
            let mut incomplete = Vec::new();
            let mut hashes: HashMap<u32, _> = HashMap::new();
            store
                .each_section(&rest, false, |uid, header| {
                    if x_mode {
                        if let Some(x) = x_uidl(header) {
                            x_uidls.insert(uid, x);
                        }
                    }
                    let hash = header_hash(header);
                    if hash.complete {
                        hashes.insert(uid, hash);
                    } else {
                        incomplete.push(uid);
                    }
                })
                .await?;
            if !incomplete.is_empty() {
                store
                    .each_section(&incomplete, true, |uid, body| {
                        hashes.insert(uid, header_hash(body));
                    })
                    .await?;
            }
            nh = rest.iter().map(|u| hashes.get(u).copied()).collect();
        }
        pop.quit().await;
        drop(legacy_permit);
        // X-UIDL pairs first (sized is 0 then: the hashes are index-aligned with the lists),
        // the header hashes for the rest.
        let new_x: Vec<Option<String>> = new.iter().map(|m| x_uidls.get(&m.uid).cloned()).collect();
        let x_pairs = if x_mode {
            match_by_x_uidl(&legacy, &new_x)
        } else {
            Vec::new()
        };
        for &(i, j) in &x_pairs {
            lh[i] = None;
            nh[j] = None;
        }
        let mut matching = match_rest(&legacy, &new, sized, &lh, &nh);
        if !x_pairs.is_empty() {
            let paired_legacy: HashSet<usize> = x_pairs.iter().map(|p| p.0).collect();
            let paired_new: HashSet<u32> = x_pairs.iter().map(|p| new[p.1].uid).collect();
            matching
                .unmatched_legacy
                .retain(|i| !paired_legacy.contains(i));
            matching.unmatched_new.retain(|u| !paired_new.contains(u));
            matching.matched.extend(
                x_pairs
                    .iter()
                    .map(|&(i, j)| (i, new[j].uid, MatchedBy::XUidl)),
            );
            matching.matched.sort_by_key(|m| m.0);
        }

        let shared = copies::shared(config, &store);
        let existing = existing_map(state, &mut store, shared).await?;
        let mut map = existing.merged.clone();
        let mut report = UidlsReport {
            logins,
            legacy: legacy.len(),
            new: new.len(),
            by_size: 0,
            by_header: 0,
            by_x_uidl: 0,
            unmatched_legacy: matching
                .unmatched_legacy
                .iter()
                .map(|&i| legacy[i].uidl.clone())
                .collect(),
            unmatched_new: matching.unmatched_new.len(),
            duplicates: (matching.duplicate_legacy, matching.duplicate_new),
            conflicts: existing.conflicts.clone(),
            stored: Stored::Nowhere,
            verdict: Verdict::Ok,
        };
        for &(li, uid, by) in &matching.matched {
            match by {
                MatchedBy::Size => report.by_size += 1,
                MatchedBy::Header => report.by_header += 1,
                MatchedBy::XUidl => report.by_x_uidl += 1,
            }
            if let Err(error) = map.insert(uid, &legacy[li].uidl) {
                report.conflicts.push(Conflict::Match {
                    uid,
                    uidl: legacy[li].uidl.clone(),
                    error,
                });
            }
        }
        // What the policies refuse (a legacy message without a copy, a new-store message
        // without a legacy one), and kept mappings.
        let p = self.opts.policies;
        let changed = report.conflicts.len()
            + if p.legacy_without_copy == LegacyWithoutCopy::Refuse {
                report.unmatched_legacy.len()
            } else {
                0
            }
            + if p.new_without_legacy == NewWithoutLegacy::Refuse {
                report.unmatched_new
            } else {
                0
            };
        report.verdict = Verdict::of(changed, accept);
        if let Verdict::Refused(_) = report.verdict {
            store.logout().await;
            return Ok(report);
        }
        report.stored = if existing.must_store(&map, shared, state.is_some()) {
            store_map(config, state, &mut store, to_login, &map, warnings).await?
        } else {
            Stored::Unchanged
        };
        store.logout().await;
        Ok(report)
    }
}
