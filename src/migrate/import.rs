//! `popbridge migrate import`: the legacy server is gone, so the map comes from a file of
//! `user uid legacy-uidl` lines, checked whole before anything is stored, then merged into
//! each user's existing map copies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::copies::{self, existing_map, open_state, store_map};
use super::journal::Class;
use super::report::{Conflict, ImportReport, Stored, UserOutcome, Verdict, Warning};
use super::store::Store;
use super::users::{credential, imap_backend, master, Logins, UserSpec};
use super::wave::{Gates, WaveJob};
use super::{Credential, MigrateError};
use crate::config::{Config, ImapConfig};
use crate::state::StateStore;
use crate::uidl::map::is_legal_uidl;

/// One validated line of an import file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportLine {
    pub line: usize,
    pub user: String,
    pub uid: u32,
    pub uidl: String,
}

/// Parses and validates a whole import file (`user uid legacy-uidl` lines, blank lines and
/// `#` comments ignored): every error, each naming file:line, or the lines by user.
pub fn parse_import(
    path: &Path,
    text: &str,
) -> Result<BTreeMap<String, Vec<ImportLine>>, Vec<String>> {
    let mut errors = Vec::new();
    let mut by_user: BTreeMap<String, Vec<ImportLine>> = BTreeMap::new();
    let mut seen_uid: HashMap<(String, u32), usize> = HashMap::new();
    let mut seen_uidl: HashMap<(String, String), usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let at = format!("{}:{n}", path.display());
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 3 {
            errors.push(format!(
                "{at}: expected `user uid legacy-uidl`, found {} fields",
                fields.len()
            ));
            continue;
        }
        let user = fields[0].to_owned();
        let uid = match fields[1].parse::<u32>() {
            Ok(u) if u > 0 => u,
            _ => {
                errors.push(format!(
                    "{at}: UID {:?} is not a number from 1 to 4294967295",
                    fields[1]
                ));
                continue;
            }
        };
        let uidl = fields[2];
        if !is_legal_uidl(uidl) {
            errors.push(format!(
                "{at}: UIDL {uidl:?} is not 1-70 characters of 0x21-0x7E"
            ));
            continue;
        }
        if let Some(prev) = seen_uid.insert((user.to_lowercase(), uid), n) {
            errors.push(format!(
                "{at}: UID {uid} of {user} already given on line {prev}"
            ));
            continue;
        }
        if let Some(prev) = seen_uidl.insert((user.to_lowercase(), uidl.to_owned()), n) {
            errors.push(format!(
                "{at}: UIDL {uidl} of {user} already given on line {prev}"
            ));
            continue;
        }
        by_user.entry(user.clone()).or_default().push(ImportLine {
            line: n,
            user,
            uid,
            uidl: uidl.to_owned(),
        });
    }
    if errors.is_empty() {
        Ok(by_user)
    } else {
        Err(errors)
    }
}

/// Options of `migrate import`.
pub struct ImportOptions {
    /// The new store.
    pub to: String,
    /// The map file.
    pub file: PathBuf,
    /// Passwords of the file's users (for a backend without a master user).
    pub passwords: HashMap<String, String>,
    /// Store even when a line contradicts an existing mapping (the old one is kept).
    pub accept_changed_uidls: bool,
    /// `--to-login` template (see [`Logins`]).
    pub to_login: Option<String>,
}

/// One user of an import file: their lines, and their password if given.
pub struct ImportItem {
    pub user: String,
    pub lines: Vec<ImportLine>,
    pub password: Option<String>,
}

/// `migrate import` as the work of a wave ([`super::wave`]): [`ImportJob::start`] checks the
/// options and the whole file and returns the file's users; each user's map is then stored
/// on its own.
pub struct ImportJob {
    config: Arc<Config>,
    opts: ImportOptions,
    imap: ImapConfig,
    imap_master: Option<Credential>,
    logins: Logins,
    state: Option<StateStore>,
}

/// What [`ImportJob::start`] returns: the job, the file's users, and why the local state is
/// not updated, if it could not be opened.
pub type ImportStart = (Arc<ImportJob>, Vec<ImportItem>, Option<Warning>);

