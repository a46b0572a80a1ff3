use super::*;
use crate::maildrop::MessageEntry;
use base64::Engine as _;

fn session() -> Session {
    Session::new(Arc::new(SessionConfig {
        implementation: "popbridge test".into(),
        ..SessionConfig::default()
    }))
}

fn snapshot() -> Snapshot {
    Snapshot {
        uid_validity: 0x6b08_0e83,
        messages: vec![
            MessageEntry { uid: 1, size: 100 },
            MessageEntry { uid: 5, size: 20 },
            MessageEntry { uid: 9, size: 3 },
        ],
        legacy: None,
        others: None,
    }
}

fn reply(a: Action) -> String {
    match a {
        Action::Reply(b) => String::from_utf8(b).unwrap(),
        other => panic!("expected Reply, got {other:?}"),
    }
}

fn login_reply(r: Reply) -> String {
    assert!(!r.close, "closed after login");
    String::from_utf8(r.bytes).unwrap()
}

fn line(s: &mut Session, l: &str) -> Action {
    s.on_line(Ok(l.as_bytes()))
}

fn logged_in() -> Session {
    let mut s = session();
    assert_eq!(reply(line(&mut s, "USER bob")), "+OK\r\n");
    assert!(matches!(line(&mut s, "PASS pw"), Action::Login { .. }));
    assert_eq!(
        login_reply(s.on_login(Ok(snapshot()))),
        "+OK Logged in.\r\n"
    );
    s
}

#[test]
fn migrated_messages_keep_their_legacy_uidls() {
    let mut map = crate::uidl::map::UidlMap::new(0x6b08_0e83);
    map.insert(1, "legacy-one").unwrap();
    // The legacy server's UIDL for UID 9 equals what the format gives UID 5.
    map.insert(9, "000000056b080e83").unwrap();
    let mut s = session();
    line(&mut s, "USER bob");
    line(&mut s, "PASS pw");
    let snap = Snapshot {
        legacy: Some(std::sync::Arc::new(map)),
        ..snapshot()
    };
    s.on_login(Ok(snap));
    assert_eq!(
        reply(line(&mut s, "UIDL")),
        "+OK\r\n1 legacy-one\r\n2 pb-000000056b080e83\r\n3 000000056b080e83\r\n.\r\n"
    );
    assert_eq!(reply(line(&mut s, "UIDL 1")), "+OK 1 legacy-one\r\n");
    assert_eq!(
        reply(line(&mut s, "UIDL 2")),
        "+OK 2 pb-000000056b080e83\r\n"
    );
}

#[test]
fn greeting_and_capa_per_state() {
    let mut s = session();
    assert_eq!(s.greeting(), b"+OK popbridge ready.\r\n");
    let capa = reply(line(&mut s, "CAPA"));
    assert_eq!(
        capa,
        "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n\
         PIPELINING\r\nUSER\r\nSASL PLAIN\r\nIMPLEMENTATION popbridge test\r\n.\r\n"
    );
    let mut s = logged_in();
    let capa = reply(line(&mut s, "capa"));
    assert!(!capa.contains("USER") && !capa.contains("SASL"));
    assert!(capa.contains("IMPLEMENTATION popbridge test\r\n.\r\n"));
}

