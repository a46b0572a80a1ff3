//! `popbridge migrate uidls | import | verify`: the I/O around the sans-I/O matcher and map.
//! Reports go to stdout (one line per user, `DIFF` lines for verify); progress to stderr.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::matcher::{
    header_hash, match_by_size, match_rest, without_skipped_headers, LegacyMessage, MatchedBy,
};
use super::store::{Store, StoreError};
use super::Credential;
use crate::config::{read_secret, BackendRef, Config, ImapConfig, Pop3BackendConfig, SharedMap};
use crate::maildrop::Maildrop;
use crate::maildrop::Mailstore;
use crate::routing::{expand, Router};
use crate::state::StateStore;
use crate::uidl::map::{is_legal_uidl, MapError, UidlMap};
use crate::uidl::UidlFormat;
use crate::upstream::pop3::{ListedMessage, Pop3Client, Pop3Error};
use crate::upstream::{Endpoint, Protocol};

/// Largest message read whole (RETR for verify and header fallbacks).
const MAX_MESSAGE: usize = 256 << 20;
/// Largest `TOP n 0` answer.
const MAX_HEADER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Usage(String),
    #[error("legacy POP3: {0}")]
    Pop3(#[from] Pop3Error),
    #[error("legacy POP3 backend: {0}")]
    Setup(#[from] crate::upstream::SetupError),
    #[error("new store: {0}")]
    Store(#[from] StoreError),
    #[error("UIDL map: {0}")]
    Map(#[from] MapError),
    #[error("state: {0}")]
    State(String),
    #[error("popbridge view: {0}")]
    Bridge(String),
}

/// One user to work on, and the password given for them (if any).
#[derive(Clone)]
pub struct UserSpec {
    pub user: String,
    pub password: Option<String>,
}

/// Parses a users file: one user per line, optionally a TAB and the user's password; blank
/// lines and lines starting with `#` are ignored.
pub fn parse_users_file(path: &Path, text: &str) -> Result<Vec<UserSpec>, MigrateError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (user, password) = match line.split_once('\t') {
            Some((u, p)) => (u.trim(), Some(p.to_owned())),
            None => (line.trim(), None),
        };
        if user.is_empty() || user.contains(char::is_whitespace) {
            return Err(MigrateError::Usage(format!(
                "{}:{}: bad user name (a line is `user` or `user<TAB>password`)",
                path.display(),
                i + 1
            )));
        }
        if password.as_deref() == Some("") {
            return Err(MigrateError::Usage(format!(
                "{}:{}: empty password after the TAB",
                path.display(),
                i + 1
            )));
        }
        out.push(UserSpec {
            user: user.to_owned(),
            password,
        });
    }
    Ok(out)
}

/// The legacy POP3 backend named `name`.
pub fn pop3_backend<'a>(
    config: &'a Config,
    name: &str,
) -> Result<&'a Pop3BackendConfig, MigrateError> {
    match config.backend(name) {
        Some(BackendRef::Pop3(p)) => Ok(p),
        Some(BackendRef::Imap(_)) => Err(MigrateError::Usage(format!(
            "backend {name:?} is an IMAP backend; --from needs kind = \"pop3\""
        ))),
        None => Err(MigrateError::Usage(format!("no backend named {name:?}"))),
    }
}

/// The IMAP backend named `name` (`imap` is the `[imap]` section).
pub fn imap_backend<'a>(config: &'a Config, name: &str) -> Result<&'a ImapConfig, MigrateError> {
    match config.backend(name) {
        Some(BackendRef::Imap(i)) => Ok(i),
        Some(BackendRef::Pop3(_)) => Err(MigrateError::Usage(format!(
            "backend {name:?} is a POP3 backend; --to needs an IMAP backend"
        ))),
        None => Err(MigrateError::Usage(format!("no backend named {name:?}"))),
    }
}

/// Which login a user has on each side. `--user` (and a users-file line) is the *client*
/// login: what the POP3 client types and what routing rules match. On a backend, the login is
/// `--from-login` / `--to-login` expanded for it when given (the rewrite the user's route will
/// have after the switch), else the rewrite of the user's current route when that route
/// points at this backend, else the client login unchanged. The map is stored under the new
/// store's login, which is the key a routed session uses.
pub struct Logins {
    router: Router,
    from: Option<String>,
    to: Option<String>,
}

