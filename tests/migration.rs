//! Migrating POP3 users end to end: a legacy Dovecot POP3 service with Cyrus-style UIDLs
//! (`%v.%u`), a second Dovecot as the new IMAP store holding the same messages copied over
//! IMAP (other UIDs, one message with added Return-Path/Status headers), a POP3 client with a
//! UIDL memory ("leave mail on server", like fetchmail or Outlook), `popbridge migrate`, and
//! the same client then talking to popbridge.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::*;

const LEGACY_CONF: &str = "pop3_uidl_format = %v.%u";

fn msg(n: usize) -> Vec<u8> {
    format!(
        "From: sender{n}@example.org\r\nTo: user@example.net\r\nSubject: message {n}\r\nMessage-ID: <m{n}@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:{:02} +0000\r\n\r\nBody of message {n}.\r\n{}\r\n",
        n % 60,
        "padding line\r\n".repeat(n % 4)
    )
    .into_bytes()
}

/// Python helpers: an IMAP copier and a POP3 client that remembers UIDLs.
const HELPERS: &str = r#"
import imaplib, poplib, json, sys, os, hashlib
poplib._MAXLINE = 1 << 20

def copy(src_port, dst_port, user, pw, prefix_for):
    # Copies every INBOX message from src to dst over IMAP (new UIDs on dst). Messages whose
    # index (1-based) is in prefix_for get headers added that servers add or rewrite.
    s = imaplib.IMAP4('127.0.0.1', src_port); s.login(user, pw); s.select('INBOX', readonly=True)
    d = imaplib.IMAP4('127.0.0.1', dst_port); d.login(user, pw); d.select('INBOX')
    typ, data = s.uid('SEARCH', None, 'ALL')
    uids = data[0].split()
    for i, uid in enumerate(uids, 1):
        typ, data = s.uid('FETCH', uid, '(BODY.PEEK[])')
        body = data[0][1]
        if str(i) in prefix_for:
            body = b'Return-Path: <bounce@example.org>\r\nStatus: RO\r\nX-UID: 99\r\n' + body
        typ, _ = d.append('INBOX', None, None, body)
        assert typ == 'OK', typ
    s.logout(); d.logout()

def copy_as(src_port, dst_port, src_user, dst_user, pw, prefix_for):
    # copy() for a user whose login differs between the platforms (same password).
    s = imaplib.IMAP4('127.0.0.1', src_port); s.login(src_user, pw); s.select('INBOX', readonly=True)
    d = imaplib.IMAP4('127.0.0.1', dst_port); d.login(dst_user, pw); d.select('INBOX')
    typ, data = s.uid('SEARCH', None, 'ALL')
    for i, uid in enumerate(data[0].split(), 1):
        typ, data = s.uid('FETCH', uid, '(BODY.PEEK[])')
        body = data[0][1]
        if str(i) in prefix_for:
            body = b'Return-Path: <bounce@example.org>\r\nStatus: RO\r\nX-UID: 99\r\n' + body
        typ, _ = d.append('INBOX', None, None, body)
        assert typ == 'OK', typ
    s.logout(); d.logout()

def burn_uids(port, user, pw, n):
    # Appends and expunges n messages so that later UIDs differ from the legacy server's.
    d = imaplib.IMAP4('127.0.0.1', port); d.login(user, pw); d.select('INBOX')
    for i in range(n):
        d.append('INBOX', None, None, b'Subject: burn\r\n\r\nx\r\n')
    d.store('1:*', '+FLAGS', '(\\Deleted)'); d.expunge(); d.logout()

def append(port, user, pw, path):
    d = imaplib.IMAP4('127.0.0.1', port); d.login(user, pw)
    typ, _ = d.append('INBOX', None, None, open(path, 'rb').read()); assert typ == 'OK'
    d.logout()

def fetchmail(port, user, pw, state):
    # One "leave on server" run: download every message whose UIDL is not remembered.
    seen = json.load(open(state)) if os.path.exists(state) else {}
    p = poplib.POP3('127.0.0.1', port); p.user(user); p.pass_(pw)
    resp, lines, _ = p.uidl()
    listing = [l.decode().split(' ', 1) for l in lines]
    got = []
    for num, uidl in listing:
        if uidl in seen:
            continue
        resp, body, _ = p.retr(int(num))
        seen[uidl] = hashlib.sha256(b'\r\n'.join(body)).hexdigest()
        got.append(uidl)
    p.quit()
    json.dump(seen, open(state, 'w'))
    print(json.dumps({"downloaded": got, "uidls": [u for _, u in listing]}))

def setmeta(port, user, pw, *pairs):
    # Writes METADATA entries on INBOX directly, as another tool (or a damaged copy) would.
    d = imaplib.IMAP4('127.0.0.1', port); d.login(user, pw)
    for i in range(0, len(pairs), 2):
        name, value = pairs[i], pairs[i + 1].encode()
        tag = d._new_tag().decode()
        d.send(('%s SETMETADATA INBOX (%s {%d+}\r\n' % (tag, name, len(value))).encode() + value + b')\r\n')
        while True:
            line = d.readline()
            if line.startswith(tag.encode()):
                assert b' OK ' in line, line
                break
    d.logout()

def setmap(port, user, pw, uv, gen, *chunks):
    # Writes a map in popbridge's METADATA layout: chunks of generation gen, then the head.
    text = ' '.join(chunks)
    entry = '/private/vendor/popbridge/uidl-map'
    count = len(text.split(' ')) if text else 0
    head = 'popbridge-uidl-map/2 %s %d gen=%s chunks=%d chunk=%d bytes=%d sha256=%s' % (
        uv, count, gen, len(chunks), max([len(c) for c in chunks] or [0]), len(text),
        hashlib.sha256(text.encode()).hexdigest())
    pairs = []
    for i, c in enumerate(chunks):
        pairs += ['%s/%s/%d' % (entry, gen, i), c]
    setmeta(port, user, pw, *(pairs + [entry, head]))

