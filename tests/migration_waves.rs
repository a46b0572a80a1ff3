//! Migration waves at scale (issue 18): a few hundred users in parallel between two private
//! Dovecots, interrupted with SIGINT and with SIGKILL mid-wave and resumed from the journal,
//! then checked user by user against what a POP3 client (Python's poplib) saw on the legacy
//! server; a backend that refuses connections slows the wave down instead of failing users.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const LEGACY_CONF: &str = "pop3_uidl_format = %v.%u";

const HELPERS: &str = r#"
import poplib, json, sys, socket, threading

def uidls_all(port, users_file):
    # Every user's UIDL listing, as a POP3 client sees it: {user: ["1 uidl", ...]}.
    out = {}
    for line in open(users_file):
        line = line.rstrip('\n')
        if not line or line.startswith('#'):
            continue
        user, pw = line.split('\t')
        p = poplib.POP3('127.0.0.1', port); p.user(user)
        try:
            p.pass_(pw)
        except poplib.error_proto as e:
            out[user] = 'refused'
            continue
        resp, lines, _ = p.uidl(); p.quit()
        out[user] = [l.decode() for l in lines]
    print(json.dumps(out))

def busy_proxy(port_file, upstream, refuse, delay):
    # A front of the legacy server that is busy at first: the first `refuse` connections are
    # closed as soon as they are accepted (reset at connect); then it relays, each connection
    # `delay` seconds after it was accepted.
    import time
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(('127.0.0.1', 0)); srv.listen(256)
    open(port_file + '.tmp', 'w').write(str(srv.getsockname()[1]))
    import os; os.rename(port_file + '.tmp', port_file)
    n = 0
    def pump(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
    while True:
        c, _ = srv.accept()
        n += 1
        if n <= refuse:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
            c.close()
            continue
        def relay(c):
            time.sleep(delay)
            u = socket.create_connection(('127.0.0.1', upstream))
            threading.Thread(target=pump, args=(c, u), daemon=True).start()
            threading.Thread(target=pump, args=(u, c), daemon=True).start()
        threading.Thread(target=relay, args=(c,), daemon=True).start()

def sizes(port, user, pw):
    p = poplib.POP3('127.0.0.1', port); p.user(user); p.pass_(pw)
    resp, lines, _ = p.list(); p.quit()
    print(json.dumps([int(l.split()[1]) for l in lines]))

def hold(ready, pop3_port, pop3_user, imap_port, imap_user, pw, secs):
    # Holds a POP3 session on one server and an IMAP session on the other for `secs` seconds.
    import imaplib, time, os
    p = poplib.POP3('127.0.0.1', pop3_port); p.user(pop3_user); p.pass_(pw)
    i = imaplib.IMAP4('127.0.0.1', imap_port); i.login(imap_user, pw)
    open(ready, 'w').write('ready')
    time.sleep(secs)
    p.quit(); i.logout()

cmd = sys.argv[1]
if cmd == 'hold': hold(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7], float(sys.argv[8]))
elif cmd == 'uidls_all': uidls_all(int(sys.argv[2]), sys.argv[3])
elif cmd == 'sizes': sizes(int(sys.argv[2]), sys.argv[3], sys.argv[4])
elif cmd == 'busy_proxy': busy_proxy(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
"#;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("pbwave")
            .tempdir_in("/tmp")
            .unwrap();
        fs::write(dir.path().join("helpers.py"), HELPERS).unwrap();
        Env { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn py(&self, args: &[&str]) -> String {
        let out = Command::new("python3")
            .arg(self.path("helpers.py"))
            .args(args)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "python {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    /// Every user's UIDL listing through POP3 on `port`.
    fn uidls_all(&self, port: u16, users_file: &Path) -> BTreeMap<String, serde_json::Value> {
        let out = self.py(&["uidls_all", &port.to_string(), users_file.to_str().unwrap()]);
        serde_json::from_str(out.trim()).unwrap()
    }
    fn config(&self, name: &str, new_imap: u16, legacy_pop3: u16) -> PathBuf {
        let path = self.path(name);
        fs::write(
            &path,
            format!(
                "[pop3]\nlisten = \"127.0.0.1:1\"\nplaintext_auth = \"always\"\n\
                 [imap]\nhost = \"127.0.0.1\"\nport = {new_imap}\nsecurity = \"none\"\n\
                 [state]\ndir = \"{}\"\n\
                 [backends.legacy]\nkind = \"pop3\"\nhost = \"127.0.0.1\"\nport = {legacy_pop3}\nsecurity = \"none\"\n",
                self.path("state").display(),
            ),
        )
        .unwrap();
        path
    }
}

fn msg(user: usize, n: usize) -> Vec<u8> {
    format!(
        "From: s{n}@example.org\r\nTo: u{user}@example.net\r\nSubject: m {n}\r\nMessage-ID: <m{user}.{n}@example.org>\r\n\r\nBody {n} of {user}.\r\n{}",
        "more\r\n".repeat(n)
    )
    .into_bytes()
}

/// Outcome lines written to the journal so far (the header line not counted).
fn journal_records(path: &Path) -> usize {
    fs::read_to_string(path)
        .map(|t| t.lines().skip(1).filter(|l| !l.is_empty()).count())
        .unwrap_or(0)
}

fn spawn_wave(args: &[&str], out: &Path) -> Child {
    Command::new(POPBRIDGE_BIN)
        .args(args)
        .stdout(Stdio::from(fs::File::create(out).unwrap()))
        .stderr(Stdio::from(
            fs::File::create(out.with_extension("err")).unwrap(),
        ))
        .spawn()
        .expect("run popbridge")
}

/// Waits until the journal holds at least `n` records (the wave is under way).
fn wait_records(path: &Path, n: usize, child: &mut Child) {
    let t = Instant::now();
    while journal_records(path) < n {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the wave ended before {n} users were done"
        );
        assert!(t.elapsed() < Duration::from_secs(120), "the wave is stuck");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn wait_exit(child: &mut Child) -> Option<i32> {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the wave did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Clean, attention and failed records per login, the last one counting.
fn journal_outcomes(path: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() == 3).then(|| (f[2].to_owned(), f[1].to_owned()))
        })
        .collect()
}

#[test]
fn a_wave_interrupted_by_sigint_and_sigkill_resumes_and_matches_what_clients_saw() {
    let env = Env::new();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF);
    let new = Dovecot::start();
    let n_users = 240;
    let users: Vec<String> = (0..n_users).map(|i| format!("wv{i:03}")).collect();
    // One user's password is wrong on the new store: they fail, the others do not.
    let wrong = "wv007";
    for u in &users {
        legacy.add_user(u, "pw");
        new.add_user(u, if u == wrong { "other" } else { "pw" });
    }
    for (i, u) in users.iter().enumerate() {
        let msgs: Vec<Vec<u8>> = (1..=2 + i % 3).map(|n| msg(i, n)).collect();
        legacy.try_seed(u, &msgs).unwrap();
        // Every fifth user's copies gained headers (matched by header, not by size).
        let copies: Vec<Vec<u8>> = msgs
            .iter()
            .map(|m| {
                if i % 5 == 0 {
                    [&b"Return-Path: <b@example.org>\r\nStatus: RO\r\n"[..], m].concat()
                } else {
                    m.clone()
                }
            })
            .collect();
        new.try_seed(u, &copies).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200));
    let wave = env.path("wave.txt");
    let lines: Vec<String> = users.iter().map(|u| format!("{u}\tpw")).collect();
    fs::write(&wave, format!("# a wave\n{}\n", lines.join("\n"))).unwrap();
    // What the POP3 clients saw on the legacy server before the migration.
    let before = env.uidls_all(legacy.pop3_port(), &wave);
    assert_eq!(before.len(), n_users);

    let cfg = env.config("wave.toml", new.imap_port(), legacy.pop3_port());
    let journal = env.path("wave.txt.uidls.journal");
    let report = env.path("report.jsonl");
    let args: Vec<String> = [
        "migrate",
        "uidls",
        "--config",
        cfg.to_str().unwrap(),
        "--from",
        "legacy",
        "--to",
        "imap",
        "--users-file",
        wave.to_str().unwrap(),
        "--jobs",
        "4",
        "--report-json",
        report.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // 1. SIGINT mid-wave: no new user starts, those in flight finish; exit 130.
    let mut child = spawn_wave(&args, &env.path("run1.out"));
    wait_records(&journal, 30, &mut child);
    signal(&child, "-INT");
    assert_eq!(wait_exit(&mut child), Some(130));
    let out1 = fs::read_to_string(env.path("run1.out")).unwrap();
    let err1 = fs::read_to_string(env.path("run1.err")).unwrap();
    assert!(err1.contains("interrupted: starting no new user"), "{err1}");
    let done1 = journal_records(&journal);
    assert!(done1 >= 30 && done1 < n_users, "{done1}\n{out1}");
    assert!(out1.contains("not started"), "{out1}");
    let user_lines1 = out1.lines().filter(|l| l.starts_with("user ")).count();
    assert_eq!(
        user_lines1, done1,
        "every outcome printed is recorded:\n{out1}"
    );

    // 2. SIGKILL mid-wave: at most the users in flight are lost.
    let mut child = spawn_wave(&args, &env.path("run2.out"));
    wait_records(&journal, done1 + 30, &mut child);
    signal(&child, "-KILL");
    wait_exit(&mut child);
    let done2 = journal_records(&journal);
    assert!(done2 >= done1 + 30, "{done2}");
    let err2 = fs::read_to_string(env.path("run2.err")).unwrap();
    assert!(err2.contains("users already done according to"), "{err2}");

    // 3. The rest: users done are skipped; only the user with the wrong password fails.
    let clean_before = journal_outcomes(&journal)
        .values()
        .filter(|o| *o == "clean")
        .count();
    let out = Command::new(POPBRIDGE_BIN).args(&args).output().unwrap();
    let out3 = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{out3}");
    let outcomes = journal_outcomes(&journal);
    assert_eq!(outcomes.len(), n_users, "every user has an outcome");
    for (u, o) in &outcomes {
        let expected = if u == wrong { "failed" } else { "clean" };
        assert_eq!(o, expected, "{u}");
    }
    let skipped = out3
        .lines()
        .find(|l| l.starts_with("summary uidls:") && l.contains("skipped"))
        .unwrap_or_else(|| panic!("{out3}"));
    assert!(skipped.contains(" 1 failed"), "{skipped}");
    assert_eq!(
        out3.lines().filter(|l| l.starts_with("user ")).count(),
        n_users - clean_before,
        "only the users not done before are worked on:\n{out3}"
    );
    assert!(
        skipped.contains(&format!("{clean_before} skipped")),
        "{skipped}"
    );
    assert!(out3.contains(&format!("user {wrong}: FAILED")), "{out3}");

    // The JSON report: one object per outcome, the last per login as the journal says.
    let mut last: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for line in fs::read_to_string(&report).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["job"], "uidls");
        last.insert(v["login"].as_str().unwrap().to_owned(), v);
    }
    assert_eq!(last.len(), n_users);
    assert_eq!(last[wrong]["outcome"], "failed");
    assert!(last[wrong]["error"].as_str().unwrap().contains("login"));
    let header_user = &last["wv005"]["counts"];
    assert_eq!(header_user["by_header"], 2 + 5 % 3, "{header_user}");
    assert_eq!(
        last["wv001"]["counts"]["by_size"],
        2 + 1,
        "{}",
        last["wv001"]
    );

    // 4. User by user: popbridge in front of the new store shows what the legacy server did.
    let pb = Popbridge::start(&new, "");
    let after = env.uidls_all(pb.pop3_port(), &wave);
    for u in &users {
        if u == wrong {
            continue;
        }
        assert_eq!(
            after[u], before[u],
            "{u}: UIDLs as the legacy server showed them"
        );
    }

    // 5. verify the wave in bulk, in parallel: clean but for the user who could not log in.
    let out = Command::new(POPBRIDGE_BIN)
        .args([
            "migrate",
            "verify",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            "legacy",
            "--to",
            "imap",
            "--users-file",
            wave.to_str().unwrap(),
            "--jobs",
            "4",
        ])
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(
        v.lines().filter(|l| l.contains(": clean (")).count(),
        n_users - 1,
        "{v}"
    );
    assert!(v.contains(&format!("verify {wrong}: FAILED")), "{v}");
    assert!(
        v.contains(&format!("{} users: {} clean", n_users, n_users - 1)),
        "{v}"
    );
}

