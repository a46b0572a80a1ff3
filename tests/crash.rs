//! popbridge killed with SIGKILL mid-session and restarted, over several rounds, with its sled
//! state sometimes damaged: no mail lost, nothing deleted without a committed QUIT, no hidden
//! mail shown again, UIDLs unchanged. First four fixed rounds, then rounds under load (several
//! clients of several users downloading and deleting) killed after a random delay, checked
//! against a ledger (`CRASH_SEED` replays a run, `CRASH_ROUNDS` sets the rounds, default 12).
//! And SIGTERM drains running sessions.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::imap_raw::Imap;
use support::ledger::{ledger_message, seed_from_env, upstream_view, Rng};
use support::raw::RawPop3;
use support::*;

fn session(port: u16) -> RawPop3 {
    let mut c = RawPop3::ready(port);
    c.login("k", "kpw");
    c
}

fn uidls(port: u16) -> Vec<String> {
    uidl_list(port, "k", "kpw")
}

#[test]
fn sigkill_rounds_lose_nothing_and_show_nothing_hidden() {
    let dc = Dovecot::start();
    dc.add_user("k", "kpw");
    let msgs: Vec<Vec<u8>> = (0..12)
        .map(|i| format!("Subject: m{i}\r\n\r\nbody {i}\r\n").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    dc.seed("k", &refs);
    let mut pb = Popbridge::start(&dc, "");
    let mut expected = uidls(pb.pop3_port());
    assert_eq!(expected.len(), 12);

    for round in 0..4 {
        // A session marks the first message and never QUITs: popbridge is killed under it.
        let mut doomed = session(pb.pop3_port());
        assert!(doomed.cmd("DELE 1").starts_with("+OK"));
        let pid = pb.pid().to_string();
        assert!(Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success());
        if round % 2 == 1 {
            // Damage the cache: every file of the sled directory overwritten.
            for entry in std::fs::read_dir(pb.state_dir()).unwrap().flatten() {
                if entry.path().is_file() {
                    std::fs::write(entry.path(), b"garbage").unwrap();
                }
            }
        }
        pb.restart();
        drop(doomed);
        assert_eq!(
            uidls(pb.pop3_port()),
            expected,
            "round {round}: an uncommitted DELE was applied or UIDLs changed"
        );

        // A session that commits: the first visible message is hidden for good.
        let mut committed = session(pb.pop3_port());
        assert!(committed.cmd("DELE 1").starts_with("+OK"));
        assert!(committed.cmd("QUIT").starts_with("+OK"));
        expected.remove(0);
        assert_eq!(
            uidls(pb.pop3_port()),
            expected,
            "round {round}: hidden mail came back or UIDLs changed"
        );
        // Nothing was lost upstream: hidden mail is still there.
        assert_eq!(dc.imap_state("k", "kpw", "INBOX").messages.len(), 12);
    }
    assert!(
        pb.log().contains("moving it aside"),
        "damaged state was not rebuilt"
    );
}

#[test]
fn sigterm_drains_running_sessions_then_closes_without_commit() {
    let dc = Dovecot::start();
    dc.add_user("k", "kpw");
    dc.seed(
        "k",
        &[b"Subject: a\r\n\r\na\r\n", b"Subject: b\r\n\r\nb\r\n"],
    );
    let pb = Popbridge::start(&dc, "[pop3]\nshutdown_drain_secs = 2");
    let mut running = session(pb.pop3_port());
    assert!(running.cmd("DELE 1").starts_with("+OK"));
    let pid = pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(pb.wait_for_log("stopping: no new sessions", Duration::from_secs(5)));
    // No new sessions...
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect(("127.0.0.1", pb.pop3_port())).is_err(),
        "still accepting"
    );
    // ... but the running one may finish, and its QUIT commits.
    assert!(running.cmd("STAT").starts_with("+OK 1 "));
    assert!(running.cmd("QUIT").starts_with("+OK"));
    assert!(
        pb.wait_for_log("stopped", Duration::from_secs(10)),
        "{}",
        pb.log()
    );
    let imap = dc.imap_state("k", "kpw", "INBOX");
    assert!(imap.message(1).unwrap().has_flag("$POP3Deleted"));
}

#[test]
fn sigterm_closes_idle_sessions_after_the_drain_without_commit() {
    let dc = Dovecot::start();
    dc.add_user("k", "kpw");
    dc.seed("k", &[b"Subject: a\r\n\r\na\r\n"]);
    let pb = Popbridge::start(&dc, "[pop3]\nshutdown_drain_secs = 1");
    let mut idle = session(pb.pop3_port());
    assert!(idle.cmd("DELE 1").starts_with("+OK"));
    let pid = pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        pb.wait_for_log("stopped", Duration::from_secs(15)),
        "{}",
        pb.log()
    );
    assert!(pb.log().contains("drain time over"), "{}", pb.log());
    let imap = dc.imap_state("k", "kpw", "INBOX");
    assert!(
        !imap.message(1).unwrap().has_flag("$POP3Deleted"),
        "uncommitted DELE applied"
    );
}

