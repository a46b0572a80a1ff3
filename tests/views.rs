//! Per-device views (issue #15 item 2), against a private Dovecot with poplib and curl: one
//! user on two devices, a desktop with the normal login (downloads and deletes, hide mode)
//! and a phone with `recent:<user>` (the last 30 days, whatever the desktop hid), each keeping
//! a ledger of what it downloaded as a leave-on-server client does (by UIDL). Checked: each
//! device gets every message it should exactly once and the right bytes, the phone's DELE
//! hides nothing from the desktop (and sets `\Seen` only when configured), both devices'
//! sessions run at once while two phone sessions exclude each other.

mod support;

use std::collections::BTreeMap;

use support::imap_raw::Imap;
use support::raw::RawPop3 as Raw;
use support::*;

const PW: &str = "vpw";
const OLD: &str = "01-Jan-2020 10:00:00 +0000";

fn msg(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nX-Id: {tag}\r\n\r\nbody {tag}\r\n").into_bytes()
}

fn append(dc: &Dovecot, user: &str, tag: &str, date: Option<&str>) {
    let mut c = Imap::login(dc.imap_port(), user, PW);
    let date = date.map(|d| format!(" \"{d}\"")).unwrap_or_default();
    c.run(&format!("APPEND INBOX (){date}"), &msg(tag));
    c.run("LOGOUT", &[]);
}

/// What a device downloaded: UIDL -> the bytes, and how often.
#[derive(Default, Debug)]
struct Ledger {
    got: BTreeMap<String, (Vec<u8>, u32)>,
}

impl Ledger {
    fn tags(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .got
            .values()
            .map(|(b, _)| {
                let s = String::from_utf8_lossy(b);
                s.lines()
                    .find_map(|l| l.strip_prefix("X-Id: ").map(str::to_owned))
                    .unwrap()
            })
            .collect();
        t.sort();
        t
    }
    fn assert_each_once(&self) {
        for (uidl, (_, n)) in &self.got {
            assert_eq!(*n, 1, "{uidl} downloaded {n} times");
        }
    }
}