#[test]
fn a_legacy_server_refusing_connections_slows_the_wave_and_fails_nobody() {
    let env = Env::new();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF);
    let new = Dovecot::start();
    let users: Vec<String> = (0..12).map(|i| format!("th{i:02}")).collect();
    for u in &users {
        legacy.add_user(u, "pw");
        new.add_user(u, "pw");
    }
    for (i, u) in users.iter().enumerate() {
        let msgs: Vec<Vec<u8>> = (1..=3).map(|n| msg(i, n)).collect();
        legacy.try_seed(u, &msgs).unwrap();
        new.try_seed(u, &msgs).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200));
    let port_file = env.path("proxy.port");
    let mut proxy = Command::new("python3")
        .arg(env.path("helpers.py"))
        .args([
            "busy_proxy",
            port_file.to_str().unwrap(),
            &legacy.pop3_port().to_string(),
            "10",
            "0",
        ])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !port_file.exists() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let port: u16 = fs::read_to_string(&port_file).unwrap().parse().unwrap();
    let cfg = env.config("busy.toml", new.imap_port(), port);
    let wave = env.path("busy.txt");
    let lines: Vec<String> = users.iter().map(|u| format!("{u}\tpw")).collect();
    fs::write(&wave, lines.join("\n") + "\n").unwrap();
    let out = Command::new(POPBRIDGE_BIN)
        .args([
            "migrate",
            "uidls",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            "legacy",
            "--to",
            "imap",
            "--users-file",
            wave.to_str().unwrap(),
            "--jobs",
            "4",
            "--max-backoff",
            "1",
            "--report-json",
            env.path("busy.jsonl").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let _ = proxy.kill();
    let _ = proxy.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("12 users: 12 clean"), "{stdout}");
    assert!(
        stderr.contains("the backends throttled 10 times"),
        "{stderr}"
    );
    let retried: usize = fs::read_to_string(env.path("busy.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["attempts"].as_u64().unwrap() > 1)
        .count();
    assert!(retried >= 1, "users were tried again, not failed");
    assert!(
        stdout.contains(&format!("{retried} retried after throttling")),
        "{stdout}"
    );
}

/// Writes `messages` into `user`'s maildir on `dc` with the POP3 size (`W=`) Dovecot will
/// report given by `sizes`: a legacy server whose sizes are wrong.
fn seed_with_sizes(dc: &Dovecot, user: &str, messages: &[Vec<u8>], sizes: &[usize]) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    let ids: Vec<u32> = passwd
        .lines()
        .find(|l| l.starts_with("mail:"))
        .unwrap()
        .split(':')
        .skip(2)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    for (i, (m, w)) in messages.iter().zip(sizes).enumerate() {
        let base = format!(
            "{}.M{i}P1Q{i}.wrongsize,S={},W={w}",
            1_700_000_000 + i,
            m.len()
        );
        let tmp = dc.maildir(user).join("tmp").join(&base);
        fs::write(&tmp, m).unwrap();
        std::os::unix::fs::chown(&tmp, Some(ids[0]), Some(ids[1])).unwrap();
        fs::rename(
            &tmp,
            dc.maildir(user).join("cur").join(format!("{base}:2,")),
        )
        .unwrap();
    }
}

fn uidl_of(line: &serde_json::Value) -> String {
    line.as_str().unwrap().split(' ').nth(1).unwrap().to_owned()
}

fn uidls_of(listing: &serde_json::Value) -> Vec<String> {
    listing.as_array().unwrap().iter().map(uidl_of).collect()
}

#[test]
fn mixed_cases_follow_the_policies_asked_for() {
    let env = Env::new();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF);
    let new = Dovecot::start();
    let names = ["sz", "hd", "idh", "miss", "extra", "xu", "ws", "badpw"];
    for u in names {
        legacy.add_user(u, "pw");
        new.add_user(u, if u == "badpw" { "nope" } else { "pw" });
    }
    let prefix = |m: &[u8]| [&b"Return-Path: <b@example.org>\r\nStatus: RO\r\n"[..], m].concat();
    let three: Vec<Vec<u8>> = (1..=3).map(|n| msg(50, n)).collect();
    for u in ["sz", "hd", "miss", "xu", "badpw"] {
        legacy.try_seed(u, &three).unwrap();
    }
    new.try_seed("sz", &three).unwrap();
    new.try_seed("hd", three.iter().map(|m| prefix(m))).unwrap();
    new.try_seed("miss", three[..2].iter().map(|m| prefix(m)))
        .unwrap();
    new.try_seed("badpw", &three).unwrap();
    // Identical headers, different bodies: paired in order.
    let same = b"From: a@example.org\r\nSubject: same\r\nMessage-ID: <same@x>\r\n\r\n";
    let idh: Vec<Vec<u8>> = ["one\r\n", "two, longer\r\n"]
        .iter()
        .map(|b| [&same[..], b.as_bytes()].concat())
        .collect();
    legacy.try_seed("idh", &idh).unwrap();
    new.try_seed("idh", idh.iter().map(|m| prefix(m))).unwrap();
    // A message the legacy server never had.
    legacy.try_seed("extra", &three[..2]).unwrap();
    new.try_seed("extra", &three).unwrap();
    // Legacy sizes swapped (A says B's size and B says A's); the copies are in the order B, A.
    let (a, b) = (msg(60, 1), msg(60, 3));
    seed_with_sizes(&legacy, "ws", &[a.clone(), b.clone()], &[b.len(), a.len()]);
    new.try_seed("ws", &[b.clone(), a.clone()]).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let all = env.path("all.txt");
    let lines: Vec<String> = names.iter().map(|u| format!("{u}\tpw")).collect();
    fs::write(&all, lines.join("\n") + "\n").unwrap();
    let before = env.uidls_all(legacy.pop3_port(), &all);
    let ws_sizes = env.py(&["sizes", &legacy.pop3_port().to_string(), "ws", "pw"]);
    let ws_sizes: Vec<usize> = serde_json::from_str(ws_sizes.trim()).unwrap();
    let crlf = |m: &[u8]| m.len();
    assert_eq!(
        ws_sizes,
        vec![crlf(&b), crlf(&a)],
        "the legacy server lists each message with the other's size"
    );
    // X-UIDL: the copies carry the legacy UIDL in a header, and nothing else matches (another
    // subject, reversed order).
    let xu_uidls = uidls_of(&before["xu"]);
    let xu_copies: Vec<Vec<u8>> = three
        .iter()
        .zip(&xu_uidls)
        .rev()
        .map(|(m, u)| {
            let m = String::from_utf8_lossy(m).replace("Subject: m ", "Subject: copied ");
            format!("X-UIDL: {u}\r\n{m}").into_bytes()
        })
        .collect();
    new.try_seed("xu", &xu_copies).unwrap();

    let cfg = env.config("mixed.toml", new.imap_port(), legacy.pop3_port());
    let run = |file: &Path, extra: &[&str]| {
        let mut a = vec![
            "migrate",
            "uidls",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            "legacy",
            "--to",
            "imap",
            "--users-file",
            file.to_str().unwrap(),
            "--jobs",
            "3",
        ];
        a.extend_from_slice(extra);
        Command::new(POPBRIDGE_BIN).args(&a).output().unwrap()
    };
    let json = |path: &Path| -> BTreeMap<String, serde_json::Value> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| (v["login"].as_str().unwrap().to_owned(), v))
            .collect()
    };

    // Defaults: safe. Users with a missing copy, an extra message or only X-UIDL headers get
    // nothing stored; the wrong password fails; ws is left for --no-size-pass.
    let first = env.path("first.txt");
    let lines: Vec<String> = names
        .iter()
        .filter(|u| **u != "ws")
        .map(|u| format!("{u}\tpw"))
        .collect();
    fs::write(&first, lines.join("\n") + "\n").unwrap();
    let r1 = env.path("r1.jsonl");
    let out = run(&first, &["--report-json", r1.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("policies: legacy message without a copy: refuse; new-store message without a legacy one: refuse"), "{stdout}");
    let j = json(&r1);
    let outcome = |u: &str| j[u]["outcome"].as_str().unwrap().to_owned();
    for u in ["sz", "hd", "idh"] {
        assert_eq!(outcome(u), "clean", "{u}: {}", j[u]);
    }
    for u in ["miss", "extra", "xu"] {
        assert_eq!(outcome(u), "attention", "{u}: {}", j[u]);
        assert_eq!(j[u]["counts"]["stored"], "nowhere", "{u}");
    }
    assert_eq!(outcome("badpw"), "failed");
    assert_eq!(j["sz"]["counts"]["by_size"], 3);
    assert_eq!(j["hd"]["counts"]["by_header"], 3);
    assert_eq!(j["idh"]["counts"]["duplicates_legacy"], 2);
    assert_eq!(j["miss"]["counts"]["unmatched_legacy"], 1);
    assert_eq!(j["extra"]["counts"]["unmatched_new"], 1);
    assert_eq!(j["xu"]["counts"]["unmatched_legacy"], 3);

    // The policies, X-UIDL headers, and no size pass for the server with wrong sizes.
    let second = env.path("second.txt");
    fs::write(&second, "miss\tpw\nextra\tpw\nxu\tpw\nws\tpw\n").unwrap();
    let r2 = env.path("r2.jsonl");
    let out = run(
        &second,
        &[
            "--legacy-without-copy",
            "drop",
            "--new-without-legacy",
            "new",
            "--x-uidl",
            "--no-size-pass",
            "--report-json",
            r2.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let j = json(&r2);
    assert_eq!(j["xu"]["counts"]["by_x_uidl"], 3, "{}", j["xu"]);
    assert_eq!(j["ws"]["counts"]["by_header"], 2, "{}", j["ws"]);

    // What each client sees through popbridge.
    let pb = Popbridge::start(&new, "");
    let after = env.uidls_all(pb.pop3_port(), &all);
    for u in ["sz", "hd", "idh"] {
        assert_eq!(after[u], before[u], "{u}");
    }
    let legacy_of = |u: &str| uidls_of(&before[u]);
    assert_eq!(uidls_of(&after["miss"]), legacy_of("miss")[..2].to_vec());
    let extra = uidls_of(&after["extra"]);
    assert_eq!(extra[..2], legacy_of("extra")[..]);
    assert!(
        !legacy_of("extra").contains(&extra[2]),
        "served as new mail"
    );
    let mut reversed = legacy_of("xu");
    reversed.reverse();
    assert_eq!(uidls_of(&after["xu"]), reversed, "X-UIDL headers kept");
    let ws = legacy_of("ws");
    assert_eq!(
        uidls_of(&after["ws"]),
        vec![ws[1].clone(), ws[0].clone()],
        "matched by header, not by the wrong sizes"
    );
    assert_eq!(after["badpw"], "refused");
}

#[test]
fn dovecots_refusing_logins_over_their_connection_limit_slow_the_wave_down() {
    // One connection per user and address on each side: a client holding a session makes the
    // wave's login for that user refused (checked: the legacy POP3 answers `-ERR [IN-USE]
    // Maximum number of connections from user+IP exceeded`, the new IMAP store `NO [LIMIT]`).
    let limit = "mail_max_userip_connections = 1";
    let legacy = Dovecot::start_with_conf(&format!("{LEGACY_CONF}\n{limit}"));
    let new = Dovecot::start_with_conf(limit);
    let env = Env::new();
    let users: Vec<String> = (0..6).map(|i| format!("lim{i}")).collect();
    for u in &users {
        legacy.add_user(u, "pw");
        new.add_user(u, "pw");
    }
    for (i, u) in users.iter().enumerate() {
        let msgs: Vec<Vec<u8>> = (1..=3).map(|n| msg(i, n)).collect();
        legacy.try_seed(u, &msgs).unwrap();
        new.try_seed(u, &msgs).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200));
    let ready = env.path("held");
    let mut holder = Command::new("python3")
        .arg(env.path("helpers.py"))
        .args([
            "hold",
            ready.to_str().unwrap(),
            &legacy.pop3_port().to_string(),
            "lim0",
            &new.imap_port().to_string(),
            "lim1",
            "pw",
            "2.5",
        ])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !ready.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the holder did not log in"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let cfg = env.config("limit.toml", new.imap_port(), legacy.pop3_port());
    let wave = env.path("limit.txt");
    let lines: Vec<String> = users.iter().map(|u| format!("{u}\tpw")).collect();
    fs::write(&wave, lines.join("\n") + "\n").unwrap();
    let report = env.path("limit.jsonl");
    let out = Command::new(POPBRIDGE_BIN)
        .args([
            "migrate",
            "uidls",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            "legacy",
            "--to",
            "imap",
            "--users-file",
            wave.to_str().unwrap(),
            "--jobs",
            "3",
            "--attempts",
            "40",
            "--max-backoff",
            "1",
            "--report-json",
            report.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let _ = holder.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("6 users: 6 clean"), "{stdout}");
    let attempts: BTreeMap<String, u64> = fs::read_to_string(&report)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            (
                v["login"].as_str().unwrap().to_owned(),
                v["attempts"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        attempts["lim0"] > 1,
        "legacy POP3 refused lim0 at first: {attempts:?}"
    );
    assert!(
        attempts["lim1"] > 1,
        "the new IMAP store refused lim1 at first: {attempts:?}"
    );
    assert_eq!(attempts["lim2"], 1, "{attempts:?}");
    assert!(stderr.contains("the backends throttled"), "{stderr}");
}

#[test]
fn a_second_sigint_abandons_the_users_in_flight_and_a_rerun_redoes_them() {
    let env = Env::new();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF);
    let new = Dovecot::start();
    let users: Vec<String> = (0..5).map(|i| format!("ab{i}")).collect();
    for u in &users {
        legacy.add_user(u, "pw");
        new.add_user(u, "pw");
    }
    for (i, u) in users.iter().enumerate() {
        let msgs: Vec<Vec<u8>> = (1..=2).map(|n| msg(i, n)).collect();
        legacy.try_seed(u, &msgs).unwrap();
        new.try_seed(u, &msgs).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200));
    // A slow legacy front: every connection waits 20 s before it is relayed.
    let port_file = env.path("slow.port");
    let mut proxy = Command::new("python3")
        .arg(env.path("helpers.py"))
        .args([
            "busy_proxy",
            port_file.to_str().unwrap(),
            &legacy.pop3_port().to_string(),
            "0",
            "20",
        ])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !port_file.exists() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let port: u16 = fs::read_to_string(&port_file).unwrap().parse().unwrap();
    let slow = env.config("slow.toml", new.imap_port(), port);
    let wave = env.path("ab.txt");
    let lines: Vec<String> = users.iter().map(|u| format!("{u}\tpw")).collect();
    fs::write(&wave, lines.join("\n") + "\n").unwrap();
    let args = |cfg: &Path| -> Vec<String> {
        [
            "migrate",
            "uidls",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            "legacy",
            "--to",
            "imap",
            "--users-file",
            wave.to_str().unwrap(),
            "--jobs",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let slow_args = args(&slow);
    let a: Vec<&str> = slow_args.iter().map(String::as_str).collect();
    let out_path = env.path("ab.out");
    let mut child = spawn_wave(&a, &out_path);
    // Two users are in flight, waiting for the legacy greeting.
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, "-INT");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first SIGINT waits for the users in flight"
    );
    signal(&child, "-INT");
    let t = Instant::now();
    assert_eq!(wait_exit(&mut child), Some(130));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "abandoned at once, not after the slow server"
    );
    let _ = proxy.kill();
    let _ = proxy.wait();
    let out = fs::read_to_string(&out_path).unwrap();
    let err = fs::read_to_string(out_path.with_extension("err")).unwrap();
    assert!(err.contains("abandoning the users in flight"), "{err}");
    assert_eq!(
        out.matches(": abandoned (stopped; a re-run redoes it)")
            .count(),
        2,
        "{out}"
    );
    assert!(out.contains("2 abandoned, 3 not started"), "{out}");
    let journal = env.path("ab.txt.uidls.journal");
    assert_eq!(
        journal_records(&journal),
        0,
        "nothing recorded for users abandoned"
    );

    // The re-run, with the legacy server reachable again, does every user.
    let fast = env.config("fast.toml", new.imap_port(), legacy.pop3_port());
    let fast_args = args(&fast);
    let out = Command::new(POPBRIDGE_BIN)
        .args(&fast_args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("5 users: 5 clean"), "{stdout}");
    assert_eq!(journal_records(&journal), 5);
}