def metacmd(port, user, pw, command):
    # One raw command on INBOX's METADATA; prints the untagged lines and the tagged status.
    d = imaplib.IMAP4('127.0.0.1', port); d.login(user, pw)
    tag = d._new_tag().decode()
    d.send(('%s %s\r\n' % (tag, command)).encode())
    out = []
    while True:
        line = d.readline()
        out.append(line.decode(errors='replace').rstrip('\r\n'))
        if line.startswith(tag.encode()):
            break
    d.logout()
    print(json.dumps(out))

def login(port, user, pw):
    # The answer to PASS, and the UIDL listing when logged in.
    p = poplib.POP3('127.0.0.1', port); p.user(user)
    try:
        p.pass_(pw)
    except poplib.error_proto as e:
        print(json.dumps({"pass": e.args[0].decode()}))
        return
    resp, lines, _ = p.uidl(); p.quit()
    print(json.dumps({"pass": "+OK", "uidls": [l.decode() for l in lines]}))

def uidls(port, user, pw):
    p = poplib.POP3('127.0.0.1', port); p.user(user); p.pass_(pw)
    resp, lines, _ = p.uidl(); p.quit()
    print(json.dumps([l.decode() for l in lines]))

cmd = sys.argv[1]
args = sys.argv[2:]
if cmd == 'copy': copy(int(args[0]), int(args[1]), args[2], args[3], args[4].split(',') if len(args) > 4 else [])
elif cmd == 'copy_as': copy_as(int(args[0]), int(args[1]), args[2], args[3], args[4], args[5].split(',') if len(args) > 5 else [])
elif cmd == 'burn': burn_uids(int(args[0]), args[1], args[2], int(args[3]))
elif cmd == 'append': append(int(args[0]), args[1], args[2], args[3])
elif cmd == 'fetchmail': fetchmail(int(args[0]), args[1], args[2], args[3])
elif cmd == 'uidls': uidls(int(args[0]), args[1], args[2])
elif cmd == 'setmeta': setmeta(int(args[0]), args[1], args[2], *args[3:])
elif cmd == 'setmap': setmap(int(args[0]), args[1], args[2], *args[3:])
elif cmd == 'metacmd': metacmd(int(args[0]), args[1], args[2], args[3])
elif cmd == 'login': login(int(args[0]), args[1], args[2])
"#;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("pbmig")
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
            "python {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    /// One run of the remembering POP3 client: (downloaded UIDLs, listed UIDLs).
    fn fetchmail(&self, port: u16, user: &str, pw: &str) -> (Vec<String>, Vec<String>) {
        let state = self.path(&format!("{user}.seen.json"));
        let out = self.py(&[
            "fetchmail",
            &port.to_string(),
            user,
            pw,
            state.to_str().unwrap(),
        ]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let list = |k: &str| -> Vec<String> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        (list("downloaded"), list("uidls"))
    }
    fn uidls(&self, port: u16, user: &str, pw: &str) -> Vec<String> {
        let out = self.py(&["uidls", &port.to_string(), user, pw]);
        serde_json::from_str(out.trim()).unwrap()
    }
    /// A migrate config: [imap] is the new store, [backends.legacy] the legacy POP3 service.
    fn config(&self, name: &str, new: &Dovecot, legacy: &Dovecot, state: &Path) -> PathBuf {
        let path = self.path(name);
        fs::write(
            &path,
            format!(
                "[pop3]\nlisten = \"127.0.0.1:1\"\nplaintext_auth = \"always\"\n\
                 [imap]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
                 [state]\ndir = \"{}\"\n\
                 [backends.legacy]\nkind = \"pop3\"\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
                new.imap_port(),
                state.display(),
                legacy.pop3_port()
            ),
        )
        .unwrap();
        path
    }
}