/// One sync of a leave-on-server client: list UIDLs, RETR what the ledger lacks, and DELE
/// `dele` of them (by tag) before QUIT. Returns the tags listed.
fn sync(port: u16, login: &str, ledger: &mut Ledger, dele: &[&str]) -> Vec<String> {
    let uidls = uidl_list(port, login, PW);
    let mut steps = vec![format!("user {login}"), format!("pass {PW}")];
    let wanted: Vec<usize> = (1..=uidls.len())
        .filter(|&i| !ledger.got.contains_key(&uidls[i - 1]))
        .collect();
    for &i in &wanted {
        steps.push(format!("retr {i}"));
    }
    // TOP 0 of everything to know which message is which (tags), then DELE by tag.
    for i in 1..=uidls.len() {
        steps.push(format!("top {i} 0"));
    }
    steps.push("uidl".into());
    steps.push("quit".into());
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    let s = poplib(port, &refs);
    s.assert_all_ok();
    assert_eq!(
        String::from_utf8(s.step("uidl").data())
            .unwrap()
            .lines()
            .count(),
        uidls.len(),
        "the listing did not change between the two sessions"
    );
    for &i in &wanted {
        let body = s.step(&format!("retr {i}")).data();
        let e = ledger.got.entry(uidls[i - 1].clone()).or_default();
        e.0 = body;
        e.1 += 1;
    }
    let tags: Vec<String> = (1..=uidls.len())
        .map(|i| {
            let head = String::from_utf8(s.step(&format!("top {i} 0")).data()).unwrap();
            head.lines()
                .find_map(|l| l.strip_prefix("X-Id: ").map(str::to_owned))
                .unwrap()
        })
        .collect();
    if !dele.is_empty() {
        let mut steps = vec![format!("user {login}"), format!("pass {PW}")];
        for (i, t) in tags.iter().enumerate() {
            if dele.contains(&t.as_str()) {
                steps.push(format!("dele {}", i + 1));
            }
        }
        steps.push("quit".into());
        let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
        poplib(port, &refs).assert_all_ok();
    }
    tags
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn two_devices(dele_mode: &str) {
    let dc = Dovecot::start();
    let user = "v1";
    dc.add_user(user, PW);
    append(&dc, user, "old", Some(OLD));
    for t in ["r1", "r2", "r3"] {
        append(&dc, user, t, None);
    }
    let pb = Popbridge::start(
        &dc,
        &format!("[pop3]\nmark_seen = false\n[views]\nrecent_days = 30\ndele = \"{dele_mode}\"\n"),
    );
    let port = pb.pop3_port();
    let phone_login = format!("recent:{user}");
    let (mut desktop, mut phone) = (Ledger::default(), Ledger::default());

    // The desktop downloads everything and deletes it (hidden upstream).
    let listed = sync(port, user, &mut desktop, &["old", "r1", "r2", "r3"]);
    assert_eq!(listed, vec!["old", "r1", "r2", "r3"]);
    assert!(
        uidl_list(port, user, PW).is_empty(),
        "the desktop hid it all"
    );
    // The phone still sees the last 30 days, hidden or not, and its DELE changes nothing
    // for the desktop.
    let listed = sync(port, &phone_login, &mut phone, &["r1", "r2"]);
    assert_eq!(
        listed,
        vec!["r1", "r2", "r3"],
        "the old message is outside the view"
    );
    append(&dc, user, "r4", None);
    let listed = sync(port, &phone_login, &mut phone, &["r4"]);
    assert_eq!(
        listed,
        vec!["r1", "r2", "r3", "r4"],
        "DELE in the view removed nothing"
    );
    let listed = sync(port, user, &mut desktop, &[]);
    assert_eq!(
        listed,
        vec!["r4"],
        "the phone's DELE did not hide r4 from the desktop"
    );

    // Ledgers: each device got each message once, exact bytes.
    assert_eq!(desktop.tags(), sorted(&["old", "r1", "r2", "r3", "r4"]));
    assert_eq!(phone.tags(), sorted(&["r1", "r2", "r3", "r4"]));
    desktop.assert_each_once();
    phone.assert_each_once();
    for l in [&desktop, &phone] {
        for (body, _) in l.got.values() {
            let tag = String::from_utf8_lossy(body)
                .lines()
                .find_map(|x| x.strip_prefix("X-Id: ").map(str::to_owned))
                .unwrap();
            assert_eq!(body, &msg(&tag));
        }
    }
    // The same message has the same UIDL on both devices.
    let shared: Vec<&String> = phone
        .got
        .keys()
        .filter(|u| desktop.got.contains_key(*u))
        .collect();
    assert_eq!(shared.len(), 4, "r1..r4 under one UIDL each");

    // Upstream flags: the view's DELE set \Seen only with dele = "seen", never the keyword.
    let st = dc.imap_state(user, PW, "INBOX");
    for m in &st.messages {
        let is_r4 = m.uid == *st.uids().last().unwrap();
        assert_eq!(
            m.has_flag("$POP3Deleted"),
            !is_r4,
            "uid {}: {:?}",
            m.uid,
            m.flags
        );
    }
    let r4 = st.messages.last().unwrap();
    let r3 = &st.messages[3];
    assert_eq!(r4.has_flag("\\Seen"), dele_mode == "seen", "{r4:?}");
    assert!(
        !r3.has_flag("\\Seen"),
        "r3 was never DELEd in the view: {r3:?}"
    );

    // Locks: a desktop and a phone session at once; a second phone session is IN-USE.
    let mut d = Raw::ready(port);
    d.login(user, PW);
    let mut p = Raw::ready(port);
    p.login(&phone_login, PW);
    let second = curl_pop3(
        &format!("pop3://recent%3A{user}:{PW}@127.0.0.1:{port}/"),
        &[],
    );
    assert_ne!(second.code, 0, "a second phone session must be refused");
    assert!(pb.log().contains("maildrop in use"), "{}", pb.log_tail(10));
    assert!(p.cmd("QUIT").starts_with("+OK"));
    assert!(d.cmd("QUIT").starts_with("+OK"));
    let c = curl_pop3(
        &format!("pop3://recent%3A{user}:{PW}@127.0.0.1:{port}/"),
        &[],
    );
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert_eq!(String::from_utf8_lossy(&c.stdout).lines().count(), 4);
    // Wrong password in the view form: refused like the account's.
    let bad = curl_pop3(
        &format!("pop3://recent%3A{user}:nope@127.0.0.1:{port}/"),
        &[],
    );
    assert_eq!(bad.code, 67, "login denied: {}", bad.stderr);
}

#[test]
fn two_devices_one_in_the_view_dele_does_nothing() {
    two_devices("nothing");
}

#[test]
fn two_devices_one_in_the_view_dele_sets_seen() {
    two_devices("seen");
}

#[test]
fn the_view_form_is_refused_where_views_are_off() {
    let dc = Dovecot::start();
    dc.add_user("v2", PW);
    append(&dc, "v2", "r1", None);
    let pb = Popbridge::start(&dc, "");
    // Views off: `recent:v2` is just an unknown login upstream.
    let s = poplib(pb.pop3_port(), &["user recent:v2", &format!("pass {PW}")]);
    assert!(!s.step(&format!("pass {PW}")).ok);
    // On for another backend, off for this one: a clear refusal, not an authentication
    // failure.
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[imap]\nrecent_days = 0\n[views]\nrecent_days = 7\n[backends.other]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
            dc.imap_port()
        ),
    );
    let s = poplib(pb.pop3_port(), &["user recent:v2", &format!("pass {PW}")]);
    let pass = s.step(&format!("pass {PW}"));
    assert!(pass.resp.starts_with("-ERR [SYS/PERM]"), "{}", pass.resp);
    assert!(
        pb.log().contains("this backend has no view"),
        "{}",
        pb.log_tail(10)
    );
}