impl Logins {
    /// Reads the configuration's routing rules and routing file.
    pub fn new(
        config: &Config,
        from_template: Option<String>,
        to_template: Option<String>,
    ) -> Result<Logins, MigrateError> {
        let router = Router::from_config(config)
            .map_err(|e| MigrateError::Usage(format!("routing: {e}")))?;
        for t in [&from_template, &to_template].into_iter().flatten() {
            let sample = expand(t, "user@example.org");
            if sample.is_empty() || sample.contains(|c: char| c.is_whitespace() || c.is_control()) {
                return Err(MigrateError::Usage(format!(
                    "login template {t:?} gives {sample:?} for user@example.org: not a login"
                )));
            }
        }
        Ok(Logins {
            router,
            from: from_template,
            to: to_template,
        })
    }

    fn on(&self, backend: &str, template: &Option<String>, user: &str) -> String {
        if let Some(t) = template {
            return expand(t, user);
        }
        match self.router.route(user) {
            Some(r) if &*r.backend == backend => r.login,
            _ => user.to_owned(),
        }
    }

    /// `user`'s login on the legacy backend `backend`.
    pub fn from(&self, backend: &str, user: &str) -> String {
        self.on(backend, &self.from, user)
    }

    /// `user`'s login on the new store `backend`.
    pub fn to(&self, backend: &str, user: &str) -> String {
        self.on(backend, &self.to, user)
    }
}

/// A report line naming the logins used, when they differ from the client login.
fn print_logins(user: &str, from: Option<(&str, &str)>, to: (&str, &str)) {
    let mut parts = Vec::new();
    if let Some((b, l)) = from {
        if l != user {
            parts.push(format!("{b} as {l}"));
        }
    }
    if to.1 != user {
        parts.push(format!("{} as {}", to.0, to.1));
    }
    if !parts.is_empty() {
        println!("  user {user}: logged in to {}", parts.join(", "));
    }
}

fn master(
    user: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<Credential>, MigrateError> {
    match (user, file) {
        (Some(u), Some(f)) => Ok(Some(Credential::Master {
            user: u.clone(),
            password: read_secret(f).map_err(MigrateError::Usage)?,
        })),
        _ => Ok(None),
    }
}

fn credential(
    master: &Option<Credential>,
    spec: &UserSpec,
    side: &str,
) -> Result<Credential, MigrateError> {
    if let Some(m) = master {
        return Ok(m.clone());
    }
    spec.password
        .clone()
        .map(Credential::Password)
        .ok_or_else(|| {
            MigrateError::Usage(format!(
                "no credentials for {} on the {side} side: configure a master user for that backend, or give the user's password (--password-env, or a TAB and the password in the users file)",
                spec.user
            ))
        })
}

/// The state store, if it can be opened (a running `popbridge serve` holds it: then the map
/// goes to METADATA only; every instance reads the head in METADATA at each login and
/// fetches the new map when it differs from its cached copy).
fn open_state(config: &Config) -> Option<StateStore> {
    match StateStore::open(&config.state.dir) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("popbridge migrate: warning: local state not updated: {e}");
            None
        }
    }
}

/// Plain-text progress on stderr for waves: a bar on a terminal, a line per user otherwise.
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
        }
    }
    fn step(&mut self, user: &str) {
        if self.total < 2 {
            return;
        }
        self.done += 1;
        let width = 30;
        let filled = width * self.done / self.total;
        let bar = format!(
            "[{}{}] {}/{} users ({user})",
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.done,
            self.total
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{bar}");
            if self.done == self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{bar}");
        }
    }
}

/// Options of `migrate uidls`.
pub struct UidlsOptions {
    pub from: String,
    pub to: String,
    pub users: Vec<UserSpec>,
    pub accept_changed_uidls: bool,
    /// `--from-login` / `--to-login` templates (see [`Logins`]).
    pub from_login: Option<String>,
    pub to_login: Option<String>,
}