// ---------------------------------------------------------------------------------------------
// SIGKILL at random points under load, checked against a ledger.

const LOAD_USERS: usize = 3;
const CLIENTS_PER_USER: usize = 2;
const SEEDED_PER_USER: usize = 30;

/// How a POP3 session under load ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// QUIT answered +OK: every mark must be applied.
    Committed,
    /// Ended without a QUIT (dropped, or popbridge killed before it was sent): no mark may be.
    Uncommitted,
    /// QUIT sent, popbridge killed before the answer: each mark either applied or not.
    InDoubt,
}

#[derive(Debug)]
struct SessionRecord {
    user: usize,
    marked: Vec<u32>,
    end: End,
    /// The connection died under it (popbridge was killed).
    cut: bool,
}

#[derive(Default)]
struct Shared {
    records: Mutex<Vec<SessionRecord>>,
    /// Per user: UIDs hidden by a committed QUIT; no later session may list them.
    committed_hidden: Mutex<Vec<HashSet<u32>>>,
    /// Per user: UID -> marker, from the ledger; RETR must deliver that marker.
    markers: Mutex<Vec<BTreeMap<u32, String>>>,
    uidvalidity: Mutex<Vec<u32>>,
    errors: Mutex<Vec<String>>,
    retrieved: AtomicU64,
    in_use: AtomicU64,
}

struct Pop {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Pop {
    fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(l)
    }
    fn cmd(&mut self, c: &str) -> io::Result<String> {
        self.w.write_all(format!("{c}\r\n").as_bytes())?;
        self.line()
    }
    fn multi(&mut self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        loop {
            let l = self.line()?;
            if l == ".\r\n" {
                return Ok(out);
            }
            out.push(l);
        }
    }
}

/// One session of `user` against popbridge: UIDL, a few RETRs checked against the ledger, a
/// few DELEs, then QUIT, RSET+QUIT or a dropped connection. `None` if it never logged in.
fn load_session(port: u16, user: usize, rng: &mut Rng, sh: &Shared) -> Option<SessionRecord> {
    let name = format!("load{user}");
    let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let _ = s.set_nodelay(true);
    let mut p = Pop {
        r: BufReader::new(s.try_clone().ok()?),
        w: s,
    };
    if !p.line().ok()?.starts_with("+OK") {
        return None;
    }
    if !p.cmd(&format!("USER {name}")).ok()?.starts_with("+OK") {
        return None;
    }
    let hidden_before = sh.committed_hidden.lock().unwrap()[user].clone();
    let pass = p.cmd("PASS pw").ok()?;
    if pass.starts_with("-ERR [IN-USE]") {
        sh.in_use.fetch_add(1, Ordering::Relaxed);
        let _ = p.cmd("QUIT");
        return None;
    }
    if !pass.starts_with("+OK") {
        sh.errors
            .lock()
            .unwrap()
            .push(format!("{name} PASS: {pass}"));
        return None;
    }
    let mut rec = SessionRecord {
        user,
        marked: Vec::new(),
        end: End::Uncommitted,
        cut: false,
    };
    let err = |m: String| sh.errors.lock().unwrap().push(m);
    let uv = sh.uidvalidity.lock().unwrap()[user];
    // From here on, an I/O error is popbridge being killed: the session ends uncommitted.
    let run = |p: &mut Pop, rec: &mut SessionRecord, rng: &mut Rng| -> io::Result<()> {
        if !p.cmd("UIDL")?.starts_with("+OK") {
            err(format!("{name}: UIDL refused"));
            return Ok(());
        }
        let mut listing: Vec<(usize, u32)> = Vec::new();
        for l in p.multi()? {
            let mut f = l.split_whitespace();
            let (n, uidl) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            let uid = u32::from_str_radix(uidl.get(..8).unwrap_or(""), 16).unwrap_or(0);
            if uidl != format!("{uid:08x}{uv:08x}") {
                err(format!("{name}: UIDL {uidl} is not the UID's (uid {uid})"));
            }
            if hidden_before.contains(&uid) {
                err(format!("{name}: UID {uid} listed after a committed DELE"));
            }
            listing.push((n.parse().unwrap_or(0), uid));
        }
        for _ in 0..rng.below(3) + 1 {
            if listing.is_empty() {
                break;
            }
            let (n, uid) = listing[rng.below(listing.len() as u64) as usize];
            if !p.cmd(&format!("RETR {n}"))?.starts_with("+OK") {
                err(format!("{name}: RETR {n} refused"));
                continue;
            }
            let body = p.multi()?.concat();
            let want = sh.markers.lock().unwrap()[user].get(&uid).cloned();
            match want {
                Some(m) if body.contains(&format!("X-Ledger: {m}\r\n")) => {
                    sh.retrieved.fetch_add(1, Ordering::Relaxed);
                }
                _ => err(format!("{name}: RETR of UID {uid} is not its ledger entry")),
            }
        }
        // Some sessions delete one or two messages; the mailbox must not drain over the run.
        let deletions = if rng.below(10) < 4 {
            rng.below(2) + 1
        } else {
            0
        };
        for _ in 0..deletions {
            if listing.is_empty() {
                break;
            }
            let (n, uid) = listing[rng.below(listing.len() as u64) as usize];
            if rec.marked.contains(&uid) {
                continue;
            }
            if !p.cmd(&format!("DELE {n}"))?.starts_with("+OK") {
                err(format!("{name}: DELE {n} refused"));
                continue;
            }
            rec.marked.push(uid);
        }
        match rng.below(100) {
            0..=14 => return Ok(()), // dropped: no QUIT
            15..=29 => {
                if !p.cmd("RSET")?.starts_with("+OK") {
                    err(format!("{name}: RSET refused"));
                }
                rec.marked.clear();
            }
            _ => {}
        }
        rec.end = End::InDoubt;
        let q = p.cmd("QUIT")?;
        if q.starts_with("+OK") {
            rec.end = End::Committed;
            let mut hidden = sh.committed_hidden.lock().unwrap();
            hidden[user].extend(rec.marked.iter().copied());
        } else {
            err(format!("{name}: QUIT: {q}"));
        }
        Ok(())
    };
    rec.cut = run(&mut p, &mut rec, rng).is_err();
    Some(rec)
}

