//! The FETCH queue (`prefetch.rs`) over a scripted server: FETCHes sent ahead are served
//! without a command, drained before any other, refused or broken on foreign, oversized, cut
//! or stalled answers, and read for their own commands when a server interleaves them. The
//! scripted server and builders are `fetch`'s tests'.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::*;
use crate::upstream::imap::conn::FetchOrder;
use crate::upstream::imap::engine::ConnLimits;
use crate::upstream::imap::fetch::tests::{body, connect, fetch_reply, in_step, read_all, LIMITS};
use crate::upstream::imap::BodyStart;
use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_next::imap_types::sequence::SequenceSet;

/// A first streamed FETCH (the server shows UID before BODY[]), delivered; then the
/// FETCH of the next message is prefetched behind its unread tail.
async fn prefetching(
    next_reply: Vec<u8>,
    after: Vec<(&'static str, Vec<u8>)>,
    limits: ConnLimits,
) -> ImapConnection {
    let first = fetch_reply(
        "* 1 FETCH (UID 7 BODY[] ",
        &body(30_000),
        ")\r\n{tag} OK\r\n",
    );
    let mut steps = vec![("UID FETCH 7 (", first), ("UID FETCH 8,9 (", next_reply)];
    steps.extend(after);
    let mut conn = connect(steps, 777, limits).await;
    conn.body_start(7, &[]).await.unwrap();
    assert_eq!(read_all(&mut conn).await.unwrap(), body(30_000));
    conn.prefetch(8, &[9]).await.unwrap();
    assert!(conn.prefetched(8) && !conn.prefetched(9));
    // Never a UID already on its way.
    assert!(conn.prefetch(10, &[9]).await.is_err());
    conn
}

fn next_reply() -> Vec<u8> {
    let mut r = fetch_reply("* 2 FETCH (UID 8 BODY[] ", &body(90_000), ")\r\n");
    r.extend(fetch_reply("* 3 FETCH (UID 9 BODY[] ", &body(5), ")\r\n"));
    r.extend_from_slice(b"{tag} OK\r\n");
    r
}

#[tokio::test]
async fn a_prefetched_body_is_served_without_a_command() {
    let noop = vec![("NOOP", b"{tag} OK noop\r\n".to_vec())];
    let mut conn = prefetching(next_reply(), noop, LIMITS).await;
    conn.settle().await.unwrap();
    // The others asked for now are ignored: the prefetched command's are read.
    assert!(matches!(
        conn.body_start(8, &[]).await.unwrap(),
        BodyStart::Streaming
    ));
    assert!(!conn.has_prefetch());
    assert_eq!(read_all(&mut conn).await.unwrap(), body(90_000));
    conn.settle().await.unwrap();
    assert_eq!(conn.take_ahead(), vec![(9, Bytes::from(body(5)))]);
    // In step: the next command is the scripted NOOP.
    in_step(&mut conn).await;
}

#[tokio::test]
async fn a_prefetch_is_drained_before_another_command() {
    // Another message streamed instead, a plain command (the commit's STORE, say), and
    // a prefetch answered NO: each drains the pending response first.
    let steps = vec![
        (
            "UID FETCH 11 (",
            fetch_reply("* 5 FETCH (UID 11 BODY[] ", &body(40), ")\r\n{tag} OK\r\n"),
        ),
        (
            "UID FETCH 12 (",
            b"* 9 EXPUNGE\r\n{tag} NO gone\r\n".to_vec(),
        ),
        ("UID STORE", b"{tag} OK stored\r\n".to_vec()),
    ];
    let mut conn = prefetching(next_reply(), steps, LIMITS).await;
    conn.body_start(11, &[]).await.unwrap();
    assert!(!conn.has_prefetch());
    assert_eq!(read_all(&mut conn).await.unwrap(), body(40));
    conn.prefetch(12, &[]).await.unwrap();
    let set = SequenceSet::try_from("7").unwrap();
    let store = CommandBody::store(
        set,
        StoreType::Add,
        StoreResponse::Silent,
        vec![Flag::Deleted],
        true,
    )
    .unwrap();
    assert!(conn.execute(store, |_| {}).await.unwrap().is_ok());
    assert!(!conn.has_prefetch());
}

#[tokio::test]
async fn a_prefetch_with_a_foreign_or_oversized_body_breaks_the_connection() {
    let foreign = fetch_reply("* 2 FETCH (UID 3 BODY[] ", &body(10), ")\r\n{tag} OK\r\n");
    let mut conn = prefetching(foreign, vec![], LIMITS).await;
    assert!(matches!(
        conn.execute(CommandBody::Noop, |_| {}).await,
        Err(ImapError::Malformed)
    ));
    assert!(matches!(
        conn.execute(CommandBody::Noop, |_| {}).await,
        Err(ImapError::Broken)
    ));
    // A quoted or NIL body of a UID not asked for is foreign too.
    for inline in ["\"x\"", "NIL"] {
        let foreign = format!("* 2 FETCH (UID 3 BODY[] {inline})\r\n{{tag}} OK\r\n");
        let mut conn = prefetching(foreign.into_bytes(), vec![], LIMITS).await;
        assert!(matches!(
            conn.execute(CommandBody::Noop, |_| {}).await,
            Err(ImapError::Malformed)
        ));
    }
    let huge = format!("* 2 FETCH (UID 8 BODY[] {{{}}}\r\n", DRAIN_MAX + 1).into_bytes();
    let mut conn = prefetching(huge, vec![], LIMITS).await;
    assert!(conn.execute(CommandBody::Noop, |_| {}).await.is_err());
}

#[tokio::test]
async fn a_stalled_or_cut_prefetch_fails_the_next_command() {
    let limits = ConnLimits {
        io_timeout: Duration::from_millis(200),
        ..LIMITS
    };
    // 10 bytes of 100, then silence: the drain hits the deadline ...
    let stalled = b"* 2 FETCH (UID 8 BODY[] {100}\r\n0123456789".to_vec();
    let mut conn = prefetching(stalled, vec![], limits).await;
    assert!(matches!(
        conn.execute(CommandBody::Noop, |_| {}).await,
        Err(ImapError::Timeout(_))
    ));
    assert!(matches!(
        conn.body_start(8, &[]).await,
        Err(ImapError::Broken)
    ));
}

#[tokio::test]
async fn a_cut_prefetch_fails_the_next_command() {
    let (a, b) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(b);
        let mut r = BufReader::new(r);
        w.write_all(b"* OK ready\r\n").await.unwrap();
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let tag = line.split(' ').next().unwrap().to_owned();
        let reply = fetch_reply("* 1 FETCH (UID 7 BODY[] ", &body(100), ")\r\n");
        w.write_all(&reply).await.unwrap();
        w.write_all(format!("{tag} OK\r\n").as_bytes())
            .await
            .unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert!(line.contains("UID FETCH 8 ("), "{line}");
        w.write_all(b"* 2 FETCH (UID 8 BODY[] {100}\r\n01234")
            .await
            .unwrap();
        // Cut: both directions closed.
    });
    let mut conn = ImapConnection::over(Box::new(a), LIMITS, false)
        .await
        .unwrap();
    conn.body_start(7, &[]).await.unwrap();
    read_all(&mut conn).await.unwrap();
    conn.prefetch(8, &[]).await.unwrap();
    assert!(conn.execute(CommandBody::Noop, |_| {}).await.is_err());
    assert!(matches!(
        conn.execute(CommandBody::Noop, |_| {}).await,
        Err(ImapError::Broken)
    ));
}