/// What happened to one user.
#[derive(Debug, Default)]
pub struct UserReport {
    pub legacy: usize,
    pub new: usize,
    pub by_size: usize,
    pub by_header: usize,
    pub unmatched_legacy: Vec<String>,
    pub unmatched_new: usize,
    pub duplicates: (usize, usize),
    /// Existing mappings the new match contradicts (kept as they were).
    pub conflicts: Vec<String>,
    pub stored: Vec<&'static str>,
}

impl UserReport {
    fn changed(&self) -> usize {
        self.unmatched_legacy.len() + self.conflicts.len()
    }
}

/// Runs `migrate uidls`; returns true when every user is clean (or accepted).
pub async fn uidls(config: &Config, opts: &UidlsOptions) -> Result<bool, MigrateError> {
    let legacy = pop3_backend(config, &opts.from)?;
    let imap = imap_backend(config, &opts.to)?;
    let legacy_master = master(&legacy.master_user, &legacy.master_password_file)?;
    let imap_master = master(&imap.master_user, &imap.master_password_file)?;
    let logins = Logins::new(config, opts.from_login.clone(), opts.to_login.clone())?;
    let state = open_state(config);
    let mut progress = Progress::new(opts.users.len());
    let mut all_ok = true;
    for spec in &opts.users {
        let from_login = logins.from(&opts.from, &spec.user);
        let to_login = logins.to(&opts.to, &spec.user);
        let result = async {
            let lc = credential(&legacy_master, spec, "legacy")?;
            let ic = credential(&imap_master, spec, "new")?;
            migrate_user(
                config,
                legacy,
                &opts.to,
                (&from_login, &to_login),
                &lc,
                &ic,
                state.as_ref(),
                opts.accept_changed_uidls,
            )
            .await
        }
        .await;
        match result {
            Ok(r) => {
                let changed = r.changed();
                let verdict = if changed == 0 {
                    "ok".to_string()
                } else if opts.accept_changed_uidls {
                    format!("{changed} changed UIDLs accepted")
                } else {
                    all_ok = false;
                    format!("REFUSED: {changed} messages would show a changed UIDL (nothing stored; --accept-changed-uidls to store anyway)")
                };
                println!(
                    "user {}: legacy {}, new {}; matched {} ({} by size, {} by header); unmatched legacy {}, unmatched new {}; duplicates {}/{}; conflicts {}; stored {}; {verdict}",
                    spec.user,
                    r.legacy,
                    r.new,
                    r.by_size + r.by_header,
                    r.by_size,
                    r.by_header,
                    r.unmatched_legacy.len(),
                    r.unmatched_new,
                    r.duplicates.0,
                    r.duplicates.1,
                    r.conflicts.len(),
                    if r.stored.is_empty() { "nowhere".to_string() } else { r.stored.join("+") },
                );
                print_logins(
                    &spec.user,
                    Some((&opts.from, &from_login)),
                    (&opts.to, &to_login),
                );
                for u in r.unmatched_legacy.iter().take(20) {
                    println!(
                        "  user {}: legacy UIDL {u} has no match in the new store",
                        spec.user
                    );
                }
                for c in r.conflicts.iter().take(20) {
                    println!("  user {}: {c}", spec.user);
                }
            }
            Err(e) => {
                all_ok = false;
                println!("user {}: FAILED: {e}", spec.user);
            }
        }
        progress.step(&spec.user);
    }
    if let Some(s) = &state {
        s.flush();
    }
    Ok(all_ok)
}

/// The copies of the map this user already has (only for the folder's UIDVALIDITY), and
/// their merge: METADATA's mappings first (with `shared`, it is what every instance serves),
/// then the local sled copy's where they do not contradict it. A contradiction keeps
/// METADATA's mapping and is reported.
struct Existing {
    sled: Option<UidlMap>,
    metadata: Option<UidlMap>,
    merged: UidlMap,
    conflicts: Vec<String>,
}

impl Existing {
    /// Whether `map` must be written: a copy that should hold it does not.
    fn must_store(&self, map: &UidlMap, shared: bool, state: bool) -> bool {
        (shared && self.metadata.as_ref() != Some(map))
            || (state && self.sled.as_ref() != Some(map))
    }
}

