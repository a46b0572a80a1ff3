//! One user on two nodes at once. The RFC 1939 lock ([IN-USE]) is per node: two popbridge
//! processes in front of one Dovecot let the same maildrop in twice. In every deletion mode
//! (hide, expunge, move): two sessions deleting overlapping messages, a third listing between
//! their QUITs, an uncommitted one; then four clients of the one user on both nodes for a few
//! seconds, checked against a ledger. Never a lost message, an applied uncommitted deletion or
//! wrong bytes; what they may see instead is counted and reported (README "Running a fleet").

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use support::ledger::{ledger_message, seed_from_env, upstream_view, Rng};
use support::raw::RawPop3;
use support::*;

/// The RETR answered +OK with the message that carries ledger `marker`.
fn retr_ok(reply: &str, body: &[String], marker: &str) -> bool {
    reply.starts_with("+OK") && body.concat().contains(&format!("X-Ledger: {marker}\r\n"))
}

/// RETR `n` on a raw session: the status line and the body lines.
fn retr(c: &mut RawPop3, n: usize) -> (String, Vec<String>) {
    let status = c.cmd(&format!("RETR {n}"));
    let body = if status.starts_with("+OK") {
        c.multi()
    } else {
        Vec::new()
    };
    (status, body)
}

/// Every message of `user` upstream as (folder, marker), INBOX and the move target.
fn upstream_markers(dc: &Dovecot, user: &str) -> (BTreeMap<u32, (String, bool)>, Vec<String>) {
    let (_, inbox) = upstream_view(dc.imap_port(), user, "pw", "INBOX");
    let inbox = inbox
        .into_iter()
        .map(|(uid, m)| (uid, (m.marker, m.hidden)))
        .collect();
    let trash = dc
        .imap_state(user, "pw", "INBOX")
        .mailboxes
        .contains_key("Trash");
    let trash = if trash {
        upstream_view(dc.imap_port(), user, "pw", "Trash")
            .1
            .into_values()
            .map(|m| m.marker)
            .collect()
    } else {
        Vec::new()
    };
    (inbox, trash)
}

/// Messages of each same-user mailbox.
const SAME_USER_MESSAGES: usize = 200;
/// The concurrent sessions pick from the first messages they list, so that the two nodes'
/// sessions read and delete the same ones.
const HOT: usize = 8;

/// What one mode showed, for the report.
struct Observed {
    mode: &'static str,
    /// What B's RETR of a message A had just committed answered.
    retr_after_other_commit: String,
    sessions: u64,
    committed_marks: usize,
    retr_gone: u64,
    retr_ok: u64,
    moved_twice: usize,
    /// Marks made only by sessions dropped without QUIT (never applied).
    dropped_only: usize,
}