fn popbridge(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_popbridge"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run popbridge")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_remembering_client_downloads_nothing_twice_and_loses_nothing() {
    let env = Env::new();
    let (user, pw) = ("alice", "alicepw");
    let msgs: Vec<Vec<u8>> = (1..=5).map(msg).collect();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF);
    let new = Dovecot::start();
    legacy.add_user(user, pw);
    new.add_user(user, pw);
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    legacy.seed(user, &refs);

    // Before the switch: the client talks to the legacy server and downloads everything.
    let (got, listed) = env.fetchmail(legacy.pop3_port(), user, pw);
    assert_eq!(got.len(), 5);
    assert!(
        listed.iter().all(|u| u.contains('.')),
        "legacy UIDLs are %v.%u: {listed:?}"
    );
    // Mail arriving at the legacy server that the client has not fetched yet.
    legacy.seed(user, &[&msg(6)]);

    // The mailbox is copied over IMAP: other UIDs, and message 2 gains Return-Path/Status.
    env.py(&["burn", &new.imap_port().to_string(), user, pw, "3"]);
    env.py(&[
        "copy",
        &legacy.imap_port().to_string(),
        &new.imap_port().to_string(),
        user,
        pw,
        "2",
    ]);
    let new_uids = new.imap_state(user, pw, "INBOX").uids();
    assert_eq!(new_uids, vec![4, 5, 6, 7, 8, 9], "copies got other UIDs");

    let state_a = env.path("state-a");
    let cfg = env.config("a.toml", &new, &legacy, &state_a);
    let cfg_s = cfg.to_str().unwrap();
    let pwenv = [("ALICE_PW", pw)];
    let out = popbridge(
        &[
            "migrate",
            "uidls",
            "--config",
            cfg_s,
            "--from",
            "legacy",
            "--to",
            "imap",
            "--user",
            user,
            "--password-env",
            "ALICE_PW",
        ],
        &pwenv,
    );
    assert!(out.status.success(), "{}", text(&out));
    let report = stdout(&out);
    assert!(
        report.contains("legacy 6, new 6; matched 6 (1 by size, 5 by header); unmatched legacy 0, unmatched new 0"),
        "{}",
        text(&out)
    );
    assert!(report.contains("stored metadata+sled"), "{report}");
    assert!(!report.contains(pw) && !String::from_utf8_lossy(&out.stderr).contains(pw));

    // Shadow check before the switch: clean.
    let verify = |cfg: &str| {
        popbridge(
            &[
                "migrate",
                "verify",
                "--config",
                cfg,
                "--from",
                "legacy",
                "--to",
                "imap",
                "--user",
                user,
                "--password-env",
                "ALICE_PW",
            ],
            &pwenv,
        )
    };
    let out = verify(cfg_s);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("verify alice: clean (6 messages"),
        "{}",
        text(&out)
    );

    // The switch: the client now talks to popbridge in front of the new store.
    let extra = format!("[state]\ndir = \"{}\"", state_a.display());
    let pb_a = Popbridge::start(&new, &extra);
    let (got, listed_a) = env.fetchmail(pb_a.pop3_port(), user, pw);
    let legacy_uidls = env.uidls(legacy.pop3_port(), user, pw);
    let legacy_6 = legacy_uidls[5].split(' ').nth(1).unwrap().to_string();
    assert_eq!(
        got,
        vec![legacy_6.clone()],
        "only the not yet fetched message 6, under its legacy UIDL"
    );
    let legacy_set: Vec<String> = legacy_uidls
        .iter()
        .map(|l| l.split(' ').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(listed_a, legacy_set, "every legacy UIDL, same order");

    // New mail after the migration shows with the normal format and is downloaded once.
    fs::write(env.path("m7.eml"), msg(7)).unwrap();
    env.py(&[
        "append",
        &new.imap_port().to_string(),
        user,
        pw,
        env.path("m7.eml").to_str().unwrap(),
    ]);
    let uv = new.imap_state(user, pw, "INBOX").uidvalidity;
    let (got, _) = env.fetchmail(pb_a.pop3_port(), user, pw);
    assert_eq!(got, vec![format!("{:08x}{:08x}", 10, uv)]);
    let (got, listed_a) = env.fetchmail(pb_a.pop3_port(), user, pw);
    assert!(got.is_empty(), "nothing twice: {got:?}");

    // A second instance with its own, empty state never ran migrate: it reads METADATA.
    let pb_b = Popbridge::start(&new, "");
    let listed_b = env.uidls(pb_b.pop3_port(), user, pw);
    let numbered: Vec<String> = listed_a
        .iter()
        .enumerate()
        .map(|(i, u)| format!("{} {u}", i + 1))
        .collect();
    assert_eq!(listed_b, numbered, "both instances serve the same UIDLs");
    let (got, _) = env.fetchmail(pb_b.pop3_port(), user, pw);
    assert!(
        got.is_empty(),
        "nothing twice through the other instance: {got:?}"
    );

    // Losing the local state changes no UIDL: the map comes back from METADATA.
    drop(pb_a.stop());
    fs::remove_dir_all(&state_a).unwrap();
    let pb_a2 = Popbridge::start(&new, &extra);
    assert_eq!(env.uidls(pb_a2.pop3_port(), user, pw), numbered);
    let (got, _) = env.fetchmail(pb_a2.pop3_port(), user, pw);
    assert!(got.is_empty(), "nothing twice after losing sled: {got:?}");
    drop(pb_a2);

    // Verify reports an altered message on the new store (same size, one byte changed).
    let md = new.maildir(user);
    let mut altered = false;
    for sub in ["cur", "new"] {
        for e in fs::read_dir(md.join(sub)).unwrap() {
            let p = e.unwrap().path();
            let body = fs::read(&p).unwrap();
            let needle = b"Body of message 3.";
            if let Some(at) = body.windows(needle.len()).position(|w| w == needle) {
                let mut b = body.clone();
                b[at + 5] = b'X';
                fs::write(&p, b).unwrap();
                altered = true;
            }
        }
    }
    assert!(altered);
    // Message 7 exists only on the new store, so verify also names it as new to the client.
    let out = verify(cfg_s);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = stdout(&out);
    let legacy_3 = &legacy_set[2];
    assert!(
        report.contains(&format!(
            "DIFF alice: UIDL {legacy_3}: message bytes differ"
        )),
        "{report}"
    );
    assert!(report.contains("is not on the legacy server"), "{report}");
}

