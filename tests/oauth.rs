//! OAuth 2.0 upstream, end to end and offline: a private Dovecot that takes only tokens for the
//! test users (`passdb oauth2`, checked by introspection at a local authorization server,
//! `tests/clients/oauth_server.py`), popbridge in front of it, and real POP3 clients (curl,
//! poplib) that know only passwords, or bring their own token.
//!
//! The users' IMAP passwords are never given to popbridge: every upstream login must be a
//! token (Dovecot logs `method=XOAUTH2` or `method=OAUTHBEARER`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use popbridge_testkit::oauth::{OAuthServer, CLIENT_ID, SERVICE_ACCOUNT};
use support::*;

struct World {
    auth: OAuthServer,
    dc: Dovecot,
    dir: tempfile::TempDir,
    metrics_port: u16,
}

const USERS: [&str; 2] = ["alice", "bob"];

/// Dovecot taking tokens for alice and bob (each with two messages), the OAuth server.
fn world() -> World {
    let auth = OAuthServer::start();
    let dc = Dovecot::start_with_conf(&auth.dovecot_conf(&USERS));
    for user in USERS {
        // Known to Dovecot's password passdb only for the checks below, never to popbridge.
        dc.add_user(user, &imap_password(user));
        dc.seed(
            user,
            &[
                format!("Subject: one for {user}\r\n\r\nfirst\r\n").as_bytes(),
                format!("Subject: two for {user}\r\n\r\nsecond\r\n").as_bytes(),
            ],
        );
    }
    World {
        auth,
        dc,
        dir: tempfile::tempdir().unwrap(),
        metrics_port: free_ports(1)[0],
    }
}

fn imap_password(user: &str) -> String {
    format!("imap-only-{user}-Zq8")
}

impl World {
    /// popbridge with `[imap.oauth]` made of `oauth` (plus the endpoint and client id).
    fn popbridge(&self, oauth: &str, extra: &str) -> Popbridge {
        Popbridge::start(
            &self.dc,
            &format!(
                "[limits]\nauth_penalty_base_ms = 1\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\
                 [imap.oauth]\ntoken_url = \"{}\"\ndevice_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n{oauth}\n{extra}",
                self.metrics_port,
                self.auth.token_url(),
                self.auth.device_url(),
            ),
        )
    }

    /// A file of `user:argon2id` lines, hashed by `popbridge oauth hash-password`.
    fn password_file(&self, users: &[(&str, &str)]) -> PathBuf {
        let mut text = String::from("# POP3 passwords\n");
        for (user, pw) in users {
            let out = Command::new(POPBRIDGE_BIN)
                .args(["oauth", "hash-password", "--password-env", "PB_PW"])
                .env("PB_PW", pw)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let hash = String::from_utf8(out.stdout).unwrap();
            assert!(hash.starts_with("$argon2id$"), "{hash}");
            text.push_str(&format!("{user}:{}", hash));
        }
        let p = self.dir.path().join("passwords");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn token_store(&self) -> PathBuf {
        self.dir.path().join("grants")
    }

    /// The sum of the samples of `name` that carry every label of `labels`.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        popbridge_testkit::prometheus::metric_sum(self.metrics_port, name, labels)
    }

    /// The upstream logins Dovecot saw with `method`.
    fn dovecot_logins(&self, user: &str, method: &str) -> usize {
        let needle = format!("user=<{user}>, method={method}");
        self.dc
            .log()
            .lines()
            .filter(|l| l.contains("imap-login: Info: Login:") && l.contains(&needle))
            .count()
    }
}

fn subject_of(step: &PopStep) -> String {
    String::from_utf8_lossy(&step.data())
        .lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        .unwrap_or_default()
}

fn pop(pb: &Popbridge, user: &str, pw: &str) -> PopSession {
    poplib(
        pb.pop3_port(),
        &[
            &format!("user {user}"),
            &format!("pass {pw}"),
            "stat",
            "retr 1",
            "quit",
        ],
    )
}

fn assert_login_ok(s: &PopSession, user: &str) {
    s.assert_all_ok();
    assert_eq!(subject_of(&s.steps[3]), format!("one for {user}"));
}

fn pass_resp(s: &PopSession) -> &str {
    &s.steps[1].resp
}

// ---------------------------------------------------------------------------------------------
// The Dovecot under test takes tokens, and only good ones.