async fn existing_map(
    state: Option<&StateStore>,
    store: &mut Store,
    shared: bool,
) -> Result<Existing, MigrateError> {
    let uv = store.uid_validity;
    let sled = state
        .and_then(|s| s.uidl_map(&store.state_key, &store.mailbox))
        .map(|(_, m)| m)
        .filter(|m| m.uid_validity() == uv);
    let metadata = if shared {
        store
            .read_map()
            .await?
            .map(|(_, m)| m)
            .filter(|m| m.uid_validity() == uv)
    } else {
        None
    };
    let (merged, conflicts) = merge(uv, metadata.as_ref(), sled.as_ref());
    Ok(Existing {
        sled,
        metadata,
        merged,
        conflicts,
    })
}

/// METADATA's mappings, then the local copy's where they do not contradict them; each
/// contradiction is reported.
fn merge(uv: u32, metadata: Option<&UidlMap>, sled: Option<&UidlMap>) -> (UidlMap, Vec<String>) {
    let mut merged = metadata
        .or(sled)
        .cloned()
        .unwrap_or_else(|| UidlMap::new(uv));
    let mut conflicts = Vec::new();
    if let (Some(_), Some(local)) = (metadata, sled) {
        for (uid, uidl) in local.iter() {
            if let Err(e) = merged.insert(uid, uidl) {
                conflicts.push(format!(
                    "local copy: UID {uid} / legacy UIDL {uidl}: {e} (METADATA's mapping kept)"
                ));
            }
        }
    }
    (merged, conflicts)
}

/// Where the map goes; errors when it can go nowhere. METADATA first (a new generation),
/// then the local cache with the same head, so an instance on this state directory does not
/// fetch it again.
async fn store_map(
    config: &Config,
    state: Option<&StateStore>,
    store: &mut Store,
    user: &str,
    map: &UidlMap,
) -> Result<Vec<&'static str>, MigrateError> {
    let mut stored = Vec::new();
    let shared = config.migration.shared_map == SharedMap::Metadata && store.has_metadata;
    let (mut head, text) = map.to_local()?;
    if shared {
        head = store
            .write_map(map, config.migration.metadata_chunk_bytes)
            .await?;
        stored.push("metadata");
    }
    if let Some(s) = state {
        s.store_uidl_map(&store.state_key, &store.mailbox, &head, &text)
            .map_err(|e| MigrateError::State(e.to_string()))?;
        stored.push("sled");
    }
    if stored.is_empty() {
        return Err(MigrateError::State(
            "the map could be stored nowhere: the local state is in use and METADATA is not available (or migration.shared_map = \"none\")".into(),
        ));
    }
    if !shared && config.migration.shared_map == SharedMap::Metadata {
        eprintln!(
            "popbridge migrate: warning: {user}: the IMAP server does not offer METADATA; the map is only in this instance's state"
        );
    }
    Ok(stored)
}

