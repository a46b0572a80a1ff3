//! A routed session follows its own backend's settings, not `[imap]`'s: here the piece size
//! (`fetch_chunk_bytes`), which also bounds the responses that backend's connections accept.
//! A relay in front of the backend cuts the connection if it ever sees a FETCH asking for a
//! piece of `[imap]`'s size, so a session that used the wrong one fails its TOP.

mod support;

use support::relay::{Fault, Relay, Trigger};
use support::*;

fn message() -> Vec<u8> {
    let mut m = b"Subject: big enough for several pieces\r\n\r\n".to_vec();
    for i in 0..2000 {
        m.extend_from_slice(
            format!("line {i} of a message longer than one small piece\r\n").as_bytes(),
        );
    }
    m
}

/// popbridge with `[imap]` at the largest piece and backend `small` (the same Dovecot behind
/// a relay that cuts on `cut_on`) at 4 KiB; user `s` routed to `small`.
fn setup(cut_on: &str) -> (Dovecot, Relay, Popbridge) {
    let dc = Dovecot::start();
    dc.add_user("s", "pw");
    dc.seed("s", &[&message()]);
    let relay = Relay::start(
        dc.imap_port(),
        Trigger::ClientSends(cut_on.into()),
        Fault::Cut,
    );
    let pb = Popbridge::start(
        &dc,
        &format!(
            "[imap]\nfetch_chunk_bytes = 16777216\n\
             [backends.small]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
             command_timeout_secs = 2\nfetch_chunk_bytes = 4096\n\
             [routing]\nrules = [{{ match = \"s\", backend = \"small\" }}]\n",
            relay.port()
        ),
    );
    (dc, relay, pb)
}

#[test]
fn a_routed_session_asks_for_its_backends_piece_size() {
    let (_dc, relay, pb) = setup("BODY.PEEK[]<0.16777216>");
    let s = poplib(pb.pop3_port(), &["user s", "pass pw", "top 1 300", "quit"]);
    s.assert_all_ok();
    assert_eq!(
        s.step("top 1 300").data(),
        expected_top(&message(), 300),
        "TOP through the small backend, byte-exact"
    );
    assert_eq!(
        relay.fired(),
        0,
        "no FETCH of [imap]'s piece size reached the backend"
    );
}

/// The relay's trigger is live: the same session does ask for 4 KiB pieces.
#[test]
fn the_relay_sees_the_small_pieces() {
    let (_dc, relay, pb) = setup("BODY.PEEK[]<0.4096>");
    let s = poplib(pb.pop3_port(), &["user s", "pass pw", "top 1 300", "quit"]);
    assert!(
        !s.step("top 1 300").ok,
        "the cut reaches the client as -ERR"
    );
    assert_eq!(relay.fired(), 1);
}