#[test]
fn a_wave_from_a_users_file_and_a_changed_uidl_refusal() {
    let env = Env::new();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF);
    let new = Dovecot::start();
    let users = [("u1", "pw1"), ("u2", "pw2"), ("u3", "pw3")];
    // Every user first: Dovecot re-reads its passwd-file at most once a second.
    for (u, p) in users {
        legacy.add_user(u, p);
        new.add_user(u, p);
    }
    for (i, (u, p)) in users.iter().enumerate() {
        let msgs: Vec<Vec<u8>> = (1..=3 + i).map(|n| msg(n * 10 + i)).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        legacy.seed(u, &refs);
        env.py(&["burn", &new.imap_port().to_string(), u, p, "2"]);
        env.py(&[
            "copy",
            &legacy.imap_port().to_string(),
            &new.imap_port().to_string(),
            u,
            p,
            "1",
        ]);
    }
    // u3 has a legacy message that never reached the new store.
    legacy.seed("u3", &[&msg(99)]);
    let cfg = env.config("wave.toml", &new, &legacy, &env.path("state"));
    let wave = env.path("wave.txt");
    let lines: Vec<String> = users.iter().map(|(u, p)| format!("{u}\t{p}")).collect();
    fs::write(&wave, format!("# wave 1\n{}\n", lines.join("\n"))).unwrap();
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
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
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        popbridge(&a, &[])
    };
    let out = run(args(&[]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = stdout(&out);
    assert!(
        report.contains("user u1: legacy 3, new 3; matched 3"),
        "{report}"
    );
    assert!(
        report.contains("user u2: legacy 4, new 4; matched 4"),
        "{report}"
    );
    assert!(
        report.contains("user u3: legacy 6, new 5; matched 5"),
        "{report}"
    );
    assert!(report.contains("unmatched legacy 1"), "{report}");
    assert!(report.contains("REFUSED"), "{report}");
    assert!(report.contains("has no match in the new store"), "{report}");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("3/3 users"), "{progress}");
    for (_, p) in users {
        assert!(
            !report.contains(p) && !progress.contains(p),
            "a password leaked"
        );
    }
    // u3 got nothing stored: popbridge would serve it only generated UIDLs.
    let pb = Popbridge::start(
        &new,
        &format!("[state]\ndir = \"{}\"", env.path("state-pb").display()),
    );
    let u1 = env.uidls(pb.pop3_port(), "u1", "pw1");
    assert!(u1.iter().all(|l| l.contains('.')), "u1 migrated: {u1:?}");
    let u3 = env.uidls(pb.pop3_port(), "u3", "pw3");
    assert!(
        u3.iter().all(|l| !l.contains('.')),
        "u3 not migrated: {u3:?}"
    );
    drop(pb);
    // Accepting the change stores u3's map (and changes nothing for the others: --redo works
    // on the users the wave's journal records as done too).
    let out = run(args(&["--accept-changed-uidls", "--redo"]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("1 changed UIDLs accepted"),
        "{}",
        text(&out)
    );
    assert!(stdout(&out).contains("user u1: legacy 3, new 3; matched 3 (0 by size, 3 by header); unmatched legacy 0, unmatched new 0; duplicates 0/0; conflicts 0; stored unchanged; ok"), "{}", text(&out));
}

#[test]
fn import_from_a_file_is_validated_then_served() {
    let env = Env::new();
    let new = Dovecot::start();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF); // only for the config's backend
    new.add_user("dave", "davepw");
    new.seed("dave", &[&msg(1), &msg(2), &msg(3)]);
    let cfg = env.config("imp.toml", &new, &legacy, &env.path("state"));
    let cfg_s = cfg.to_str().unwrap();
    let pwenv = [("DAVE_PW", "davepw")];
    let import = |file: &Path, extra: &[&str]| {
        let mut a = vec![
            "migrate",
            "import",
            "--config",
            cfg_s,
            "--to",
            "imap",
            "--file",
            file.to_str().unwrap(),
            "--password-env",
            "DAVE_PW",
        ];
        a.extend_from_slice(extra);
        popbridge(&a, &pwenv)
    };
    let bad = env.path("bad.map");
    fs::write(&bad, "dave 1 OLD-1\ndave two OLD-2\ndave 3 OLD-1\n").unwrap();
    let out = import(&bad, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.map:2: UID \"two\""), "{err}");
    assert!(
        err.contains("bad.map:3: UIDL OLD-1 of dave already given on line 1"),
        "{err}"
    );

    let good = env.path("good.map");
    fs::write(
        &good,
        "# from the old platform\ndave 1 OLD-1\ndave 3 OLD-3\n",
    )
    .unwrap();
    let out = import(&good, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("user dave: imported 2 lines; conflicts 0; stored metadata+sled; ok"),
        "{}",
        text(&out)
    );

    let pb = Popbridge::start(&new, "");
    let uv = new.imap_state("dave", "davepw", "INBOX").uidvalidity;
    let got: BTreeMap<String, String> = env
        .uidls(pb.pop3_port(), "dave", "davepw")
        .iter()
        .map(|l| {
            let (n, u) = l.split_once(' ').unwrap();
            (n.to_string(), u.to_string())
        })
        .collect();
    assert_eq!(got["1"], "OLD-1");
    assert_eq!(got["2"], format!("{:08x}{:08x}", 2, uv));
    assert_eq!(got["3"], "OLD-3");

    // A file that would change an existing mapping is refused unless accepted.
    let change = env.path("change.map");
    fs::write(&change, "dave 1 OTHER-1\n").unwrap();
    let out = import(&change, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stdout(&out).contains("REFUSED"), "{}", text(&out));
    assert_eq!(env.uidls(pb.pop3_port(), "dave", "davepw")[0], "1 OLD-1");
}