/// Dovecot runs pipelined UID FETCHes at once: once its output blocks between two
/// messages of one, it starts the next, so the responses of FETCHes sent ahead (and
/// their completions) arrive in the middle of the earlier one's. Each is kept for its
/// command, and every body reaches the right RETR, at every split of the stream.
#[tokio::test]
async fn interleaved_responses_of_pending_fetches_reach_their_own_commands() {
    let order = Arc::new(FetchOrder::default());
    order.set(true);
    let (b7, b8, b9, b11) = (body(30_000), body(700), body(5), body(90));
    let a = fetch_reply("* 1 FETCH (UID 7 BODY[] ", &b7, ")\r\n");
    let mut b = fetch_reply("* 3 FETCH (UID 9 BODY[] ", &b9, " FLAGS ())\r\n");
    b.extend(fetch_reply("* 2 FETCH (UID 8 BODY[] ", &b8, ")\r\n"));
    let mut c = fetch_reply("* 5 FETCH (UID 11 BODY[] ", &b11, ")\r\n");
    c.extend_from_slice(b"{tag-1} OK b\r\n* 4 FETCH (UID 10 BODY[] NIL)\r\n");
    c.extend_from_slice(b"* 9 EXISTS\r\n{tag} OK c\r\n{tag-2} OK a\r\n");
    for split in [1, 3, 64, 4096, 1 << 20] {
        let steps = vec![
            ("UID FETCH 7,8 (", a.clone()),
            ("UID FETCH 9 (", b.clone()),
            ("UID FETCH 10,11 (", c.clone()),
            ("NOOP", b"{tag} OK noop\r\n".to_vec()),
        ];
        // Read in turn: each RETR gets its own body, the gone one none.
        let mut conn = connect(steps.clone(), split, LIMITS).await;
        conn.share_fetch_order(order.clone());
        conn.body_start(7, &[8]).await.unwrap();
        assert_eq!(read_all(&mut conn).await.unwrap(), b7);
        conn.prefetch(9, &[]).await.unwrap();
        // A UID on its way already is never asked for twice.
        assert!(conn.prefetch(8, &[]).await.is_err());
        assert!(conn.prefetch(12, &[9]).await.is_err());
        conn.prefetch(10, &[11]).await.unwrap();
        conn.settle().await.unwrap();
        assert_eq!(conn.take_ahead(), vec![(8, Bytes::from(b8.clone()))]);
        assert!(conn.prefetched(9));
        assert!(matches!(
            conn.body_start(9, &[]).await.unwrap(),
            BodyStart::Streaming
        ));
        assert_eq!(read_all(&mut conn).await.unwrap(), b9, "split {split}");
        conn.settle().await.unwrap();
        match conn.body_start(10, &[]).await.unwrap() {
            BodyStart::NoBody(done) => assert_eq!(done.text, "c"),
            BodyStart::Streaming => panic!("a body for a message that went away"),
        }
        assert_eq!(conn.take_ahead(), vec![(11, Bytes::from(b11.clone()))]);
        assert!(!conn.has_prefetch());
        in_step(&mut conn).await;
        // Drained instead: the next command finds the connection in step.
        let mut conn = connect(steps, split, LIMITS).await;
        conn.share_fetch_order(order.clone());
        conn.body_start(7, &[8]).await.unwrap();
        assert_eq!(read_all(&mut conn).await.unwrap(), b7);
        conn.prefetch(9, &[]).await.unwrap();
        conn.prefetch(10, &[11]).await.unwrap();
        in_step(&mut conn).await;
        assert!(!conn.has_prefetch());
    }
}

#[tokio::test]
async fn a_prefetched_message_that_went_away_is_drained() {
    let gone = b"* 2 FETCH (UID 8 BODY[] NIL)\r\n* 3 FETCH (UID 9 BODY[] NIL)\r\n* 2 EXPUNGE\r\n{tag} OK [EXPUNGEISSUED] x\r\n".to_vec();
    let noop = vec![("NOOP", b"{tag} OK noop\r\n".to_vec())];
    let mut conn = prefetching(gone.clone(), noop, LIMITS).await;
    in_step(&mut conn).await;
    // ... and one the client asks for reads as no body.
    let mut conn = prefetching(gone, vec![], LIMITS).await;
    assert!(matches!(
        conn.body_start(8, &[]).await.unwrap(),
        BodyStart::NoBody(_)
    ));
    assert!(conn.take_ahead().is_empty());
}