#[allow(clippy::too_many_arguments)]
async fn migrate_user(
    config: &Config,
    legacy_cfg: &Pop3BackendConfig,
    to: &str,
    (from_login, to_login): (&str, &str),
    lc: &Credential,
    ic: &Credential,
    state: Option<&StateStore>,
    accept: bool,
) -> Result<UserReport, MigrateError> {
    let imap = imap_backend(config, to)?;
    let mut pop = legacy_session(legacy_cfg, from_login, lc).await?;
    let listed = pop.listing().await?;
    let mut store = Store::open(imap, to_login, ic).await?;
    // The key a session routed to `to` with this login uses (state::state_prefix).
    store.state_key = format!("{}{to_login}", crate::state::state_prefix(to));
    let new = store.messages().await?;
    let legacy: Vec<LegacyMessage> = listed
        .iter()
        .map(|m| LegacyMessage {
            uidl: m.uidl.clone(),
            size: m.size,
        })
        .collect();
    let sized = match_by_size(&legacy, &new);
    let (mut lh, mut nh) = (Vec::new(), Vec::new());
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
    let matching = match_rest(&legacy, &new, sized, &lh, &nh);

    let shared = config.migration.shared_map == SharedMap::Metadata && store.has_metadata;
    let existing = existing_map(state, &mut store, shared).await?;
    let mut map = existing.merged.clone();
    let mut report = UserReport {
        legacy: legacy.len(),
        new: new.len(),
        unmatched_legacy: matching
            .unmatched_legacy
            .iter()
            .map(|&i| legacy[i].uidl.clone())
            .collect(),
        unmatched_new: matching.unmatched_new.len(),
        duplicates: (matching.duplicate_legacy, matching.duplicate_new),
        conflicts: existing.conflicts.clone(),
        ..UserReport::default()
    };
    for &(li, uid, by) in &matching.matched {
        match by {
            MatchedBy::Size => report.by_size += 1,
            MatchedBy::Header => report.by_header += 1,
        }
        if let Err(e) = map.insert(uid, &legacy[li].uidl) {
            report.conflicts.push(format!(
                "UID {uid} / legacy UIDL {}: {e} (existing mapping kept)",
                legacy[li].uidl
            ));
        }
    }
    if report.changed() > 0 && !accept {
        store.logout().await;
        return Ok(report);
    }
    if existing.must_store(&map, shared, state.is_some()) {
        report.stored = store_map(config, state, &mut store, to_login, &map).await?;
    } else {
        report.stored = vec!["unchanged"];
    }
    store.logout().await;
    Ok(report)
}

/// Connects to the legacy POP3 backend and logs `user` in.
async fn legacy_session(
    backend: &Pop3BackendConfig,
    user: &str,
    cred: &Credential,
) -> Result<Pop3Client, MigrateError> {
    let endpoint = Endpoint::new(Protocol::Pop3, &backend.endpoint())?;
    let mut pop = Pop3Client::connect(&endpoint).await?;
    match cred {
        Credential::Password(pw) => pop.login(user, pw).await?,
        Credential::Master { user: m, password } => pop.login_master(user, m, password).await?,
    };
    Ok(pop)
}

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