#[test]
fn sigkill_at_random_points_under_load_keeps_the_pop3_promise() {
    let seed = seed_from_env("CRASH_SEED");
    let max_rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!("random SIGKILL rounds: seed {seed} (rerun with CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);

    let dc = Dovecot::start();
    let users: Vec<String> = (0..LOAD_USERS).map(|u| format!("load{u}")).collect();
    for u in &users {
        dc.add_user(u, "pw");
        let msgs: Vec<Vec<u8>> = (0..SEEDED_PER_USER).map(|n| ledger_message(u, n)).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
        dc.seed(u, &refs);
    }
    let mut appended = [SEEDED_PER_USER; LOAD_USERS];
    let mut pb = Popbridge::start(&dc, "[limits]\nmax_connections_per_ip = 100");
    let sh = Arc::new(Shared::default());
    // The ledger: marker -> UID per user, fixed for good once seen.
    let mut ledger: Vec<BTreeMap<String, u32>> = vec![BTreeMap::new(); LOAD_USERS];
    {
        let mut hidden = sh.committed_hidden.lock().unwrap();
        let mut markers = sh.markers.lock().unwrap();
        let mut uvs = sh.uidvalidity.lock().unwrap();
        for (u, name) in users.iter().enumerate() {
            let (uv, view) = upstream_view(dc.imap_port(), name, "pw", "INBOX");
            assert_eq!(view.len(), SEEDED_PER_USER);
            for (&uid, m) in &view {
                ledger[u].insert(m.marker.clone(), uid);
            }
            hidden.push(HashSet::new());
            markers.push(
                view.iter()
                    .map(|(&uid, m)| (uid, m.marker.clone()))
                    .collect(),
            );
            uvs.push(uv);
        }
    }
    let started = Instant::now();
    let (mut rounds, mut sessions, mut committed, mut uncommitted, mut in_doubt, mut cut) =
        (0, 0, 0, 0, 0, 0);
    let mut kill_delays = Vec::new();
    while rounds < max_rounds && (rounds < 6 || started.elapsed() < Duration::from_secs(50)) {
        // New mail arrives over IMAP before each round, recorded in the ledger.
        for (u, name) in users.iter().enumerate() {
            let mut c = Imap::login(dc.imap_port(), name, "pw");
            for _ in 0..5 {
                c.run("APPEND INBOX", &ledger_message(name, appended[u]));
                appended[u] += 1;
            }
        }
        for (u, name) in users.iter().enumerate() {
            let (_, view) = upstream_view(dc.imap_port(), name, "pw", "INBOX");
            let mut markers = sh.markers.lock().unwrap();
            for (&uid, m) in &view {
                let known = *ledger[u].entry(m.marker.clone()).or_insert(uid);
                assert_eq!(known, uid, "round {rounds}: {} changed UID", m.marker);
                markers[u].insert(uid, m.marker.clone());
            }
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for u in 0..LOAD_USERS {
            for c in 0..CLIENTS_PER_USER {
                let (stop, sh) = (stop.clone(), sh.clone());
                let port = pb.pop3_port();
                let mut crng = Rng::new(seed ^ ((rounds * 100 + u * 10 + c) as u64 + 1));
                threads.push(thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(rec) = load_session(port, u, &mut crng, &sh) {
                            sh.records.lock().unwrap().push(rec);
                        }
                    }
                }));
            }
        }
        let delay = Duration::from_millis(150 + rng.below(1200));
        kill_delays.push(delay.as_millis());
        thread::sleep(delay);
        let pid = pb.pid().to_string();
        assert!(Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success());
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("a load client panicked");
        }
        if rng.below(4) == 0 {
            // Now and then the cache is damaged as well: it must be rebuilt, not trusted.
            for entry in std::fs::read_dir(pb.state_dir()).unwrap().flatten() {
                if entry.path().is_file() && rng.below(2) == 0 {
                    std::fs::write(entry.path(), b"garbage").unwrap();
                }
            }
        }
        pb.restart();

        // The ledger check, per user.
        let records: Vec<SessionRecord> = std::mem::take(&mut *sh.records.lock().unwrap());
        sessions += records.len();
        for (u, name) in users.iter().enumerate() {
            let (uv, view) = upstream_view(dc.imap_port(), name, "pw", "INBOX");
            assert_eq!(uv, sh.uidvalidity.lock().unwrap()[u], "UIDVALIDITY changed");
            // Nothing lost (hide mode never removes mail upstream), nothing renumbered.
            for (marker, &uid) in &ledger[u] {
                let m = view.get(&uid);
                assert!(
                    m.is_some_and(|m| &m.marker == marker),
                    "round {rounds} (seed {seed}): {marker} (UID {uid}) lost upstream"
                );
            }
            assert_eq!(view.len(), ledger[u].len(), "unexpected upstream mail");
            let hidden: HashSet<u32> = view
                .iter()
                .filter(|(_, m)| m.hidden)
                .map(|(&uid, _)| uid)
                .collect();
            let mut must: HashSet<u32> = HashSet::new();
            let mut may: HashSet<u32> = HashSet::new();
            for r in records.iter().filter(|r| r.user == u) {
                match r.end {
                    End::Committed => must.extend(r.marked.iter().copied()),
                    End::InDoubt => may.extend(r.marked.iter().copied()),
                    End::Uncommitted => {}
                }
            }
            let missing: Vec<_> = must.difference(&hidden).collect();
            assert!(
                missing.is_empty(),
                "round {rounds} (seed {seed}): {name}: committed DELE of UIDs {missing:?} not applied"
            );
            // Every hidden UID is accounted for by a committed or in-doubt QUIT, this round or
            // an earlier one.
            let mut accounted = sh.committed_hidden.lock().unwrap()[u].clone();
            accounted.extend(may.iter().copied());
            let stray: Vec<_> = hidden.difference(&accounted).collect();
            assert!(
                stray.is_empty(),
                "round {rounds} (seed {seed}): {name}: UIDs {stray:?} hidden without a QUIT"
            );
            // In-doubt marks that were applied count as committed from now on.
            sh.committed_hidden.lock().unwrap()[u].extend(hidden.iter().copied());
            // Through popbridge: exactly the visible mail, under unchanged UIDLs.
            let expected: Vec<String> = view
                .iter()
                .filter(|(_, m)| !m.hidden)
                .map(|(&uid, _)| format!("{uid:08x}{uv:08x}"))
                .collect();
            assert_eq!(
                uidl_list(pb.pop3_port(), name, "pw"),
                expected,
                "round {rounds} (seed {seed}): {name}: POP3 listing differs from upstream"
            );
        }
        for r in &records {
            cut += usize::from(r.cut);
            match r.end {
                End::Committed => committed += 1,
                End::Uncommitted => uncommitted += 1,
                End::InDoubt => in_doubt += 1,
            }
        }
        rounds += 1;
    }
    let errors = sh.errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "seed {seed}: protocol errors: {errors:#?}"
    );
    report(&format!(
        "random SIGKILL: seed {seed}, {rounds} rounds in {:?}, kill delays {kill_delays:?} ms, \
         {sessions} sessions ({committed} committed, {uncommitted} uncommitted, {in_doubt} in doubt; \
         {cut} cut by the kill), \
         {} RETR checked, {} IN-USE refusals, lost 0",
        started.elapsed(),
        sh.retrieved.load(Ordering::Relaxed),
        sh.in_use.load(Ordering::Relaxed),
    ));
    assert!(rounds >= 6, "too few rounds");
    assert!(cut > 0, "no kill struck a running session");
    assert!(
        committed > 0 && sh.retrieved.load(Ordering::Relaxed) > 0,
        "the load did nothing"
    );
}