#[test]
fn the_private_dovecot_takes_good_tokens_only() {
    let w = world();
    let good = w.auth.mint("alice");
    let url = format!("imap://alice@127.0.0.1:{}/INBOX?ALL", w.dc.imap_port());
    let ok = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--oauth2-bearer", &good, &url])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}\n{}", w.dc.log_tail(20));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("SEARCH 1 2"));
    for bad in ["at-not-a-token".to_owned(), w.auth.mint("bob")] {
        let no = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--oauth2-bearer", &bad, &url])
            .output()
            .unwrap();
        assert_eq!(
            no.status.code(),
            Some(67),
            "token {bad} must be refused: {no:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Way 1: the client brings its token.

#[test]
fn clients_bring_their_own_tokens() {
    let w = world();
    let pb = w.popbridge("tokens = \"client\"\nmechanism = \"oauthbearer\"", "");
    let port = pb.pop3_port();

    let capa = poplib(port, &["capa", "quit"]);
    let sasl = String::from_utf8_lossy(&capa.steps[0].raw).into_owned();
    assert!(sasl.contains("SASL PLAIN XOAUTH2 OAUTHBEARER"), "{sasl}");

    // curl prefers OAUTHBEARER; with AUTH=XOAUTH2 it uses Google's mechanism.
    let token = w.auth.mint("alice");
    for login_options in [None, Some("AUTH=XOAUTH2")] {
        let mut args = vec!["--oauth2-bearer", token.as_str()];
        if let Some(o) = login_options {
            args.extend(["--login-options", o]);
        }
        let r = curl_pop3(&format!("pop3://alice@127.0.0.1:{port}/2"), &args);
        assert_eq!(
            r.code,
            0,
            "{login_options:?}: {}\n{}",
            r.stderr,
            pb.log_tail(30)
        );
        assert!(String::from_utf8_lossy(&r.stdout).contains("Subject: two for alice"));
    }
    assert_eq!(
        w.dovecot_logins("alice", "OAUTHBEARER"),
        2,
        "{}",
        w.dc.log_tail(20)
    );

    // A wrong token, and bob's token for alice: refused, as the upstream said.
    for bad in ["at-forged".to_owned(), w.auth.mint("bob")] {
        let r = curl_pop3(
            &format!("pop3://alice@127.0.0.1:{port}/"),
            &["--oauth2-bearer", &bad],
        );
        assert_eq!(r.code, 67, "{bad}: {r:?}");
    }
    let xoauth2 = |user: &str, token: &str| {
        base64::engine::general_purpose::STANDARD
            .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
    };
    // The upstream's RFC 7628 error status comes as a challenge; the client's dummy answer
    // ends the exchange with -ERR [AUTH], and the session can try again.
    let s = poplib(
        port,
        &[
            &format!("raw AUTH XOAUTH2 {}", xoauth2("alice", "at-forged")),
            "raw AQ==",
            &format!("raw AUTH XOAUTH2 {}", xoauth2("alice", &token)),
            "stat",
            "quit",
        ],
    );
    let challenge = s.steps[0]
        .resp
        .strip_prefix("+ ")
        .expect("an error challenge");
    let status = base64::engine::general_purpose::STANDARD
        .decode(challenge)
        .unwrap();
    assert!(
        String::from_utf8_lossy(&status).contains("\"status\""),
        "{status:?}"
    );
    assert!(s.steps[1].resp.starts_with("-ERR [AUTH]"), "{s:?}");
    assert!(
        s.steps[2].ok && s.steps[3].resp.starts_with("+OK 2 "),
        "{s:?}"
    );

    // Tokens are long: an AUTH line of 8 KiB carries a 6 KiB token through (as long as
    // Dovecot takes, 8,192 octets of SASL response), far over POP3's 255-octet command limit.
    let long = w.auth.mint_long("alice", 6000);
    let line = format!("raw AUTH XOAUTH2 {}", xoauth2("alice", &long));
    assert!(line.len() > 8000);
    let s = poplib(port, &[&line, "stat", "quit"]);
    assert!(
        s.steps[0].ok && s.steps[1].resp.starts_with("+OK 2 "),
        "{s:?}"
    );
    // A 16 KiB line is read whole too, and goes upstream: Dovecot drops a response that long,
    // which the client hears as a temporary failure; never "line too long", and the session
    // goes on.
    let longer = xoauth2("alice", &format!("at-{}", "x".repeat(12 * 1024)));
    assert!(longer.len() > 16 * 1024);
    let s = poplib(
        port,
        &[&format!("raw AUTH XOAUTH2 {longer}"), "capa", "quit"],
    );
    let resp = &s.steps[0].resp;
    assert!(
        resp.starts_with("-ERR [SYS/TEMP]") || resp.starts_with("-ERR [AUTH]"),
        "{resp:?}"
    );
    assert!(s.steps[1].ok, "{s:?}");

    // A password where a token is needed: an authentication failure, not a crash.
    let s = pop(&pb, "alice", &imap_password("alice"));
    assert!(pass_resp(&s).starts_with("-ERR [AUTH]"), "{s:?}");

    let logins = "popbridge_upstream_logins_total";
    assert!(w.metric(logins, &[("mechanism", "oauthbearer"), ("result", "ok")]) >= 3.0);
    assert!(
        w.metric(
            logins,
            &[("mechanism", "oauthbearer"), ("result", "refused")]
        ) >= 1.0
    );
    assert_eq!(
        w.auth.requests("client_credentials", "ok"),
        0,
        "no token of popbridge's own"
    );
}

// ---------------------------------------------------------------------------------------------
// Way 2: the operator's application credential.

#[test]
fn application_tokens_with_a_client_secret_and_a_password_file() {
    let w = world();
    let passwords = w.password_file(&[("alice", "pop-alice-1"), ("bob", "pop-bob-2")]);
    let pb = w.popbridge(
        &format!(
            "tokens = \"app\"\nclient_secret_file = \"{}\"\npassword_file = \"{}\"\n\
             expiry_margin_secs = 1",
            w.auth.secret_file().display(),
            passwords.display()
        ),
        "",
    );
    assert_login_ok(&pop(&pb, "alice", "pop-alice-1"), "alice");
    assert_login_ok(&pop(&pb, "bob", "pop-bob-2"), "bob");
    // One application token serves every user until it is due.
    assert_eq!(w.auth.requests("client_credentials", "ok"), 1);
    assert_eq!(w.dovecot_logins("alice", "XOAUTH2"), 1);
    assert_eq!(w.dovecot_logins("bob", "XOAUTH2"), 1);
    assert!(w.metric("popbridge_oauth_token_cache_total", &[("result", "hit")]) >= 1.0);

    // Wrong and unknown passwords fail like any wrong password, and ask for no token.
    for (user, pw) in [
        ("alice", "pop-bob-2"),
        ("carol", "pop-alice-1"),
        ("alice", "pop-alice-1x"),
    ] {
        let s = pop(&pb, user, pw);
        assert!(
            pass_resp(&s).starts_with("-ERR [AUTH]"),
            "{user}/{pw}: {s:?}"
        );
    }
    assert_eq!(w.auth.requests("client_credentials", "ok"), 1);

    // Expiry mid-day: a token the store stops taking before popbridge expected is forgotten
    // and replaced at once; the client notices nothing.
    w.auth.control(r#"{"expire_all": true}"#);
    assert_login_ok(&pop(&pb, "alice", "pop-alice-1"), "alice");
    assert_eq!(w.auth.requests("client_credentials", "ok"), 2);

    // Tokens that live 3 s (renewed 1 s early): a login after that asks for a new one.
    w.auth.control(r#"{"expires_in": 3}"#);
    w.auth.control(r#"{"expire_all": true}"#);
    assert_login_ok(&pop(&pb, "bob", "pop-bob-2"), "bob");
    let before = w.auth.requests("client_credentials", "ok");
    std::thread::sleep(Duration::from_millis(2500));
    assert_login_ok(&pop(&pb, "bob", "pop-bob-2"), "bob");
    assert_eq!(w.auth.requests("client_credentials", "ok"), before + 1);

    // The password file is read again when it changes.
    std::fs::write(
        &passwords,
        std::fs::read_to_string(w.password_file(&[("alice", "pop-alice-NEW")])).unwrap(),
    )
    .unwrap();
    assert!(pass_resp(&pop(&pb, "alice", "pop-alice-1")).starts_with("-ERR [AUTH]"));
    assert_login_ok(&pop(&pb, "alice", "pop-alice-NEW"), "alice");

    // The token endpoint failing is the server's trouble, not the user's: [SYS/TEMP].
    w.auth.control(r#"{"fail": "503", "expire_all": true}"#);
    let s = pop(&pb, "alice", "pop-alice-NEW");
    assert!(pass_resp(&s).starts_with("-ERR [SYS/TEMP]"), "{s:?}");
    w.auth.control(r#"{"fail": ""}"#);
    assert_login_ok(&pop(&pb, "alice", "pop-alice-NEW"), "alice");

    let requests = "popbridge_oauth_token_requests_total";
    let failed = [
        ("provider", "custom"),
        ("grant", "client_credentials"),
        ("result", "unavailable"),
    ];
    assert!(w.metric(requests, &failed) >= 1.0);
    assert!(w.metric("popbridge_oauth_token_request_duration_seconds_count", &[]) >= 4.0);
    let log = pb.stop();
    assert!(log.contains("upstream refused the OAuth token"), "{log}");
}

#[test]
fn application_tokens_by_signed_assertions() {
    let w = world();
    let passwords = w.password_file(&[("alice", "pop-alice-1"), ("bob", "pop-bob-2")]);
    // Client credentials with a private-key JWT (RFC 7523 2.2), OAUTHBEARER upstream.
    let pb = w.popbridge(
        &format!(
            "tokens = \"app\"\nmechanism = \"oauthbearer\"\nclient_key_file = \"{}\"\n\
             client_key_id = \"k1\"\npassword_file = \"{}\"",
            w.auth.key_file().display(),
            passwords.display()
        ),
        "",
    );
    let r = curl_pop3(
        &format!("pop3://alice:pop-alice-1@127.0.0.1:{}/1", pb.pop3_port()),
        &[],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, pb.log_tail(30));
    assert!(String::from_utf8_lossy(&r.stdout).contains("Subject: one for alice"));
    assert_eq!(w.auth.requests("client_credentials", "ok"), 1);
    assert_eq!(w.dovecot_logins("alice", "OAUTHBEARER"), 1);
    drop(pb);

    // The JWT bearer grant naming each user (Google's domain-wide delegation): one token per
    // user, good for that user only.
    let pb = w.popbridge(
        &format!(
            "tokens = \"app\"\ngrant = \"jwt_bearer\"\nclient_email = \"{SERVICE_ACCOUNT}\"\n\
             client_key_file = \"{}\"\npassword_file = \"{}\"",
            w.auth.key_file().display(),
            passwords.display()
        ),
        "",
    );
    assert_login_ok(&pop(&pb, "alice", "pop-alice-1"), "alice");
    assert_login_ok(&pop(&pb, "bob", "pop-bob-2"), "bob");
    assert_login_ok(&pop(&pb, "bob", "pop-bob-2"), "bob");
    assert_eq!(
        w.auth.requests("jwt_bearer", "ok"),
        2,
        "{:?}",
        w.auth.stats()
    );
    assert_eq!(w.dovecot_logins("bob", "XOAUTH2"), 2);
}

#[test]
fn application_tokens_with_passwords_checked_by_another_backend() {
    let w = world();
    // The POP3 password is checked against the legacy POP3 server (here Dovecot's own POP3,
    // which knows the passwords); the mail is read with application tokens.
    let pb = w.popbridge(
        &format!(
            "tokens = \"app\"\nclient_secret_file = \"{}\"",
            w.auth.secret_file().display()
        ),
        &format!(
            "[imap]\nverify_password_with = \"legacy\"\n\
             [backends.legacy]\nkind = \"pop3\"\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
             [routing]\ndefault_backend = \"imap\"",
            w.dc.pop3_port()
        ),
    );
    assert_login_ok(&pop(&pb, "alice", &imap_password("alice")), "alice");
    assert_eq!(
        w.dovecot_logins("alice", "XOAUTH2"),
        1,
        "{}",
        w.dc.log_tail(20)
    );
    let s = pop(&pb, "alice", "not-her-password");
    assert!(pass_resp(&s).starts_with("-ERR [AUTH]"), "{s:?}");
    assert_eq!(w.dovecot_logins("alice", "XOAUTH2"), 1);
}

#[test]
fn an_unreachable_or_silent_token_endpoint_is_a_temporary_failure() {
    let w = world();
    let passwords = w.password_file(&[("alice", "pop-alice-1")]);
    let closed = free_ports(1)[0];
    let pb = Popbridge::start(
        &w.dc,
        &format!(
            "[limits]\nauth_penalty_base_ms = 1\n[imap.oauth]\ntokens = \"app\"\n\
             token_url = \"http://127.0.0.1:{closed}/token\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret_file = \"{}\"\npassword_file = \"{}\"",
            w.auth.secret_file().display(),
            passwords.display()
        ),
    );
    let s = pop(&pb, "alice", "pop-alice-1");
    assert!(pass_resp(&s).starts_with("-ERR [SYS/TEMP]"), "{s:?}");
    drop(pb);

    // An endpoint that never answers: the deadline (1 s) ends the wait.
    w.auth.control(r#"{"fail": "hang"}"#);
    let pb = w.popbridge(
        &format!(
            "tokens = \"app\"\nclient_secret_file = \"{}\"\npassword_file = \"{}\"\nhttp_timeout_secs = 1",
            w.auth.secret_file().display(),
            passwords.display()
        ),
        "",
    );
    let started = Instant::now();
    let s = pop(&pb, "alice", "pop-alice-1");
    assert!(pass_resp(&s).starts_with("-ERR [SYS/TEMP]"), "{s:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    w.auth.control(r#"{"fail": ""}"#);
}

// ---------------------------------------------------------------------------------------------
// Way 3: users' own delegated grants.

/// `popbridge oauth authorize` for `user`, whose POP3 password will be `pw`.
fn authorize(pb: &Popbridge, user: &str, pw: &str) -> std::process::Output {
    Command::new(POPBRIDGE_BIN)
        .args(["oauth", "authorize", "--config"])
        .arg(pb.config_path())
        .args(["--user", user, "--password-env", "PB_PW"])
        .env("PB_PW", pw)
        .output()
        .unwrap()
}

/// The one sealed grant in the store (file names are hashes of the logins).
fn stored_grant(store: &Path) -> Vec<u8> {
    let entries: Vec<_> = std::fs::read_dir(store)
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(entries.len(), 1, "one grant file in {}", store.display());
    std::fs::read(entries[0].path()).unwrap()
}

#[test]
fn delegated_grants_device_flow_refresh_rotation_revocation() {
    let w = world();
    let pb = w.popbridge(
        &format!(
            "tokens = \"user\"\nclient_secret_file = \"{}\"\ntoken_store = \"{}\"",
            w.auth.secret_file().display(),
            w.token_store().display()
        ),
        "",
    );
    // Before any grant: told to authorize.
    let s = pop(&pb, "alice", "pop-alice-1");
    assert!(pass_resp(&s).starts_with("-ERR [AUTH]"), "{s:?}");
    assert!(pass_resp(&s).contains("authorize"), "{s:?}");

    // The device grant: approved after two polls.
    w.auth
        .control(r#"{"device_user": "alice", "approve_after": 2}"#);
    let out = authorize(&pb, "alice", "pop-alice-1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!("http://127.0.0.1:{}/activate", w.auth.port())),
        "{stdout}"
    );
    assert_eq!(w.auth.requests("device_code", "authorization_pending"), 2);
    assert_eq!(w.auth.requests("device_code", "ok"), 1);
    let sealed = stored_grant(&w.token_store());
    for token in w.auth.issued() {
        assert!(
            !String::from_utf8_lossy(&sealed).contains(&token),
            "the store holds a token in clear"
        );
    }

    // A wrong password opens nothing and asks for nothing.
    let s = pop(&pb, "alice", "pop-alice-2");
    assert!(pass_resp(&s).starts_with("-ERR [AUTH]"), "{s:?}");
    assert_eq!(w.auth.requests("refresh_token", "ok"), 0);

    // The first login refreshes; the rotated refresh token is sealed again.
    assert_login_ok(&pop(&pb, "alice", "pop-alice-1"), "alice");
    assert_eq!(w.auth.requests("refresh_token", "ok"), 1);
    assert_ne!(stored_grant(&w.token_store()), sealed, "rotation stored");
    // The next uses the cached token.
    assert_login_ok(&pop(&pb, "alice", "pop-alice-1"), "alice");
    assert_eq!(w.auth.requests("refresh_token", "ok"), 1);
    assert_eq!(w.dovecot_logins("alice", "XOAUTH2"), 2);

    // The access token dies early: refreshed with the rotated refresh token (the first one
    // would be invalid_grant now).
    w.auth.control(r#"{"expire_all": true}"#);
    assert_login_ok(&pop(&pb, "alice", "pop-alice-1"), "alice");
    assert_eq!(w.auth.requests("refresh_token", "ok"), 2);
    assert_eq!(w.auth.requests("refresh_token", "invalid_grant"), 0);

    // Revoked at the provider: the user is told to authorize again; a metric and a log line.
    w.auth.control(r#"{"revoke": "alice"}"#);
    let s = pop(&pb, "alice", "pop-alice-1");
    assert!(pass_resp(&s).starts_with("-ERR [AUTH]"), "{s:?}");
    assert!(pass_resp(&s).contains("authorize again"), "{s:?}");
    let revoked = [("grant", "refresh_token"), ("result", "invalid_grant")];
    assert!(w.metric("popbridge_oauth_token_requests_total", &revoked) >= 1.0);

    // Authorized again, then forgotten by the operator.
    w.auth
        .control(r#"{"device_user": "alice", "approve_after": 0}"#);
    assert!(authorize(&pb, "alice", "pop-alice-1").status.success());
    assert_login_ok(&pop(&pb, "alice", "pop-alice-1"), "alice");
    let forget = Command::new(POPBRIDGE_BIN)
        .args(["oauth", "forget", "--config"])
        .arg(pb.config_path())
        .args(["--user", "alice"])
        .output()
        .unwrap();
    assert!(forget.status.success(), "{forget:?}");

    // A denied authorization stores nothing.
    w.auth.control(r#"{"deny": true, "device_user": "bob"}"#);
    let out = authorize(&pb, "bob", "pop-bob-2");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("access_denied"),
        "{out:?}"
    );
    let s = pop(&pb, "bob", "pop-bob-2");
    assert!(pass_resp(&s).contains("authorize"), "{s:?}");

    let log = pb.stop();
    assert!(log.contains("must authorize again"), "{log}");
}

#[test]
fn two_sessions_of_one_user_share_one_refresh() {
    let w = world();
    let oauth = format!(
        "tokens = \"user\"\nclient_secret_file = \"{}\"\ntoken_store = \"{}\"",
        w.auth.secret_file().display(),
        w.token_store().display()
    );
    let pb = w.popbridge(&oauth, "");
    w.auth
        .control(r#"{"device_user": "bob", "approve_after": 0}"#);
    assert!(authorize(&pb, "bob", "pop-bob-2").status.success());
    // Rotation on every refresh: two refreshes with one refresh token would leave one of them
    // invalid_grant and the user's grant lost.
    for round in 0..3 {
        w.auth.control(r#"{"expire_all": true}"#);
        let port = pb.pop3_port();
        let sessions: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    poplib(port, &["user bob", "pass pop-bob-2", "stat", "quit"])
                })
            })
            .collect();
        let results: Vec<PopSession> = sessions.into_iter().map(|t| t.join().unwrap()).collect();
        // One session holds the maildrop at a time (POP3's exclusive lock): the others may be
        // refused with [IN-USE]; none may fail to log in upstream.
        let mut logged_in = 0;
        for s in &results {
            let resp = pass_resp(s);
            assert!(
                s.steps[1].ok || resp.starts_with("-ERR [IN-USE]"),
                "round {round}: {resp}\n{}",
                pb.log_tail(30)
            );
            logged_in += usize::from(s.steps[1].ok);
        }
        assert!(logged_in >= 1);
    }
    let stats = w.auth.stats();
    assert_eq!(stats["max_in_flight"]["bob"], 1, "{stats}");
    assert_eq!(
        w.auth.requests("refresh_token", "invalid_grant"),
        0,
        "{stats}"
    );
    assert_login_ok(&pop(&pb, "bob", "pop-bob-2"), "bob");
}

#[test]
fn bad_oauth_settings_name_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("tokens = \"app\"\ntoken_url = \"http://example.org/token\"\nclient_id = \"c\"", "token_url"),
        ("tokens = \"sometimes\"", "tokens"),
        ("tokens = \"user\"\ntoken_url = \"http://127.0.0.1:9/token\"\nclient_id = \"c\"", "token_store"),
        ("tokens = \"app\"\ntoken_url = \"http://127.0.0.1:9/token\"\nclient_id = \"c\"\nclient_secret_file = \"/nonexistent/s\"\npassword_file = \"/nonexistent/p\"", "client_secret_file"),
        ("tokens = \"app\"\nprovider = \"microsoft\"\nclient_id = \"c\"", "tenant"),
        ("tokens = \"client\"\nhttp_timeout_secs = 0", "http_timeout_secs"),
    ];
    for (oauth, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            format!(
                "[pop3]\nlisten = \"127.0.0.1:1110\"\nplaintext_auth_loopback = true\n[state]\ndir = \"{}\"\n[imap]\nhost = \"127.0.0.1\"\n[imap.oauth]\n{oauth}\n",
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        let out = Command::new(POPBRIDGE_BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{oauth}: {err}");
        assert!(err.contains(&path.display().to_string()), "{oauth}: {err}");
        assert!(err.contains(key), "{oauth}: expected {key} in {err}");
    }
}