fn same_user_in_mode(dc: &Dovecot, mode: &'static str, seed: u64) -> Observed {
    let user = format!("same-{mode}");
    let marker = |n: usize| format!("{user}/m{n}");
    let (uv, view0) = upstream_view(dc.imap_port(), &user, "pw", "INBOX");
    let uid_marker: Arc<BTreeMap<u32, String>> =
        Arc::new(view0.iter().map(|(&u, m)| (u, m.marker.clone())).collect());
    let config = format!("[deletion]\nmode = \"{mode}\"\nmove_to = \"Trash\"");
    let n1 = Popbridge::start(dc, &config);
    let n2 = Popbridge::start(dc, &config);
    let (p1, p2) = (n1.pop3_port(), n2.pop3_port());

    // The RFC 1939 lock holds within a node: a second session there gets [IN-USE]...
    let mut a = RawPop3::ready(p1);
    a.login(&user, "pw");
    let mut x = RawPop3::ready(p1);
    assert!(x.cmd(&format!("USER {user}")).starts_with("+OK"));
    let refused = x.cmd("PASS pw");
    assert!(refused.starts_with("-ERR [IN-USE]"), "{refused}");
    // ... and not across nodes: B on node2 logs in beside A.
    let mut b = RawPop3::ready(p2);
    b.login(&user, "pw");
    assert!(a.cmd("UIDL").starts_with("+OK"));
    let list_a = a.multi();
    assert!(b.cmd("UIDL").starts_with("+OK"));
    let list_b = b.multi();
    assert_eq!(list_a, list_b, "two nodes, two different listings");

    let (st, body) = retr(&mut a, 1);
    assert!(retr_ok(&st, &body, &marker(0)), "{st}");
    assert!(a.cmd("DELE 1").starts_with("+OK"));
    assert!(a.cmd("DELE 2").starts_with("+OK"));
    assert!(b.cmd("DELE 2").starts_with("+OK"));
    assert!(b.cmd("DELE 3").starts_with("+OK"));
    let (st, body) = retr(&mut b, 1);
    assert!(retr_ok(&st, &body, &marker(0)), "{st}");
    assert!(a.cmd("QUIT").starts_with("+OK"));

    // A session logging in after A's QUIT, on either node, no longer lists 1 and 2; B's
    // marks (3) are not applied.
    let uidl = |uid: u32| format!("{uid:08x}{uv:08x}");
    let after_a = node_uidls_plain(p1, &user);
    assert!(!after_a.contains(&uidl(1)) && !after_a.contains(&uidl(2)));
    assert!(after_a.contains(&uidl(3)));
    // B's session keeps its listing, and may read 1 again: its exact bytes, or (when the
    // store removed it) -ERR. Never another message's bytes.
    let stat = b.cmd("STAT");
    assert!(
        stat.starts_with(&format!("+OK {} ", SAME_USER_MESSAGES - 2)),
        "B's snapshot changed: {stat}"
    );
    let (st, body) = retr(&mut b, 1);
    let retr_after_other_commit = if st.starts_with("+OK") {
        assert!(
            retr_ok(&st, &body, &marker(0)),
            "B got other bytes for message 1"
        );
        "+OK with its exact bytes".to_string()
    } else {
        assert!(st.starts_with("-ERR message 1 no longer exists"), "{st}");
        assert_ne!(mode, "hide", "hide keeps the message: RETR must serve it");
        st.trim_end().to_string()
    };
    assert!(
        b.cmd("QUIT").starts_with("+OK"),
        "B's QUIT: a mark the other applied first"
    );
    // An uncommitted session on node2: its mark is never applied.
    let mut d = RawPop3::ready(p2);
    d.login(&user, "pw");
    assert!(d.cmd("DELE 1").starts_with("+OK")); // UID 4
    drop(d);
    thread::sleep(Duration::from_millis(200));

    let want_gone: BTreeSet<u32> = [1, 2, 3].into();
    let check_upstream = |gone: &BTreeSet<u32>, what: &str| -> usize {
        let (inbox, trash) = upstream_markers(dc, &user);
        for (uid, m) in uid_marker.iter() {
            let removed = match mode {
                "hide" => inbox.get(uid).map(|(_, h)| *h).expect("hide never removes"),
                _ => !inbox.contains_key(uid),
            };
            assert_eq!(
                removed,
                gone.contains(uid),
                "{mode} {what}: UID {uid} ({m}) removed={removed}"
            );
        }
        if mode != "move" {
            return 0;
        }
        // Every moved message is in Trash; more than once is what two nodes moving the
        // same message at the same moment may leave (a copy, never a loss).
        let gone_markers: BTreeSet<&String> = gone.iter().map(|u| &uid_marker[u]).collect();
        let in_trash: BTreeSet<&String> = trash.iter().collect();
        assert_eq!(
            in_trash, gone_markers,
            "{mode} {what}: Trash holds other mail"
        );
        trash.len() - in_trash.len()
    };
    assert_eq!(check_upstream(&want_gone, "after A and B"), 0);

    // Then both nodes at once: two clients per node for the same user, random sessions.
    let committed = Arc::new(Mutex::new(BTreeSet::<u32>::new()));
    let uncommitted = Arc::new(Mutex::new(BTreeSet::<u32>::new()));
    committed.lock().unwrap().extend(want_gone.iter());
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let counters = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (i, port) in [p1, p1, p2, p2].into_iter().enumerate() {
        let (committed, uncommitted, errors, counters, stop, uid_marker) = (
            committed.clone(),
            uncommitted.clone(),
            errors.clone(),
            counters.clone(),
            stop.clone(),
            uid_marker.clone(),
        );
        let user = user.clone();
        let mut rng = Rng::new(seed ^ (i as u64 + 77));
        threads.push(thread::spawn(move || {
            let err = |m: String| errors.lock().unwrap().push(m);
            while !stop.load(Ordering::Relaxed) {
                let before = committed.lock().unwrap().clone();
                let mut c = RawPop3::ready(port);
                assert!(c.cmd(&format!("USER {user}")).starts_with("+OK"));
                if !c.cmd("PASS pw").starts_with("+OK") {
                    continue; // [IN-USE]: the other client of this node
                }
                counters[0].fetch_add(1, Ordering::Relaxed);
                assert!(c.cmd("UIDL").starts_with("+OK"));
                let listing: Vec<(usize, u32)> = c
                    .multi()
                    .iter()
                    .map(|l| {
                        let mut f = l.split_whitespace();
                        let n = f.next().unwrap().parse().unwrap();
                        let uid = u32::from_str_radix(&f.next().unwrap()[..8], 16).unwrap();
                        (n, uid)
                    })
                    .collect();
                for (_, uid) in &listing {
                    if before.contains(uid) {
                        err(format!("UID {uid} listed after its deletion was committed"));
                    }
                }
                if listing.is_empty() {
                    let _ = c.cmd("QUIT");
                    continue;
                }
                let hot = listing.len().min(HOT) as u64;
                let (n, uid) = listing[rng.below(hot) as usize];
                let (st, body) = retr(&mut c, n);
                if st.starts_with("+OK") {
                    counters[2].fetch_add(1, Ordering::Relaxed);
                    if !retr_ok(&st, &body, &uid_marker[&uid]) {
                        err(format!("RETR of UID {uid} served other bytes"));
                    }
                } else if st.starts_with("-ERR message") && st.contains("no longer exists") {
                    counters[1].fetch_add(1, Ordering::Relaxed);
                } else {
                    err(format!("RETR of UID {uid}: {st}"));
                }
                let mut marked = Vec::new();
                for _ in 0..rng.below(2) {
                    let (n, uid) = listing[rng.below(hot) as usize];
                    if !marked.contains(&uid) && c.cmd(&format!("DELE {n}")).starts_with("+OK") {
                        marked.push(uid);
                    }
                }
                if rng.below(4) == 0 {
                    uncommitted.lock().unwrap().extend(marked.iter().copied());
                    continue; // dropped without QUIT
                }
                let q = c.cmd("QUIT");
                if q.starts_with("+OK") {
                    committed.lock().unwrap().extend(marked.iter().copied());
                } else {
                    err(format!("QUIT: {q}"));
                }
            }
        }));
    }
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a client of the same user panicked");
    }
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{mode}: {errors:#?}");
    thread::sleep(Duration::from_millis(200));
    let committed = committed.lock().unwrap().clone();
    // Exactly the committed marks are applied: none lost, no uncommitted one (marks only a
    // dropped session made stay).
    let moved_twice = check_upstream(&committed, "after the concurrent sessions");
    let dropped_only: Vec<u32> = uncommitted
        .lock()
        .unwrap()
        .difference(&committed)
        .copied()
        .collect();
    // And both nodes list the same: everything not removed.
    let visible: Vec<String> = uid_marker
        .keys()
        .filter(|u| !committed.contains(u))
        .map(|&u| uidl(u))
        .collect();
    assert_eq!(node_uidls_plain(p1, &user), visible, "{mode}: node1");
    assert_eq!(node_uidls_plain(p2, &user), visible, "{mode}: node2");
    Observed {
        dropped_only: dropped_only.len(),
        mode,
        retr_after_other_commit,
        sessions: counters[0].load(Ordering::Relaxed),
        committed_marks: committed.len(),
        retr_gone: counters[1].load(Ordering::Relaxed),
        retr_ok: counters[2].load(Ordering::Relaxed),
        moved_twice,
    }
}