#[test]
fn user_pass_flow() {
    let mut s = session();
    assert!(reply(line(&mut s, "PASS x")).starts_with("-ERR"));
    assert!(reply(line(&mut s, "STAT")).starts_with("-ERR"));
    line(&mut s, "USER Bob");
    match line(&mut s, "PASS p w ") {
        Action::Login {
            user,
            secret: LoginSecret::Password(password),
        } => {
            assert_eq!(user, "Bob");
            assert_eq!(password.as_str(), "p w ");
        }
        other => panic!("{other:?}"),
    }
    // Lines during login are refused, not misinterpreted.
    assert!(reply(line(&mut s, "USER eve")).starts_with("-ERR"));
    assert_eq!(
        login_reply(s.on_login(Err(MaildropError::Auth))),
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    // Still AUTHORIZATION, and the user was consumed.
    assert!(!s.is_authenticated());
    assert!(reply(line(&mut s, "PASS p")).starts_with("-ERR"));
}

fn oauth_session() -> Session {
    Session::new(Arc::new(SessionConfig {
        sasl_oauth: true,
        ..SessionConfig::default()
    }))
}

#[test]
fn xoauth2_and_oauthbearer_logins() {
    // Not offered, not accepted, unless a backend takes client tokens.
    let mut s = session();
    assert!(reply(line(&mut s, "AUTH XOAUTH2 x")).starts_with("-ERR Unsupported"));
    let mut s = oauth_session();
    assert_eq!(
        reply(line(&mut s, "AUTH")),
        "+OK\r\nPLAIN\r\nXOAUTH2\r\nOAUTHBEARER\r\n.\r\n"
    );
    assert!(reply(line(&mut s, "CAPA")).contains("\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n"));
    // XOAUTH2 with a long initial response on the command line (RFC 5034).
    let token = "t".repeat(12_000);
    let ir = b64(format!("user=bob@example.com\x01auth=Bearer {token}\x01\x01").as_bytes());
    assert!(s.max_line_len() > ir.len() + 13);
    match line(&mut s, &format!("AUTH XOAUTH2 {ir}")) {
        Action::Login {
            user,
            secret: LoginSecret::Bearer(t),
        } => assert_eq!(
            (user.as_str(), t.as_str()),
            ("bob@example.com", token.as_str())
        ),
        other => panic!("{other:?}"),
    }
    // A refused token: the RFC 7628 challenge, then -ERR [AUTH] after the client's answer.
    let r = s.on_login(Err(MaildropError::Auth));
    assert_eq!(r.bytes, OAUTH_ERROR_CHALLENGE);
    assert!(s.awaits_sasl_response());
    assert_eq!(
        reply(line(&mut s, "")),
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert!(!s.awaits_sasl_response() && !s.is_authenticated());
    // OAUTHBEARER in two steps, the user escaped in the GS2 header.
    assert_eq!(reply(line(&mut s, "AUTH OAUTHBEARER")), "+ \r\n");
    let resp = b64(b"n,a=a=2Cb@x,\x01host=pop\x01port=110\x01auth=Bearer abc\x01\x01");
    match line(&mut s, &resp) {
        Action::Login {
            user,
            secret: LoginSecret::Bearer(t),
        } => assert_eq!((user.as_str(), t.as_str()), ("a,b@x", "abc")),
        other => panic!("{other:?}"),
    }
    // A grant that is gone says to authorize again; no challenge for other failures.
    let mut s = oauth_session();
    line(&mut s, "USER u");
    line(&mut s, "PASS p");
    let r = s.on_login(Err(MaildropError::Reauthorize));
    assert!(String::from_utf8(r.bytes)
        .unwrap()
        .starts_with("-ERR [AUTH] Your authorization"));
    // Malformed responses and over-long ordinary commands.
    let mut s = oauth_session();
    for bad in [
        b64(b"auth=Bearer x\x01\x01"),
        b64(b"user=bob\x01auth=Basic x\x01\x01"),
        b64(b"n,,\x01auth=Bearer x\x01\x01"),
        b64(b"p=tls-unique,a=bob,\x01auth=Bearer x\x01\x01"),
    ] {
        assert!(reply(line(&mut s, &format!("AUTH XOAUTH2 {bad}"))).starts_with("-ERR"));
        assert!(reply(line(&mut s, &format!("AUTH OAUTHBEARER {bad}"))).starts_with("-ERR"));
    }
    assert_eq!(
        reply(line(&mut s, &format!("USER {}", "u".repeat(300)))),
        "-ERR Line too long.\r\n"
    );
}

#[test]
fn login_error_codes() {
    for (e, code) in [
        (MaildropError::unavailable("x"), "-ERR [SYS/TEMP] "),
        (MaildropError::Unsupported("x".into()), "-ERR [SYS/PERM] "),
        (MaildropError::InUse, "-ERR [IN-USE] "),
        (
            MaildropError::busy(Signal::Throttled, "x"),
            "-ERR [LOGIN-DELAY] ",
        ),
        (
            MaildropError::busy(Signal::LoginDelay, "x"),
            "-ERR [LOGIN-DELAY] ",
        ),
        (MaildropError::busy(Signal::Limit, "x"), "-ERR [IN-USE] "),
        (MaildropError::busy(Signal::InUse, "x"), "-ERR [IN-USE] "),
        (
            MaildropError::busy(Signal::Unavailable, "x"),
            "-ERR [SYS/TEMP] ",
        ),
    ] {
        let mut s = session();
        line(&mut s, "USER a");
        line(&mut s, "PASS b");
        assert!(login_reply(s.on_login(Err(e))).starts_with(code));
        assert!(!s.is_authenticated());
    }
}

#[test]
fn capa_shows_the_policy_before_and_the_users_after_login() {
    use crate::pop3::policy::{Expire, UserPolicy};
    let strict = UserPolicy {
        login_delay_secs: 900,
        expire: Expire::Days(30),
    };
    let cfg = SessionConfig {
        policy: Advertised::over([UserPolicy::default(), strict]),
        ..SessionConfig::default()
    };
    let mut s = Session::new(Arc::new(cfg));
    let capa = reply(line(&mut s, "CAPA"));
    assert!(
        capa.contains("\r\nLOGIN-DELAY 900 USER\r\nEXPIRE 30 USER\r\n"),
        "{capa}"
    );
    line(&mut s, "USER a");
    line(&mut s, "PASS b");
    s.set_user_policy(UserPolicy::default());
    s.on_login(Ok(Snapshot::default()));
    let capa = reply(line(&mut s, "CAPA"));
    assert!(
        capa.contains("\r\nLOGIN-DELAY 0\r\nEXPIRE NEVER\r\n"),
        "{capa}"
    );
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn control_characters_in_login_names_are_refused_before_any_upstream() {
    for name in ["evil\u{1b}[2J", "tab\tname", "del\u{7f}"] {
        let mut s = session();
        assert!(reply(line(&mut s, &format!("USER {name}"))).starts_with("+OK"));
        let r = reply(line(&mut s, "PASS pw"));
        assert!(
            r.starts_with("-ERR [AUTH] Invalid characters"),
            "{name:?}: {r}"
        );
    }
    for name in ["legacy\nbob", "cr\rlf", "esc\u{1b}"] {
        let mut s = session();
        let ir = b64(format!("\0{name}\0pw").as_bytes());
        let r = reply(line(&mut s, &format!("AUTH PLAIN {ir}")));
        assert!(
            r.starts_with("-ERR [AUTH] Invalid characters"),
            "{name:?}: {r}"
        );
    }
}

#[test]
fn auth_plain_variants() {
    let mut s = session();
    assert_eq!(reply(line(&mut s, "AUTH")), "+OK\r\nPLAIN\r\n.\r\n");
    let ir = b64(b"\0bob\0secret");
    match line(&mut s, &format!("AUTH PLAIN {ir}")) {
        Action::Login {
            user,
            secret: LoginSecret::Password(password),
        } => {
            assert_eq!((user.as_str(), password.as_str()), ("bob", "secret"))
        }
        other => panic!("{other:?}"),
    }
    // Continuation with a raised line limit, authzid equal to authcid.
    let mut s = session();
    assert_eq!(reply(line(&mut s, "AUTH PLAIN")), "+ \r\n");
    assert_eq!(s.max_line_len(), MAX_SASL_LINE);
    assert!(s.awaits_sasl_response());
    let a = line(&mut s, &b64(b"bob\0bob\0pw"));
    assert!(matches!(a, Action::Login { ref user, .. } if user == "bob"));
    assert!(!s.awaits_sasl_response());
    // Cancel.
    let mut s = session();
    line(&mut s, "AUTH PLAIN");
    assert!(reply(line(&mut s, "*")).starts_with("-ERR"));
    assert!(!s.awaits_sasl_response());
    // Different authzid, bad base64, empty response, bad structure, other mechanism.
    let mut s = session();
    assert!(reply(line(
        &mut s,
        &format!("AUTH PLAIN {}", b64(b"admin\0bob\0pw"))
    ))
    .starts_with("-ERR [AUTH]"));
    assert!(reply(line(&mut s, "AUTH PLAIN !!!")).starts_with("-ERR"));
    assert!(reply(line(&mut s, "AUTH PLAIN =")).starts_with("-ERR [AUTH]"));
    assert!(
        reply(line(&mut s, &format!("AUTH PLAIN {}", b64(b"bob\0pw")))).starts_with("-ERR [AUTH]")
    );
    assert_eq!(
        reply(line(&mut s, "AUTH CRAM-MD5")),
        "-ERR Unsupported authentication mechanism.\r\n"
    );
    // Too long continuation.
    line(&mut s, "AUTH PLAIN");
    assert!(reply(s.on_line(Err(TooLong))).starts_with("-ERR"));
    assert!(!s.is_authenticated());
}

#[test]
fn apop_is_explained() {
    let mut s = session();
    let r = reply(line(&mut s, "APOP bob 0123456789abcdef0123456789abcdef"));
    assert!(r.starts_with("-ERR") && r.contains("proxy cannot verify APOP"));
}

#[test]
fn transaction_commands() {
    let mut s = logged_in();
    assert_eq!(reply(line(&mut s, "STAT")), "+OK 3 123\r\n");
    assert_eq!(
        reply(line(&mut s, "LIST")),
        "+OK 3 messages (123 octets)\r\n1 100\r\n2 20\r\n3 3\r\n.\r\n"
    );
    assert_eq!(reply(line(&mut s, "LIST 2")), "+OK 2 20\r\n");
    assert_eq!(reply(line(&mut s, "LIST 4")), "-ERR no such message\r\n");
    assert_eq!(
        reply(line(&mut s, "UIDL")),
        "+OK\r\n1 000000016b080e83\r\n2 000000056b080e83\r\n3 000000096b080e83\r\n.\r\n"
    );
    assert_eq!(reply(line(&mut s, "UIDL 3")), "+OK 3 000000096b080e83\r\n");
    assert_eq!(reply(line(&mut s, "DELE 2")), "+OK message 2 deleted\r\n");
    assert_eq!(
        reply(line(&mut s, "DELE 2")),
        "-ERR message 2 already deleted\r\n"
    );
    assert_eq!(
        reply(line(&mut s, "RETR 2")),
        "-ERR message 2 already deleted\r\n"
    );
    assert_eq!(reply(line(&mut s, "STAT")), "+OK 2 103\r\n");
    assert_eq!(
        reply(line(&mut s, "LIST")),
        "+OK 2 messages (103 octets)\r\n1 100\r\n3 3\r\n.\r\n"
    );
    assert!(!reply(line(&mut s, "UIDL")).contains("\r\n2 "));
    match line(&mut s, "RETR 1") {
        Action::Retrieve {
            msg,
            uid,
            size,
            top_lines,
            ok_line,
        } => {
            assert_eq!((msg, uid, size, top_lines), (1, 1, 100, None));
            assert_eq!(ok_line, b"+OK 100 octets\r\n");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        line(&mut s, "TOP 3 0"),
        Action::Retrieve {
            uid: 9,
            top_lines: Some(0),
            ..
        }
    ));
    assert_eq!(reply(line(&mut s, "NOOP")), "+OK\r\n");
    assert!(reply(line(&mut s, "USER x")).starts_with("-ERR"));
    assert!(reply(line(&mut s, "AUTH PLAIN")).starts_with("-ERR"));
    assert_eq!(
        reply(line(&mut s, "RSET")),
        "+OK maildrop has 3 messages (123 octets)\r\n"
    );
    line(&mut s, "DELE 3");
    line(&mut s, "DELE 1");
    match line(&mut s, "QUIT") {
        Action::Commit { uids } => assert_eq!(uids, vec![1, 9]),
        other => panic!("{other:?}"),
    }
    assert!(reply(line(&mut s, "STAT")).starts_with("-ERR"));
    assert_eq!(
        s.on_commit(Err(MaildropError::unavailable("x"))),
        b"-ERR [SYS/TEMP] some deleted messages not removed\r\n"
    );
}

#[test]
fn quit_paths() {
    let mut s = session();
    assert!(matches!(line(&mut s, "QUIT"), Action::Close(b) if b.starts_with(b"+OK")));
    let mut s = logged_in();
    assert!(matches!(line(&mut s, "QUIT"), Action::Commit { uids } if uids.is_empty()));
    assert_eq!(s.on_commit(Ok(())), b"+OK Logging out.\r\n");
}

#[test]
fn errors_and_cap() {
    let mut s = session();
    assert_eq!(reply(line(&mut s, "")), "-ERR Empty command.\r\n");
    assert_eq!(reply(line(&mut s, "FOO")), "-ERR Unknown command.\r\n");
    assert_eq!(
        reply(line(&mut s, "RETR x")),
        "-ERR RETR: invalid number.\r\n"
    );
    assert_eq!(reply(s.on_line(Err(TooLong))), "-ERR Line too long.\r\n");
    for _ in 4..MAX_ERRORS - 1 {
        assert!(reply(line(&mut s, "FOO")).starts_with("-ERR"));
    }
    assert!(!s.error_limit_reached());
    assert!(matches!(line(&mut s, "FOO"), Action::Close(b) if b.starts_with(b"-ERR")));
    assert!(s.error_limit_reached());
}

#[test]
fn retrieve_failure_replies() {
    let mut s = logged_in();
    // A message another client removed: -ERR naming it, as often as it happens, and the
    // session goes on.
    for _ in 0..MAX_ERRORS * 2 {
        assert_eq!(
            s.on_retrieve_failed(2, &MaildropError::Gone),
            Reply {
                bytes: b"-ERR message 2 no longer exists\r\n".to_vec(),
                close: false
            }
        );
    }
    assert!(!s.error_limit_reached());
    let down = s.on_retrieve_failed(2, &MaildropError::unavailable("x"));
    assert!(down.bytes.starts_with(b"-ERR [SYS/TEMP]") && down.close);
}

#[test]
fn upcoming_messages_by_count_then_by_listed_octets() {
    let mut s = logged_in();
    // Messages 1..3 are UIDs 1, 5, 9 of 100, 20 and 3 octets; the hint starts after `msg`.
    assert_eq!(s.upcoming(0, (1, 10), 0), vec![(1, 100)]);
    assert_eq!(s.upcoming(0, (2, 10), 0), vec![(1, 100), (5, 20)]);
    // More than the minimum count while the octets before a message are under the budget.
    assert_eq!(s.upcoming(0, (1, 10), 100), vec![(1, 100)]);
    assert_eq!(s.upcoming(0, (1, 10), 101), vec![(1, 100), (5, 20)]);
    assert_eq!(s.upcoming(0, (1, 10), 121), vec![(1, 100), (5, 20), (9, 3)]);
    // Never more than the cap, whatever the budget.
    assert_eq!(s.upcoming(0, (1, 2), u64::MAX), vec![(1, 100), (5, 20)]);
    // Deleted messages are not hinted, and count for nothing.
    assert_eq!(reply(line(&mut s, "DELE 2")), "+OK message 2 deleted\r\n");
    assert_eq!(s.upcoming(0, (2, 10), 0), vec![(1, 100), (9, 3)]);
    assert_eq!(s.upcoming(1, (5, 10), 0), vec![(9, 3)]);
    assert_eq!(s.upcoming(3, (5, 10), u64::MAX), vec![]);
}