impl ImportJob {
    /// Checks the backend and login template, reads and checks the file (every bad line, with
    /// `file:line`), and opens the local state.
    pub fn start(
        config: Arc<Config>,
        mut opts: ImportOptions,
    ) -> Result<ImportStart, MigrateError> {
        let imap = imap_backend(&config, &opts.to)?.clone();
        let logins = Logins::new(&config, None, opts.to_login.clone())?;
        let text = std::fs::read_to_string(&opts.file).map_err(|source| MigrateError::Read {
            path: opts.file.clone(),
            source,
        })?;
        let by_user = parse_import(&opts.file, &text).map_err(MigrateError::ImportFile)?;
        let imap_master = master(&imap.master_user, &imap.master_password_file)?;
        let (state, state_warning) = match open_state(&config) {
            Ok(s) => (Some(s), None),
            Err(w) => (None, Some(w)),
        };
        let passwords = std::mem::take(&mut opts.passwords);
        let items = by_user
            .into_iter()
            .map(|(user, lines)| ImportItem {
                password: passwords.get(&user).cloned(),
                user,
                lines,
            })
            .collect();
        let job = ImportJob {
            config,
            opts,
            imap,
            imap_master,
            logins,
            state,
        };
        Ok((Arc::new(job), items, state_warning))
    }

    /// Flushes the local state (at the end of the wave).
    pub fn flush(&self) {
        if let Some(s) = &self.state {
            s.flush();
        }
    }
}

impl WaveJob for ImportJob {
    type Item = ImportItem;
    type Report = ImportReport;

    fn login(item: &ImportItem) -> &str {
        &item.user
    }

    fn class(r: &ImportReport) -> Class {
        match r.verdict {
            Verdict::Ok | Verdict::Accepted(_) => Class::Clean,
            Verdict::Refused(_) => Class::Attention,
        }
    }

    async fn run(self: Arc<Self>, item: &ImportItem, gates: &Gates) -> UserOutcome<ImportReport> {
        let mut warnings = Vec::new();
        let result = self.import_user(item, gates, &mut warnings).await;
        UserOutcome {
            user: item.user.clone(),
            warnings,
            result,
        }
    }
}

impl ImportJob {
    async fn import_user(
        &self,
        item: &ImportItem,
        gates: &Gates,
        warnings: &mut Vec<Warning>,
    ) -> Result<ImportReport, MigrateError> {
        let (config, opts, state) = (&*self.config, &self.opts, self.state.as_ref());
        let (user, lines) = (item.user.as_str(), item.lines.as_slice());
        let spec = UserSpec {
            user: user.to_owned(),
            password: item.password.clone(),
        };
        let logins = self.logins.used(None, &opts.to, user);
        let login = logins.new.login.clone();
        let cred = credential(&self.imap_master, &spec, "new")?;
        let _permit = gates.new_store().await;
        let mut store = Store::open(&self.imap, &login, &cred).await?;
        store.v2_user = copies::v2_user(&opts.to, &login);
        let present: HashSet<u32> = store.messages().await?.iter().map(|m| m.uid).collect();
        let shared = copies::shared(config, &store);
        let existing = existing_map(state, &mut store, shared).await?;
        let mut map = existing.merged.clone();
        let mut conflicts = existing.conflicts.clone();
        for l in lines {
            if !present.contains(&l.uid) {
                warnings.push(Warning::UidNotInMailbox {
                    file: opts.file.clone(),
                    line: l.line,
                    uid: l.uid,
                    user: user.to_owned(),
                });
            }
            if let Err(error) = map.insert(l.uid, &l.uidl) {
                conflicts.push(Conflict::ImportLine {
                    file: opts.file.clone(),
                    line: l.line,
                    error,
                });
            }
        }
        let mut report = ImportReport {
            logins,
            lines: lines.len(),
            verdict: Verdict::of(conflicts.len(), opts.accept_changed_uidls),
            conflicts,
            stored: Stored::Nowhere,
        };
        if let Verdict::Refused(_) = report.verdict {
            store.logout().await;
            return Ok(report);
        }
        report.stored = if existing.must_store(&map, shared, state.is_some()) {
            store_map(config, state, &mut store, &login, &map, warnings).await?
        } else {
            Stored::Unchanged
        };
        store.logout().await;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_files_are_validated_whole_with_file_and_line() {
        let p = Path::new("map.txt");
        let ok = parse_import(
            p,
            "# comment\nalice 3 1500.1\n\nalice 4 1500.2\nbob 3 1500.1\n",
        )
        .unwrap();
        assert_eq!(ok["alice"].len(), 2);
        assert_eq!(ok["bob"][0].line, 5);
        let errs = parse_import(
            p,
            "alice 3 1500.1\nalice 0 x\nalice 3 y\nalice 9 1500.1\nalice 5\nalice 6 \u{e4}\nalice x y\n",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 6, "{errs:#?}");
        assert!(errs[0].starts_with("map.txt:2: UID"), "{}", errs[0]);
        assert!(errs[1].starts_with("map.txt:3: UID 3 of alice already given on line 1"));
        assert!(errs[2].starts_with("map.txt:4: UIDL 1500.1"));
        assert!(errs[3].starts_with("map.txt:5: expected"));
        assert!(errs[4].starts_with("map.txt:6: UIDL"));
        assert!(errs[5].starts_with("map.txt:7: UID"));
    }
}