/// UIDLs of `user` on a node without PROXY protocol, with curl.
fn node_uidls_plain(port: u16, user: &str) -> Vec<String> {
    let r = curl_pop3(
        &format!("pop3://{user}:pw@127.0.0.1:{port}/"),
        &["-X", "UIDL"],
    );
    assert_eq!(r.code, 0, "curl UIDL {user} on :{port}: {}", r.stderr);
    String::from_utf8_lossy(&r.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().nth(1).expect("n uidl").to_string())
        .collect()
}

#[test]
fn one_user_on_two_nodes_at_once_never_loses_mail_or_applies_an_uncommitted_deletion() {
    let seed = seed_from_env("FLEET_SEED");
    eprintln!("same user on two nodes: seed {seed} (rerun with FLEET_SEED={seed})");
    let dc = Dovecot::start();
    let modes = ["hide", "expunge", "move"];
    // Every user before the first login: Dovecot may not notice a users file replaced within
    // the same second as the last one it read.
    for mode in modes {
        let user = format!("same-{mode}");
        dc.add_user(&user, "pw");
        let msgs: Vec<Vec<u8>> = (0..SAME_USER_MESSAGES)
            .map(|n| ledger_message(&user, n))
            .collect();
        dc.seed(&user, &msgs.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }
    let mut lines = Vec::new();
    for mode in modes {
        let o = same_user_in_mode(&dc, mode, seed);
        lines.push(format!(
            "{}: {} concurrent sessions, {} marks committed, {} marks only in dropped sessions \
             (not applied), RETR of a message the other node's session had just committed: {}; \
             concurrent RETRs {} served, {} answered 'no longer exists'; {} messages moved twice",
            o.mode,
            o.sessions,
            o.committed_marks,
            o.dropped_only,
            o.retr_after_other_commit,
            o.retr_ok,
            o.retr_gone,
            o.moved_twice
        ));
    }
    report(&format!(
        "same user on two nodes (seed {seed}): {}; lost 0, uncommitted applied 0, wrong bytes 0",
        lines.join("; ")
    ));
}