/// Runs `migrate import`; returns true when every user's map was stored without change to an
/// existing mapping (or with `accept`).
pub async fn import(
    config: &Config,
    to: &str,
    file: &Path,
    passwords: &HashMap<String, String>,
    accept: bool,
    to_login: Option<String>,
) -> Result<bool, MigrateError> {
    let imap = imap_backend(config, to)?;
    let logins = Logins::new(config, None, to_login)?;
    let text = std::fs::read_to_string(file)
        .map_err(|e| MigrateError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let by_user = parse_import(file, &text).map_err(|errs| MigrateError::Usage(errs.join("\n")))?;
    let imap_master = master(&imap.master_user, &imap.master_password_file)?;
    let state = open_state(config);
    let mut progress = Progress::new(by_user.len());
    let mut all_ok = true;
    for (user, lines) in &by_user {
        let spec = UserSpec {
            user: user.clone(),
            password: passwords.get(user).cloned(),
        };
        let login = logins.to(to, user);
        let result: Result<(usize, Vec<String>, Vec<&'static str>), MigrateError> = async {
            let cred = credential(&imap_master, &spec, "new")?;
            let mut store = Store::open(imap, &login, &cred).await?;
            store.state_key = format!("{}{login}", crate::state::state_prefix(to));
            let present: std::collections::HashSet<u32> =
                store.messages().await?.iter().map(|m| m.uid).collect();
            let shared = config.migration.shared_map == SharedMap::Metadata && store.has_metadata;
            let existing = existing_map(state.as_ref(), &mut store, shared).await?;
            let mut map = existing.merged.clone();
            let mut conflicts = existing.conflicts.clone();
            for l in lines {
                if !present.contains(&l.uid) {
                    eprintln!(
                        "popbridge migrate: warning: {}:{}: UID {} is not in {}'s mailbox (mapped anyway)",
                        file.display(),
                        l.line,
                        l.uid,
                        user
                    );
                }
                if let Err(e) = map.insert(l.uid, &l.uidl) {
                    conflicts.push(format!("{}:{}: {e} (existing mapping kept)", file.display(), l.line));
                }
            }
            if !conflicts.is_empty() && !accept {
                store.logout().await;
                return Ok((lines.len(), conflicts, Vec::new()));
            }
            let stored = if existing.must_store(&map, shared, state.is_some()) {
                store_map(config, state.as_ref(), &mut store, &login, &map).await?
            } else {
                vec!["unchanged"]
            };
            store.logout().await;
            Ok((lines.len(), conflicts, stored))
        }
        .await;
        match result {
            Ok((n, conflicts, stored)) => {
                let verdict = if conflicts.is_empty() {
                    "ok".to_string()
                } else if accept {
                    format!("{} conflicts accepted", conflicts.len())
                } else {
                    all_ok = false;
                    format!(
                        "REFUSED: {} lines would change an existing mapping (nothing stored)",
                        conflicts.len()
                    )
                };
                println!(
                    "user {user}: imported {n} lines; conflicts {}; stored {}; {verdict}",
                    conflicts.len(),
                    if stored.is_empty() {
                        "nowhere".to_string()
                    } else {
                        stored.join("+")
                    }
                );
                print_logins(user, None, (to, &login));
                for c in conflicts.iter().take(20) {
                    println!("  user {user}: {c}");
                }
            }
            Err(e) => {
                all_ok = false;
                println!("user {user}: FAILED: {e}");
            }
        }
        progress.step(user);
    }
    if let Some(s) = &state {
        s.flush();
    }
    Ok(all_ok)
}

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
fn compare(legacy: &[Seen], bridge: &[Seen]) -> (Vec<String>, Vec<String>) {
    let mut diffs = Vec::new();
    let mut notes = Vec::new();
    if legacy.len() != bridge.len() {
        diffs.push(format!(
            "message count: legacy {}, popbridge {}",
            legacy.len(),
            bridge.len()
        ));
    }
    let by_uidl: HashMap<&str, (usize, &Seen)> = bridge
        .iter()
        .enumerate()
        .map(|(i, s)| (s.uidl.as_str(), (i, s)))
        .collect();
    let legacy_uidls: std::collections::HashSet<&str> =
        legacy.iter().map(|s| s.uidl.as_str()).collect();
    for (i, l) in legacy.iter().enumerate() {
        match by_uidl.get(l.uidl.as_str()) {
            None => diffs.push(format!(
                "legacy message {} (UIDL {}) is missing from popbridge: the client would lose or re-download it",
                i + 1,
                l.uidl
            )),
            Some((j, b)) => {
                let header_only =
                    l.sha256 != b.sha256 && l.sha256_unskipped == b.sha256_unskipped;
                if header_only {
                    notes.push(format!(
                        "UIDL {}: differs only in headers servers add or rewrite (Return-Path, Status, X-UID, ...)",
                        l.uidl
                    ));
                } else if l.sha256 != b.sha256 {
                    diffs.push(format!(
                        "UIDL {}: message bytes differ (legacy {} octets, popbridge {}; SHA-256 differs)",
                        l.uidl, l.len, b.len
                    ));
                } else if l.size != b.size {
                    notes.push(format!(
                        "UIDL {}: LIST size legacy {} vs popbridge {} with identical bytes (line-end counting)",
                        l.uidl, l.size, b.size
                    ));
                }
                if i != *j {
                    notes.push(format!(
                        "UIDL {}: message number legacy {} vs popbridge {}",
                        l.uidl,
                        i + 1,
                        j + 1
                    ));
                }
            }
        }
    }
    for (j, b) in bridge.iter().enumerate() {
        if !legacy_uidls.contains(b.uidl.as_str()) {
            diffs.push(format!(
                "popbridge message {} (UIDL {}) is not on the legacy server: the client would download it as new",
                j + 1,
                b.uidl
            ));
        }
    }
    (diffs, notes)
}

/// Runs `migrate verify` for one user; prints every difference; true when clean.
pub async fn verify(
    config: &Config,
    from: &str,
    to: &str,
    spec: &UserSpec,
    logins: &Logins,
) -> Result<bool, MigrateError> {
    let legacy_cfg = pop3_backend(config, from)?;
    let imap = imap_backend(config, to)?;
    let legacy_master = master(&legacy_cfg.master_user, &legacy_cfg.master_password_file)?;
    let lc = credential(&legacy_master, spec, "legacy")?;
    let from_login = logins.from(from, &spec.user);
    let to_login = logins.to(to, &spec.user);
    print_logins(&spec.user, Some((from, &from_login)), (to, &to_login));

    // The legacy server, as a client sees it.
    let mut pop = legacy_session(legacy_cfg, &from_login, &lc).await?;
    let listed: Vec<ListedMessage> = pop.listing().await?;
    let mut legacy = Vec::with_capacity(listed.len());
    for m in &listed {
        let bytes = pop.retr(m.number, MAX_MESSAGE).await?;
        legacy.push(Seen::new(m.uidl.clone(), m.size, &bytes));
    }
    pop.quit().await;

    // popbridge, in-process: the same upstream, snapshot and UIDL code `serve` uses. With a
    // master user on the new store, `serve` logs in as that master user after another backend
    // checked the client's password; verify is an operator tool and skips that check.
    let password = match (&spec.password, &imap.master_user) {
        (_, Some(_)) => String::new(),
        (Some(p), None) => p.clone(),
        (None, None) => {
            return Err(MigrateError::Usage(format!(
                "verify logs in to the new store like a POP3 session does, with {}'s password (--password-env), unless that backend has a master_user",
                spec.user
            )))
        }
    };
    let state = StateStore::open(&config.state.dir).ok().map(Arc::new);
    if state.is_none() && config.migration.shared_map == SharedMap::None {
        return Err(MigrateError::State(
            "the local state is in use and migration.shared_map = \"none\": the UIDL map cannot be read".into(),
        ));
    }
    let upstream = crate::maildrop::imap::ImapUpstream::new(
        imap,
        &config.deletion,
        state,
        &crate::state::state_prefix(to),
        config.migration.shared_map == SharedMap::Metadata,
    )
    .map_err(|e| MigrateError::Bridge(e.to_string()))?;
    let format = UidlFormat::parse(
        imap.uidl_format
            .as_deref()
            .unwrap_or(&config.pop3.uidl_format),
    )
    .map_err(|e| MigrateError::Usage(e.to_string()))?;
    let mut md = upstream
        .login(&to_login, &password)
        .await
        .map_err(|e| MigrateError::Bridge(e.to_string()))?;
    let snapshot = md
        .snapshot()
        .await
        .map_err(|e| MigrateError::Bridge(e.to_string()))?;
    let chunk = imap.fetch_chunk_bytes;
    let mut bridge = Vec::with_capacity(snapshot.messages.len());
    let mut size_diffs = 0usize;
    for m in &snapshot.messages {
        let mut raw = Vec::new();
        loop {
            let piece = md
                .fetch(m.uid, raw.len() as u64, chunk)
                .await
                .map_err(|e| MigrateError::Bridge(format!("UID {}: {e}", m.uid)))?;
            if piece.is_empty() {
                break;
            }
            raw.extend_from_slice(&piece);
            if raw.len() > MAX_MESSAGE || piece.len() < chunk as usize {
                break;
            }
        }
        if raw.len() as u64 != m.size {
            size_diffs += 1;
            println!(
                "DIFF {}: UID {}: popbridge lists {} octets but delivers {}",
                spec.user,
                m.uid,
                m.size,
                raw.len()
            );
        }
        bridge.push(Seen::new(
            snapshot.uidl(m.uid, &format),
            m.size,
            &pop3_form(&raw),
        ));
    }
    md.close().await;
    let (diffs, notes) = compare(&legacy, &bridge);
    for n in &notes {
        println!("note {}: {n}", spec.user);
    }
    for d in &diffs {
        println!("DIFF {}: {d}", spec.user);
    }
    let clean = diffs.is_empty() && size_diffs == 0;
    if clean {
        println!(
            "verify {}: clean ({} messages, same UIDLs and bytes)",
            spec.user,
            legacy.len()
        );
    } else {
        println!(
            "verify {}: {} differences",
            spec.user,
            diffs.len() + size_diffs
        );
    }
    Ok(clean)
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
        assert_eq!(d.len(), 5, "{d:#?}");
        assert!(d.iter().any(|x| x.contains("count")));
        assert!(d.iter().any(|x| x.contains("UIDL a: message bytes differ")));
        assert!(d.iter().any(|x| x.contains("(UIDL b) is missing")));
        assert!(d
            .iter()
            .any(|x| x.contains("(UIDL new) is not on the legacy")));
    }

    /// Both copies count: nothing either holds is lost, METADATA wins a contradiction, and
    /// the contradiction is reported; a copy that lacks the result must be written.
    #[test]
    fn existing_copies_are_merged_without_overwriting() {
        let map = |pairs: &[(u32, &str)]| {
            let mut m = UidlMap::new(7);
            for (u, l) in pairs {
                m.insert(*u, l).unwrap();
            }
            m
        };
        let meta = map(&[(1, "A"), (2, "B")]);
        let sled = map(&[(2, "B"), (3, "C"), (4, "A"), (1, "X")]);
        let (merged, conflicts) = merge(7, Some(&meta), Some(&sled));
        assert_eq!(merged, map(&[(1, "A"), (2, "B"), (3, "C")]));
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
        assert!(
            conflicts[0].contains("UID 1 / legacy UIDL X")
                && conflicts[0].contains("METADATA's mapping kept")
        );
        assert!(conflicts[1].contains("UID 4 / legacy UIDL A"));
        assert_eq!(merge(7, None, Some(&sled)), (sled.clone(), vec![]));
        assert_eq!(merge(7, Some(&meta), None), (meta.clone(), vec![]));
        assert_eq!(merge(7, None, None), (UidlMap::new(7), vec![]));
        let e = Existing {
            sled: Some(sled),
            metadata: Some(meta.clone()),
            merged: meta.clone(),
            conflicts: vec![],
        };
        assert!(e.must_store(&meta, false, true), "the sled copy differs");
        assert!(
            !e.must_store(&meta, true, false),
            "METADATA already holds it"
        );
    }

    #[test]
    fn logins_follow_templates_then_the_current_route_then_the_client_login() {
        let config = crate::config::fixtures::two_backends(
            r#"[routing]
rules = [{ match = "@example.org", backend = "legacy", login = "%n" }, { match = "done@example.org", backend = "new", login = "%n@new.example" }]
"#,
        );
        let l = Logins::new(&config, None, None).unwrap();
        // The current route's rewrite for the backend it points at; else the client login.
        assert_eq!(l.from("legacy", "Al@example.org"), "Al");
        assert_eq!(l.to("new", "al@example.org"), "al@example.org");
        assert_eq!(l.to("new", "done@example.org"), "done@new.example");
        assert_eq!(l.from("legacy", "done@example.org"), "done@example.org");
        assert_eq!(l.from("legacy", "x@other.org"), "x@other.org");
        // Templates win.
        let l = Logins::new(&config, Some("%u".into()), Some("%n@new.example".into())).unwrap();
        assert_eq!(l.from("legacy", "al@example.org"), "al@example.org");
        assert_eq!(l.to("new", "al@example.org"), "al@new.example");
        // A template that gives no login is refused.
        assert!(Logins::new(&config, None, Some("%n x".into())).is_err());
        assert!(Logins::new(&config, Some(String::new()), None).is_err());
    }

    #[test]
    fn pop3_form_is_what_a_client_receives() {
        assert_eq!(pop3_form(b"a\nb"), b"a\r\nb\r\n");
        assert_eq!(pop3_form(b"a\r\nb\r\n"), b"a\r\nb\r\n");
        assert_eq!(pop3_form(b""), b"");
    }

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

    #[test]
    fn users_files_take_an_optional_tab_password() {
        let p = Path::new("wave.txt");
        let u = parse_users_file(p, "# wave 1\nalice\tpw one\n\nbob\n").unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].password.as_deref(), Some("pw one"));
        assert_eq!(u[1].password, None);
        let e = parse_users_file(p, "alice\t\n").err().unwrap();
        assert!(e.to_string().starts_with("wave.txt:1:"), "{e}");
        let e = parse_users_file(p, "al ice\n").err().unwrap();
        assert!(e.to_string().starts_with("wave.txt:1:"), "{e}");
    }
}
