//! Routing and passthrough end to end: popbridge in front of two Dovecot instances, the new
//! IMAP store (`[imap]`, and a master-user backend on the same store) and a legacy POP3 server
//! (a second Dovecot's POP3 service with its own UIDL format), with users routed by whole
//! login, by domain, by default and not at all.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::raw::RawPop3;
use support::*;

fn hup(pb: &Popbridge) {
    let pid = pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
}

/// Messages that differ per store, so each test can tell where a session was served from.
fn msg(store: &str, user: &str, n: u32) -> Vec<u8> {
    format!(
        "From: someone@example.net\r\nSubject: {store} {user} {n}\r\n\r\nbody of {store} message {n}\r\n.leading dot\r\n"
    )
    .into_bytes()
}

struct World {
    new: Dovecot,
    old: Dovecot,
    pb: Popbridge,
    routes: PathBuf,
    _master: MasterPassdb,
    metrics_port: u16,
}

const ROUTES: &str = "\
# exact rules win over the domain rule below
alice@example.org,imap,%n
erin@example.org,mastered,%n

@example.org,legacy,%n
";

fn world() -> World {
    world_with("")
}

/// [`world`] with `extra` lines added to popbridge's configuration.
fn world_with(extra: &str) -> World {
    let master = MasterPassdb::new("pbmaster", "master-secret");
    let new = Dovecot::start_with_conf(&master.conf);
    // The legacy platform has its own UIDL format: relayed UIDLs must be its, not popbridge's.
    let old = Dovecot::start_with_conf("pop3_uidl_format = %v.%u");

    // alice and carol exist on both platforms with the same password (a migration); erin's
    // password on the new store is one the client does not know (reached as master only).
    for (dc, store) in [(&new, "new"), (&old, "old")] {
        for (user, pw) in [
            ("alice", "alice-pw"),
            ("bob", "bob-pw"),
            ("carol", "carol-pw"),
        ] {
            dc.add_user(user, pw);
            let msgs: Vec<Vec<u8>> = (1..=3).map(|n| msg(store, user, n)).collect();
            let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
            dc.seed(user, &refs);
        }
    }
    new.add_user("erin", "erin-store-only-pw");
    new.seed("erin", &[&msg("new", "erin", 1)]);
    old.add_user("erin", "erin-pw");
    old.seed("erin", &[&msg("old", "erin", 1)]);

    let routes = master.dir().join("routes.csv");
    std::fs::write(&routes, ROUTES).unwrap();
    let metrics_port = free_ports(1)[0];
    let pb = Popbridge::start(
        &new,
        &format!(
            r#"
[limits]
auth_penalty_base_ms = 1
[metrics]
listen = "127.0.0.1:{metrics_port}"
[backends.legacy]
kind = "pop3"
host = "127.0.0.1"
port = {old_pop3}
security = "starttls"
ca_file = "{ca}"
[backends.legacys]
kind = "pop3"
host = "127.0.0.1"
port = {old_pop3s}
security = "tls"
ca_file = "{ca}"
[backends.mastered]
kind = "imap"
host = "127.0.0.1"
port = {new_imap}
security = "none"
uidl_format = "%u"
master_user = "pbmaster"
master_password_file = "{master_pw}"
verify_password_with = "legacy"
[routing]
unknown_users = "reject"
default_backend = "imap"
file = "{routes}"
rules = [{{ match = "bob@example.org", backend = "imap", login = "nobody" }}, {{ match = "frank@tls.example.org", backend = "legacys", login = "bob" }}]
{extra}
"#,
            old_pop3 = old.pop3_port(),
            old_pop3s = old.pop3s_port(),
            ca = old.ca_pem_path().display(),
            new_imap = new.imap_port(),
            master_pw = master.password_file.display(),
            routes = routes.display(),
        ),
    );
    World {
        new,
        old,
        pb,
        routes,
        _master: master,
        metrics_port,
    }
}

/// A whole session's bytes after login: LIST, UIDL, RETR 1, TOP 2 1, QUIT answers.
fn transcript(port: u16, user: &str, pw: &str) -> Vec<String> {
    let mut c = RawPop3::ready(port);
    c.login(user, pw);
    let mut out = Vec::new();
    for cmd in ["LIST", "UIDL", "RETR 1", "TOP 2 1"] {
        out.push(c.cmd(cmd));
        out.extend(c.multi());
    }
    out.push(c.cmd("QUIT"));
    out
}

fn subjects(port: u16, user: &str, pw: &str) -> Vec<String> {
    let s = poplib(
        port,
        &[
            &format!("user {user}"),
            &format!("pass {pw}"),
            "retr 1",
            "quit",
        ],
    );
    s.assert_all_ok();
    String::from_utf8_lossy(&s.step("retr 1").data())
        .lines()
        .filter_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        .collect()
}