/// One mailbox reached under two backend names (an alias of `[imap]`, and `[imap]` with a
/// login template) is one maildrop: the map `migrate` stored for it (in the local state only)
/// is served under either name, and a session under one name locks out the other.
#[test]
fn one_mailbox_under_two_backend_names_shares_its_map_and_its_lock() {
    let env = Env::new();
    let new = Dovecot::start();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF); // only for the config's backend
    new.add_user("erin", "erinpw");
    new.seed("erin", &[&msg(1), &msg(2)]);
    let state = env.path("state");
    let cfg = env.config("alias.toml", &new, &legacy, &state);
    let mut toml = fs::read_to_string(&cfg).unwrap();
    toml.push_str("[migration]\nshared_map = \"none\"\n");
    fs::write(&cfg, toml).unwrap();
    let file = env.path("erin.map");
    fs::write(&file, "erin 1 OLD-1\n").unwrap();
    let out = popbridge(
        &[
            "migrate",
            "import",
            "--config",
            cfg.to_str().unwrap(),
            "--to",
            "imap",
            "--file",
            file.to_str().unwrap(),
            "--password-env",
            "PW",
        ],
        &[("PW", "erinpw")],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("stored sled; ok"), "{}", text(&out));

    let pb = Popbridge::start(
        &new,
        &format!(
            "[state]\ndir = \"{}\"\n[migration]\nshared_map = \"none\"\n\
             [backends.alias]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
             [routing]\nrules = [{{ match = \"erin\", backend = \"alias\" }}, \
             {{ match = \"erin.2\", backend = \"imap\", login = \"erin\" }}]\n",
            state.display(),
            new.imap_port()
        ),
    );
    let uv = new.imap_state("erin", "erinpw", "INBOX").uidvalidity;
    assert_eq!(
        env.uidls(pb.pop3_port(), "erin", "erinpw"),
        vec!["1 OLD-1".to_owned(), format!("2 {:08x}{:08x}", 2, uv)],
        "the map stored for [imap] is served through the alias"
    );
    let mut held = support::raw::RawPop3::ready(pb.pop3_port());
    held.login("erin", "erinpw");
    let other = poplib(pb.pop3_port(), &["user erin.2", "pass erinpw"]);
    assert!(
        other.step("pass erinpw").resp.starts_with("-ERR [IN-USE]"),
        "{}",
        other.step("pass erinpw").resp
    );
    assert!(held.cmd("QUIT").starts_with("+OK"));
}

/// Both sides log in as the operator's master user (SASL PLAIN with the user as authorization
/// identity), so a wave needs no user passwords.
#[test]
fn master_users_migrate_a_wave_without_user_passwords() {
    let env = Env::new();
    let master = MasterPassdb::new("migrator", "m4ster");
    let master_conf = &master.conf;
    let legacy = Dovecot::start_with_conf(&format!("{LEGACY_CONF}\n{master_conf}"));
    let new = Dovecot::start_with_conf(master_conf);
    let users = [("m1", "secret1"), ("m2", "secret2")];
    // Every user first: Dovecot re-reads its passwd-file at most once a second.
    for (u, p) in users {
        legacy.add_user(u, p);
        new.add_user(u, p);
    }
    for (i, (u, p)) in users.iter().enumerate() {
        let msgs: Vec<Vec<u8>> = (1..=2 + i).map(|n| msg(n * 7 + i)).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        legacy.seed(u, &refs);
        env.py(&["burn", &new.imap_port().to_string(), u, p, "1"]);
        env.py(&[
            "copy",
            &legacy.imap_port().to_string(),
            &new.imap_port().to_string(),
            u,
            p,
        ]);
    }
    let pwfile = &master.password_file;
    let cfg = env.config("master.toml", &new, &legacy, &env.path("state"));
    let mut conf = fs::read_to_string(&cfg).unwrap();
    let master_keys = format!(
        "master_user = \"migrator\"\nmaster_password_file = \"{}\"\n",
        pwfile.display()
    );
    conf = conf.replace(
        "[state]",
        &format!("{master_keys}verify_password_with = \"legacy\"\n[state]"),
    );
    conf.push_str(&master_keys);
    fs::write(&cfg, conf).unwrap();
    let wave = env.path("wave.txt");
    fs::write(&wave, "m1\nm2\n").unwrap();
    let out = popbridge(
        &[
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
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let report = stdout(&out);
    assert!(
        report.contains("user m1: legacy 2, new 2; matched 2"),
        "{report}"
    );
    assert!(
        report.contains("user m2: legacy 3, new 3; matched 3"),
        "{report}"
    );
    assert!(!report.contains("m4ster") && !String::from_utf8_lossy(&out.stderr).contains("m4ster"));
    // verify needs no user password either: both sides have a master user.
    for (u, _) in users {
        let out = popbridge(
            &[
                "migrate",
                "verify",
                "--config",
                cfg.to_str().unwrap(),
                "--from",
                "legacy",
                "--to",
                "imap",
                "--user",
                u,
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            stdout(&out).contains(&format!("verify {u}: clean")),
            "{}",
            text(&out)
        );
    }
    // Without a master user on the new store, verify still asks for the user's password.
    let plain_cfg = env.config("plain.toml", &new, &legacy, &env.path("state2"));
    let mut conf = fs::read_to_string(&plain_cfg).unwrap();
    conf.push_str(&master_keys);
    fs::write(&plain_cfg, conf).unwrap();
    let out = popbridge(
        &[
            "migrate",
            "verify",
            "--config",
            plain_cfg.to_str().unwrap(),
            "--from",
            "legacy",
            "--to",
            "imap",
            "--user",
            "m1",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unless that backend has a master_user"),
        "{}",
        text(&out)
    );
    // The wave file holds no passwords: only the master logins could have succeeded.
    let pb = Popbridge::start(&new, "");
    for (u, p) in users {
        let via_pb = env.uidls(pb.pop3_port(), u, p);
        let via_legacy = env.uidls(legacy.pop3_port(), u, p);
        assert_eq!(via_pb, via_legacy, "{u}");
    }
}

/// A map in METADATA is served as documented, and one written under another UIDVALIDITY
/// (the folder was recreated since) is ignored and counted.
#[test]
fn metadata_maps_are_read_and_stale_ones_ignored() {
    let env = Env::new();
    let new = Dovecot::start();
    new.add_user("erin", "erinpw");
    new.add_user("fred", "fredpw");
    new.seed("erin", &[&msg(1), &msg(2)]);
    new.seed("fred", &[&msg(3)]);
    let uv_e = new.imap_state("erin", "erinpw", "INBOX").uidvalidity;
    let uv_f = new.imap_state("fred", "fredpw", "INBOX").uidvalidity;
    env.py(&[
        "setmap",
        &new.imap_port().to_string(),
        "erin",
        "erinpw",
        &uv_e.to_string(),
        "g1",
        "2:OLD-TWO",
    ]);
    env.py(&[
        "setmap",
        &new.imap_port().to_string(),
        "fred",
        "fredpw",
        &uv_f.wrapping_add(1).to_string(),
        "g1",
        "1:STALE",
    ]);
    let mport = free_ports(1)[0];
    let pb = Popbridge::start(&new, &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""));
    assert_eq!(
        env.uidls(pb.pop3_port(), "erin", "erinpw"),
        vec![format!("1 {:08x}{uv_e:08x}", 1), "2 OLD-TWO".to_string()]
    );
    assert_eq!(
        env.uidls(pb.pop3_port(), "fred", "fredpw"),
        vec![format!("1 {:08x}{uv_f:08x}", 1)],
        "a map for another UIDVALIDITY is ignored"
    );
    // Second login of erin: the head is read again, the map comes from the cache.
    env.uidls(pb.pop3_port(), "erin", "erinpw");
    let (status, body) = support::prometheus::http_get(mport, "/metrics").unwrap();
    assert_eq!(status, 200);
    let value = |outcome: &str| -> f64 {
        let prefix = format!("popbridge_uidl_maps_total{{outcome=\"{outcome}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {prefix} in\n{body}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(value("metadata"), 1.0);
    assert_eq!(value("cache"), 1.0);
    assert_eq!(value("stale"), 1.0);
    assert_eq!(value("error"), 0.0);
}

/// popbridge in front of a Dovecot serves what Dovecot's own POP3 service serves (same UIDL
/// format, same store): verify must find no difference over the mailbox of edge cases (no
/// final newline, long lines, dots, bare LFs), or its comparison is wrong.
#[test]
fn verify_is_clean_against_dovecots_own_pop3_on_edge_cases() {
    let env = Env::new();
    let dc = Dovecot::start();
    dc.add_user("edge", "edgepw");
    let named = edge_case_named();
    let msgs: Vec<&[u8]> = named.iter().map(|(_, m)| m.as_slice()).collect();
    dc.seed("edge", &msgs);
    let cfg = env.config("edge.toml", &dc, &dc, &env.path("state"));
    let out = popbridge(
        &[
            "migrate",
            "verify",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            "legacy",
            "--to",
            "imap",
            "--user",
            "edge",
            "--password-env",
            "EDGE_PW",
        ],
        &[("EDGE_PW", "edgepw")],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains(&format!("verify edge: clean ({} messages", msgs.len())),
        "{}",
        text(&out)
    );
}

/// The head in METADATA is user-writable (/private): one announcing absurd sizes is refused
/// before anything is requested on its word, and so is a map whose chunks do not match its
/// head (an interrupted or mixed write): the login gets SYS/TEMP, counted as an error, and
/// the log says why.
#[test]
fn hostile_or_torn_metadata_maps_refuse_the_login() {
    let env = Env::new();
    let new = Dovecot::start();
    let users = ["huge", "big", "torn", "toomany", "longhead"];
    for u in users {
        new.add_user(u, "pw");
        new.seed(u, &[&msg(1), &msg(2)]);
    }
    let port = new.imap_port().to_string();
    let entry = "/private/vendor/popbridge/uidl-map";
    let sha = "0".repeat(64);
    let uv = |u: &str| new.imap_state(u, "pw", "INBOX").uidvalidity;
    let head = |u: &str, count: u64, chunks: u64, chunk: u64, bytes: u64| {
        format!(
            "popbridge-uidl-map/2 {} {count} gen=g1 chunks={chunks} chunk={chunk} bytes={bytes} sha256={sha}",
            uv(u)
        )
    };
    // Five million chunks, and a map over the 32 MiB cap.
    env.py(&[
        "setmeta",
        &port,
        "huge",
        "pw",
        entry,
        &head("huge", 2, 5_000_000, 1024, 33_554_432),
    ]);
    env.py(&[
        "setmeta",
        &port,
        "big",
        "pw",
        entry,
        &head("big", 2, 64, 1 << 20, 40 << 20),
    ]);
    // Old head, chunks of another map under its generation.
    env.py(&[
        "setmap",
        &port,
        "torn",
        "pw",
        &uv("torn").to_string(),
        "g1",
        "1:OLD-1 2:OLD-2",
    ]);
    env.py(&[
        "setmeta",
        &port,
        "torn",
        "pw",
        &format!("{entry}/g1/0"),
        "1:NEW-1 2:NEW-2",
    ]);
    // A head longer than any popbridge writes (left out under MAXSIZE: not "no map").
    env.py(&[
        "setmeta",
        &port,
        "longhead",
        "pw",
        entry,
        &format!("{} {}", head("longhead", 2, 1, 7, 7), "x".repeat(600)),
    ]);
    // More entries than the mailbox ever had UIDs.
    env.py(&[
        "setmap",
        &port,
        "toomany",
        "pw",
        &uv("toomany").to_string(),
        "g1",
        "1:A 2:B 3:C 4:D",
    ]);

    let mport = free_ports(1)[0];
    let pb = Popbridge::start(&new, &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""));
    for u in users {
        let out = env.py(&["login", &pb.pop3_port().to_string(), u, "pw"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert!(
            v["pass"].as_str().unwrap().starts_with("-ERR [SYS/TEMP]"),
            "{u}: {out}"
        );
    }
    let (_, body) = support::prometheus::http_get(mport, "/metrics").unwrap();
    assert!(
        body.contains("popbridge_uidl_maps_total{outcome=\"error\"} 5"),
        "{body}"
    );
    let log = pb.stop();
    assert!(
        log.contains("larger than the 33554432-octet limit"),
        "{log}"
    );
    assert!(
        log.contains("do not match the head's length and SHA-256"),
        "{log}"
    );
    assert!(log.contains("never had more than"), "{log}");
    assert!(
        !log.contains("NEW-1") && !log.contains("OLD-1"),
        "no map contents in the log: {log}"
    );
}

/// METADATA is authoritative: an instance that cached a map serves a re-migrated one at the
/// next login and drops a map deleted from METADATA; `migrate import` writes a new
/// generation, head last, and deletes the previous generation's chunks.
#[test]
fn metadata_wins_over_a_cached_map_and_generations_replace_each_other() {
    let env = Env::new();
    let new = Dovecot::start();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF); // only for the config's backend
    new.add_user("gina", "ginapw");
    new.seed("gina", &[&msg(1), &msg(2)]);
    let port = new.imap_port().to_string();
    let uv = new.imap_state("gina", "ginapw", "INBOX").uidvalidity;
    let entry = "/private/vendor/popbridge/uidl-map";
    env.py(&[
        "setmap",
        &port,
        "gina",
        "ginapw",
        &uv.to_string(),
        "g1",
        "1:FIRST-1 2:FIRST-2",
    ]);
    let pb = Popbridge::start(&new, "");
    let listing = || env.uidls(pb.pop3_port(), "gina", "ginapw");
    assert_eq!(listing(), vec!["1 FIRST-1", "2 FIRST-2"]);
    // Re-migrated elsewhere: this instance's cached copy must not win.
    env.py(&[
        "setmap",
        &port,
        "gina",
        "ginapw",
        &uv.to_string(),
        "g2",
        "1:SECOND-1",
    ]);
    assert_eq!(
        listing(),
        vec!["1 SECOND-1".to_string(), format!("2 {:08x}{uv:08x}", 2)]
    );
    // Deleted from METADATA: no map any more, whatever sled cached.
    env.py(&[
        "metacmd",
        &port,
        "gina",
        "ginapw",
        &format!("SETMETADATA INBOX ({entry} NIL)"),
    ]);
    assert_eq!(
        listing(),
        vec![
            format!("1 {:08x}{uv:08x}", 1),
            format!("2 {:08x}{uv:08x}", 2)
        ]
    );

    // migrate import: a head naming a fresh generation, the old generation's chunks gone.
    env.py(&[
        "setmap",
        &port,
        "gina",
        "ginapw",
        &uv.to_string(),
        "g3",
        "1:THIRD-1",
    ]);
    let cfg = env.config("imp.toml", &new, &legacy, &env.path("state"));
    let file = env.path("more.map");
    fs::write(&file, "gina 2 THIRD-2\n").unwrap();
    let out = popbridge(
        &[
            "migrate",
            "import",
            "--config",
            cfg.to_str().unwrap(),
            "--to",
            "imap",
            "--file",
            file.to_str().unwrap(),
            "--password-env",
            "PW",
        ],
        &[("PW", "ginapw")],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("stored metadata+sled; ok"),
        "{}",
        text(&out)
    );
    assert_eq!(
        listing(),
        vec!["1 THIRD-1", "2 THIRD-2"],
        "merged with what was there"
    );
    let get = |name: &str| -> String {
        env.py(&[
            "metacmd",
            &port,
            "gina",
            "ginapw",
            &format!("GETMETADATA INBOX ({name})"),
        ])
    };
    let head = get(entry);
    assert!(head.contains("popbridge-uidl-map/2 "), "{head}");
    assert!(!head.contains("gen=g3"), "a new generation: {head}");
    let gen = head
        .split("gen=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(get(&format!("{entry}/{gen}/0")).contains("1:THIRD-1 2:THIRD-2"));
    assert!(
        !get(&format!("{entry}/g3/0")).contains("THIRD-1"),
        "the previous generation's chunks are deleted"
    );
}

fn hup(pb: &Popbridge) {
    let pid = pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
}

/// Atomically replaces a routing file (write, then rename into place).
fn write_routes(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

const WAVE_ROUTES: &str = "@example.org,legacy,%n\n";

/// Issue #6's "Done when", through one front door: one `popbridge serve` relays a domain to the
/// legacy POP3 service (Cyrus-style UIDLs, bare logins there: `%n`), the wave is migrated to a
/// named IMAP backend (logins `%n@new.example` there) while serve runs, verified, switched with
/// a routing-file line per user and SIGHUP, and the same remembering client then downloads
/// nothing twice and loses nothing; a user outside the wave is still relayed. Finally the sled
/// key migrate writes is shown to be the one a routed session reads (METADATA off).
#[test]
fn a_wave_switches_routes_through_one_front_door() {
    let env = Env::new();
    let legacy = Dovecot::start_with_conf(LEGACY_CONF);
    let new = Dovecot::start();
    // (client login, legacy login, new-store login, password, messages)
    let wave = [
        ("w1@example.org", "w1", "w1@new.example", "w1pw", 4usize),
        ("w2@example.org", "w2", "w2@new.example", "w2pw", 3),
    ];
    let stay = ("s3@example.org", "s3", "s3pw");
    // Every user first: Dovecot re-reads its passwd-file at most once a second.
    for (_, old_login, new_login, pw, _) in wave {
        legacy.add_user(old_login, pw);
        new.add_user(new_login, pw);
    }
    legacy.add_user(stay.1, stay.2);
    for (i, (_, old_login, _, _, n)) in wave.iter().enumerate() {
        let msgs: Vec<Vec<u8>> = (1..=*n).map(|k| msg(k * 10 + i)).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        legacy.seed(old_login, &refs);
    }
    legacy.seed(stay.1, &[&msg(31), &msg(32)]);

    let routes = env.path("routes.csv");
    write_routes(&routes, WAVE_ROUTES);
    let pb_dir = env.path("pb-state");
    let mut pb = Popbridge::start(
        &new,
        &format!(
            "[state]\ndir = \"{state}\"\n\
             [backends.legacy]\nkind = \"pop3\"\nhost = \"127.0.0.1\"\nport = {lp}\nsecurity = \"none\"\n\
             [backends.new]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {np}\nsecurity = \"none\"\n\
             [routing]\nunknown_users = \"reject\"\nfile = \"{routes}\"",
            state = pb_dir.display(),
            lp = legacy.pop3_port(),
            np = new.imap_port(),
            routes = routes.display(),
        ),
    );
    let port = pb.pop3_port();
    let cfg = pb.config_path();
    let cfg_s = cfg.to_str().unwrap().to_string();

    // Before the switch: every client downloads everything through popbridge (relayed).
    let mut legacy_uidls: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (client, old_login, _, pw, n) in wave {
        let (got, listed) = env.fetchmail(port, client, pw);
        assert_eq!(got.len(), n, "{client}");
        assert!(
            listed.iter().all(|u| u.contains('.')),
            "relayed: {listed:?}"
        );
        assert_eq!(
            env.uidls(legacy.pop3_port(), old_login, pw)
                .iter()
                .map(|l| l.split(' ').nth(1).unwrap().to_string())
                .collect::<Vec<_>>(),
            listed,
            "byte for byte the legacy server's UIDLs"
        );
    }
    let (got, _) = env.fetchmail(port, stay.0, stay.2);
    assert_eq!(got.len(), 2);
    // w1 gets mail on the legacy platform it has not fetched yet when the wave runs.
    legacy.seed("w1", &[&msg(19)]);

    // The copy: other UIDs on the new store, w1's message 2 gains headers servers add.
    for (_, old_login, new_login, pw, _) in wave {
        env.py(&["burn", &new.imap_port().to_string(), new_login, pw, "3"]);
        env.py(&[
            "copy_as",
            &legacy.imap_port().to_string(),
            &new.imap_port().to_string(),
            old_login,
            new_login,
            pw,
            if old_login == "w1" { "2" } else { "" },
        ]);
        legacy_uidls.insert(
            old_login,
            env.uidls(legacy.pop3_port(), old_login, pw)
                .iter()
                .map(|l| l.split(' ').nth(1).unwrap().to_string())
                .collect(),
        );
    }
    assert_eq!(
        new.imap_state("w1@new.example", "w1pw", "INBOX").uids()[0],
        4
    );

    // The wave, with the same configuration while serve runs: the users file holds client
    // logins; the legacy login comes from their current route (%n), the new one from
    // --to-login (the rewrite their route will have). serve holds the sled directory, so the
    // map goes to METADATA only.
    let wave_file = env.path("wave.txt");
    let lines: Vec<String> = wave.iter().map(|w| format!("{}\t{}", w.0, w.3)).collect();
    fs::write(&wave_file, lines.join("\n") + "\n").unwrap();
    let out = popbridge(
        &[
            "migrate",
            "uidls",
            "--config",
            &cfg_s,
            "--from",
            "legacy",
            "--to",
            "new",
            "--users-file",
            wave_file.to_str().unwrap(),
            "--to-login",
            "%n@new.example",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let report = stdout(&out);
    assert!(
        report.contains("user w1@example.org: legacy 5, new 5; matched 5")
            && report.contains("user w2@example.org: legacy 3, new 3; matched 3"),
        "{report}"
    );
    assert!(
        report.contains("user w1@example.org: logged in to legacy as w1, new as w1@new.example"),
        "{report}"
    );
    assert_eq!(report.matches("stored metadata;").count(), 2, "{report}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("local state not updated"), "{err}");

    // Shadow check of each user: clean.
    let verify = |client: &str, pw: &str| {
        popbridge(
            &[
                "migrate",
                "verify",
                "--config",
                &cfg_s,
                "--from",
                "legacy",
                "--to",
                "new",
                "--user",
                client,
                "--password-env",
                "PW",
                "--to-login",
                "%n@new.example",
            ],
            &[("PW", pw)],
        )
    };
    for (client, _, _, pw, _) in wave {
        let out = verify(client, pw);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            stdout(&out).contains(&format!("verify {client}: clean")),
            "{}",
            text(&out)
        );
    }

    // The switch: one line per user, SIGHUP.
    let switched = format!(
        "{WAVE_ROUTES}w1@example.org,new,%n@new.example\nw2@example.org,new,%n@new.example\n"
    );
    write_routes(&routes, &switched);
    hup(&pb);
    assert!(
        pb.wait_for_log(
            "SIGHUP: routing table reloaded",
            std::time::Duration::from_secs(10)
        ),
        "{}",
        pb.log()
    );

    // Same client, same front door: nothing twice, nothing lost.
    let (got, listed) = env.fetchmail(port, "w1@example.org", "w1pw");
    let w1 = &legacy_uidls["w1"];
    assert_eq!(
        got,
        vec![w1[4].clone()],
        "only the unfetched message, legacy UIDL"
    );
    assert_eq!(&listed, w1, "every legacy UIDL, same order");
    let (got, listed) = env.fetchmail(port, "w2@example.org", "w2pw");
    assert!(got.is_empty(), "nothing twice: {got:?}");
    assert_eq!(&listed, &legacy_uidls["w2"]);
    assert!(
        pb.log().contains("upstream_login=w1@new.example"),
        "served from the new store"
    );

    // Outside the wave: still relayed, new legacy mail in the legacy format.
    legacy.seed(stay.1, &[&msg(33)]);
    let (got, listed) = env.fetchmail(port, stay.0, stay.2);
    assert_eq!(got.len(), 1);
    assert!(listed.iter().all(|u| u.contains('.')), "{listed:?}");

    // New mail on the new store after the switch: the new store's format, downloaded once.
    fs::write(env.path("n1.eml"), msg(50)).unwrap();
    env.py(&[
        "append",
        &new.imap_port().to_string(),
        "w2@new.example",
        "w2pw",
        env.path("n1.eml").to_str().unwrap(),
    ]);
    let st = new.imap_state("w2@new.example", "w2pw", "INBOX");
    let newest = *st.uids().last().unwrap();
    let (got, _) = env.fetchmail(port, "w2@example.org", "w2pw");
    assert_eq!(got, vec![format!("{newest:08x}{:08x}", st.uidvalidity)]);
    let (got, _) = env.fetchmail(port, "w2@example.org", "w2pw");
    assert!(got.is_empty(), "{got:?}");

    // The sled key: with METADATA off and an empty state directory, a map migrate stored in
    // sled only is served to the routed session only if migrate used the session's key
    // (backend prefix + rewritten login).
    pb.kill();
    let mut conf = fs::read_to_string(&cfg).unwrap();
    conf.push_str("\n[migration]\nshared_map = \"none\"\n");
    fs::write(&cfg, conf).unwrap();
    fs::remove_dir_all(&pb_dir).unwrap();
    let out = popbridge(
        &[
            "migrate",
            "uidls",
            "--config",
            &cfg_s,
            "--from",
            "legacy",
            "--to",
            "new",
            "--user",
            "w1@example.org",
            "--password-env",
            "PW",
            "--to-login",
            "%n@new.example",
            // The route points at `new` now: the legacy rewrite has to be given.
            "--from-login",
            "%n",
        ],
        &[("PW", "w1pw")],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("stored sled;"), "{}", text(&out));
    pb.restart();
    let listed = env.uidls(port, "w1@example.org", "w1pw");
    let only: Vec<String> = listed
        .iter()
        .map(|l| l.split(' ').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(&only, w1, "the sled map under the routed key");
}