fn metrics_text(port: u16) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn users_are_routed_relayed_byte_exact_and_rewritten() {
    let w = world();
    let port = w.pb.pop3_port();

    // Exact rule (with %n) beats the domain rule: alice reads the new store as "alice".
    assert_eq!(
        subjects(port, "alice@example.org", "alice-pw"),
        vec!["new alice 1"]
    );
    // The domain rule relays carol to the legacy server as "carol".
    assert_eq!(
        subjects(port, "Carol@Example.org", "carol-pw"),
        vec!["old carol 1"]
    );
    // An inline rule's rewrite is what the upstream sees: "nobody" does not exist there.
    let mut c = RawPop3::ready(port);
    assert!(c.cmd("USER bob@example.org").starts_with("+OK"));
    assert!(c.cmd("PASS bob-pw").starts_with("-ERR [AUTH]"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    assert!(w.new.log().contains("nobody"), "{}", w.new.log());

    // Relayed sessions are byte-exact: the same transcript as talking to the legacy server
    // (its UIDL format, its RETR and TOP bytes, its QUIT line).
    let direct = transcript(w.old.pop3_port(), "carol", "carol-pw");
    let relayed = transcript(port, "carol@example.org", "carol-pw");
    assert_eq!(relayed, direct);
    assert!(direct[1].starts_with("1 "), "{direct:?}");
    assert!(
        direct
            .iter()
            .any(|l| l.starts_with("1 ") && l.contains('.')),
        "legacy UIDL format %v.%u expected: {direct:?}"
    );
    // curl agrees too.
    let url = |p: u16, u: &str| format!("pop3://{u}:carol-pw@127.0.0.1:{p}/2");
    let via = curl_pop3(&url(port, "carol%40example.org"), &[]);
    let direct = curl_pop3(&url(w.old.pop3_port(), "carol"), &[]);
    assert_eq!(via.code, 0, "{}", via.stderr);
    assert_eq!(via.stdout, direct.stdout);
    let url = |p: u16, u: &str| format!("pop3://{u}:carol-pw@127.0.0.1:{p}/");
    let via = curl_pop3(&url(port, "carol%40example.org"), &["-X", "UIDL"]);
    let direct = curl_pop3(&url(w.old.pop3_port(), "carol"), &["-X", "UIDL"]);
    assert_eq!(via.code, 0, "{}", via.stderr);
    assert_eq!(via.stdout, direct.stdout);
    assert!(String::from_utf8_lossy(&via.stdout).contains("3 "));

    // Implicit TLS to the legacy server works as well (frank is bob there).
    assert_eq!(
        subjects(port, "frank@tls.example.org", "bob-pw"),
        vec!["old bob 1"]
    );

    // DELE + QUIT through the relay deletes on the legacy server.
    let before = w.old.imap_state("carol", "carol-pw", "INBOX").uids().len();
    poplib(
        port,
        &["user carol@example.org", "pass carol-pw", "dele 1", "quit"],
    )
    .assert_all_ok();
    assert_eq!(
        w.old.imap_state("carol", "carol-pw", "INBOX").uids().len(),
        before - 1
    );

    // A wrong password at the legacy server: -ERR [AUTH], and the session may try again.
    let mut c = RawPop3::ready(port);
    assert!(c.cmd("USER carol@example.org").starts_with("+OK"));
    let r = c.cmd("PASS wrong");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    c.login("carol@example.org", "carol-pw");
    assert!(c.cmd("STAT").starts_with("+OK 2 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));

    // An unknown user (no rule, unknown_users = "reject"): -ERR [AUTH], no upstream asked,
    // and the failure still counts for the login penalty.
    let mut c = RawPop3::ready(port);
    assert!(c.cmd("USER dave").starts_with("+OK"));
    assert!(c.cmd("PASS dave-pw").starts_with("-ERR [AUTH]"));
    assert!(c.cmd("USER dave").starts_with("+OK"));
    assert!(c.cmd("PASS dave-pw").starts_with("-ERR [AUTH]"));
    assert!(!w.new.log().contains("dave"));
    assert!(!w.old.log().contains("dave"));
    assert!(
        w.pb.wait_for_log("no route for this user", Duration::from_secs(5)),
        "{}",
        w.pb.log()
    );
    assert!(w.pb.log().contains("login penalty"), "{}", w.pb.log());

    // Metrics per backend, by name only.
    let m = metrics_text(w.metrics_port);
    assert!(
        metric(
            &m,
            "popbridge_backend_logins_total{backend=\"legacy\",result=\"ok\"}"
        ) >= 5,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "popbridge_backend_logins_total{backend=\"legacy\",result=\"bad_credentials\"}"
        ) >= 1
    );
    assert!(
        metric(
            &m,
            "popbridge_backend_logins_total{backend=\"none\",result=\"bad_credentials\"}"
        ) >= 2
    );
    assert!(
        metric(
            &m,
            "popbridge_backend_logins_total{backend=\"imap\",result=\"ok\"}"
        ) >= 1
    );
    assert!(
        metric(
            &m,
            "popbridge_relay_sessions_total{backend=\"legacy\",outcome=\"closed\"}"
        ) >= 4,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "popbridge_relay_bytes_total{backend=\"legacy\",direction=\"server_to_client\"}"
        ) > 500
    );
    assert!(!m.contains("carol"), "user names must not become labels");

    // No password in popbridge's log.
    let log = w.pb.log();
    for secret in ["carol-pw", "alice-pw", "bob-pw", "master-secret"] {
        assert!(!log.contains(secret), "{secret} logged");
    }
}

#[test]
fn master_user_login_checks_the_client_password_first() {
    let w = world();
    let port = w.pb.pop3_port();
    // erin's password is checked at the legacy server, then popbridge logs in to the new
    // store as the master user for erin: she sees the new store's mail.
    assert_eq!(
        subjects(port, "erin@example.org", "erin-pw"),
        vec!["new erin 1"]
    );
    assert!(
        w.new.log().contains("Master user logging in as erin"),
        "{}",
        w.new.log()
    );
    // The backend's own UIDL format (the listener's is %08Xu%08Xv).
    let mut c = RawPop3::ready(port);
    c.login("erin@example.org", "erin-pw");
    assert_eq!(c.cmd("UIDL"), "+OK\r\n");
    assert_eq!(c.multi(), vec!["1 1\r\n"]);
    assert!(c.cmd("QUIT").starts_with("+OK"));
    // alice on [imap] keeps the listener's format.
    let mut c = RawPop3::ready(port);
    c.login("alice@example.org", "alice-pw");
    assert!(c.cmd("UIDL 1").starts_with("+OK 1 00000001"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    // A wrong password is refused although the master credentials are valid.
    let mut c = RawPop3::ready(port);
    assert!(c.cmd("USER erin@example.org").starts_with("+OK"));
    let r = c.cmd("PASS erin-store-only-pw");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    assert!(!w.pb.log().contains("master-secret"));
}

#[test]
fn a_wave_moves_users_on_reload_and_bad_files_keep_the_old_routes() {
    let w = world();
    let port = w.pb.pop3_port();
    assert_eq!(
        subjects(port, "carol@example.org", "carol-pw"),
        vec!["old carol 1"]
    );

    // A relayed session is open while carol's wave is switched.
    let mut open = RawPop3::ready(port);
    open.login("carol@example.org", "carol-pw");
    assert!(open.cmd("STAT").starts_with("+OK 3 "));

    std::fs::write(&w.routes, format!("{ROUTES}carol@example.org,imap,%n\n")).unwrap();
    hup(&w.pb);
    assert!(
        w.pb.wait_for_log("SIGHUP: routing table reloaded", Duration::from_secs(10)),
        "{}",
        w.pb.log()
    );
    // New sessions go to the new store ...
    assert_eq!(
        subjects(port, "carol@example.org", "carol-pw"),
        vec!["new carol 1"]
    );
    // ... while the open relayed session carries on against the legacy server.
    assert!(open.cmd("RETR 3").starts_with("+OK"));
    let body = open.multi().join("");
    assert!(body.contains("Subject: old carol 3"), "{body}");
    assert!(open.cmd("QUIT").starts_with("+OK"));

    // A bad line refuses the whole file: the old routes stay, the log names file and line.
    std::fs::write(
        &w.routes,
        format!("{ROUTES}carol@example.org,nowhere\n").replace("alice@", "Alice@"),
    )
    .unwrap();
    hup(&w.pb);
    let needle = format!(
        "{}:6: backend \"nowhere\" is not defined",
        w.routes.display()
    );
    assert!(
        w.pb.wait_for_log(&needle, Duration::from_secs(10)),
        "{}",
        w.pb.log()
    );
    assert!(w.pb.log().contains("keeping the old"));
    assert_eq!(
        subjects(port, "carol@example.org", "carol-pw"),
        vec!["new carol 1"]
    );

    // A good change is picked up without a signal too (the file is watched). The watcher may
    // already have reloaded the first change of this test itself: wait for a new line.
    let reloaded = "routing file changed: routes reloaded";
    let seen = w.pb.log_count(reloaded);
    let tmp = w.routes.with_extension("tmp");
    std::fs::write(&tmp, ROUTES).unwrap();
    std::fs::rename(&tmp, &w.routes).unwrap();
    assert!(
        w.pb.wait_for_log_count(reloaded, seen + 1, Duration::from_secs(15)),
        "{}",
        w.pb.log()
    );
    assert_eq!(
        subjects(port, "carol@example.org", "carol-pw"),
        vec!["old carol 1"]
    );
}

#[test]
fn sigterm_lets_relayed_sessions_drain_then_closes_them() {
    let w = world_with("[pop3]\nshutdown_drain_secs = 2");
    let mut c = RawPop3::ready(w.pb.pop3_port());
    c.login("carol@example.org", "carol-pw");
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    let pid = w.pb.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(w
        .pb
        .wait_for_log("stopping: no new sessions", Duration::from_secs(5)));
    // Still relayed during the drain ...
    assert!(c.cmd("STAT").starts_with("+OK 2 "));
    // ... then closed without a QUIT, so the legacy server applies nothing.
    assert!(c.wait_closed(Duration::from_secs(15)));
    assert!(
        w.pb.wait_for_log("end=\"shutdown\"", Duration::from_secs(10)),
        "{}",
        w.pb.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        w.old.imap_state("carol", "carol-pw", "INBOX").uids().len(),
        3
    );
}
