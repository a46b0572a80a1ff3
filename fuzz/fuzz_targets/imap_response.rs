//! What popbridge decodes from the upstream: an `imap_next::client::Client` (the pinned
//! `=0.3.4`, as in ../Cargo.toml) set up like `imap::conn` does it (`max_response_size` small,
//! `crlf_relaxed` usually on), a command enqueued, a valid greeting `* OK ready\r\n`, then
//! arbitrary server bytes fed in arbitrary chunks.
//!
//! Input layout: byte 0 = flags (bits 0-1 command: UID FETCH list / UID FETCH body piece /
//! SELECT / CAPABILITY; bit 2: crlf_relaxed off), byte 1 = chunk size seed, the rest = server
//! bytes.
//!
//! Every decoded event is then consumed the way `imap::maildrop` does (FETCH items: UID,
//! RFC822.SIZE, FLAGS via `to_string`, BODY[] data; SELECT codes; CAPABILITY; tagged status
//! text and codes).
//!
//! Checks: no panic; a decoded BODY[] piece is never larger than `max_response_size`;
//! `next()` always comes back to `NeedMoreInput` (bounded number of steps per chunk); the event
//! sequence does not depend on how the input was chunked (one-shot vs chunked). Unbounded
//! allocation is caught by running with `-malloc_limit_mb` (see README).
#![no_main]

use std::num::NonZeroU32;

use imap_next::client::{Client, Event, Options};
use imap_next::imap_types::command::{Command, CommandBody};
use imap_next::imap_types::core::Tag;
use imap_next::imap_types::fetch::{MessageDataItem, MessageDataItemName};
use imap_next::imap_types::flag::{FlagFetch, FlagPerm};
use imap_next::imap_types::response::{Code, Data, Status};
use imap_next::{Interrupt, Io, State};
use libfuzzer_sys::fuzz_target;

const MAX_RESPONSE: u32 = 64 * 1024;
const GREETING: &[u8] = b"* OK ready\r\n";

fn command(kind: u8) -> CommandBody<'static> {
    match kind % 4 {
        0 => CommandBody::fetch(
            "1:*",
            vec![
                MessageDataItemName::Uid,
                MessageDataItemName::Rfc822Size,
                MessageDataItemName::Flags,
            ],
            true,
        )
        .unwrap(),
        1 => CommandBody::fetch(
            NonZeroU32::new(7).unwrap(),
            vec![
                MessageDataItemName::Uid,
                MessageDataItemName::BodyExt {
                    section: None,
                    partial: Some((0, NonZeroU32::new(32 * 1024).unwrap())),
                    peek: true,
                },
            ],
            true,
        )
        .unwrap(),
        2 => CommandBody::select("INBOX").unwrap(),
        _ => CommandBody::Capability,
    }
}

/// Consume an event like popbridge would; returns a summary used for the differential check.
fn consume(event: &Event, out: &mut Vec<String>) {
    match event {
        Event::DataReceived { data } => {
            match data {
                Data::Fetch { items, .. } => {
                    let (mut uid, mut size) = (None, None);
                    for item in items.as_ref() {
                        match item {
                            MessageDataItem::Uid(u) => uid = Some(u.get()),
                            MessageDataItem::Rfc822Size(s) => size = Some(u64::from(*s)),
                            MessageDataItem::Flags(flags) => {
                                for f in flags {
                                    if let FlagFetch::Flag(f) = f {
                                        let _ = f.to_string().to_ascii_lowercase();
                                    }
                                }
                            }
                            MessageDataItem::BodyExt {
                                section: None,
                                data,
                                ..
                            } => {
                                let bytes = data
                                    .clone()
                                    .into_option()
                                    .map(|c| c.into_owned())
                                    .unwrap_or_default();
                                assert!(
                                    bytes.len() <= MAX_RESPONSE as usize,
                                    "BODY[] piece of {} bytes passed max_response_size",
                                    bytes.len()
                                );
                            }
                            _ => {}
                        }
                    }
                    let _ = (uid, size);
                }
                Data::Capability(list) => {
                    for c in list.as_ref() {
                        let _ = c.to_string().to_ascii_uppercase();
                    }
                }
                _ => {}
            }
            out.push(format!("{data:?}"));
        }
        Event::StatusReceived { status } | Event::CommandRejected { status, .. } => {
            let (code, text) = match status {
                Status::Tagged(t) => (t.body.code.as_ref(), t.body.text.to_string()),
                Status::Untagged(b) => (b.code.as_ref(), b.text.to_string()),
                Status::Bye(b) => (b.code.as_ref(), b.text.to_string()),
            };
            match code {
                Some(Code::UidValidity(v)) => {
                    let _ = v.get();
                }
                Some(Code::PermanentFlags(flags)) => {
                    for f in flags {
                        if let FlagPerm::Flag(f) = f {
                            let _ = f.to_string();
                        }
                    }
                }
                Some(Code::Other(o)) => {
                    let _ = String::from_utf8_lossy(o.inner()).to_ascii_uppercase();
                }
                _ => {}
            }
            out.push(format!("{status:?} {text}"));
        }
        // Handles differ between two clients (per-client generator id): leave them out.
        Event::CommandSent { command, .. } => out.push(format!("sent {command:?}")),
        Event::GreetingReceived { greeting } => out.push(format!("{greeting:?}")),
        Event::ContinuationRequestReceived {
            continuation_request,
        } => out.push(format!("{continuation_request:?}")),
        _ => out.push("other event".to_owned()),
    }
}

/// Feed `body` in chunks of the given sizes; returns the event/error log.
fn run(kind: u8, relaxed: bool, body: &[u8], mut sizes: impl FnMut() -> usize) -> Vec<String> {
    let mut options = Options::default();
    options.max_response_size = MAX_RESPONSE;
    options.crlf_relaxed = relaxed;
    let mut client = Client::new(options);
    client.enqueue_command(Command {
        tag: Tag::try_from("P1").unwrap(),
        body: command(kind),
    });
    let mut log = Vec::new();
    let mut pos = 0;
    let mut first = true;
    loop {
        // Drive until the client needs more input.
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(
                steps < 100_000,
                "next() does not come back to NeedMoreInput"
            );
            match client.next() {
                Ok(event) => consume(&event, &mut log),
                Err(Interrupt::Io(Io::NeedMoreInput)) => break,
                Err(Interrupt::Io(Io::Output(bytes))) => log.push(format!("out {}", bytes.len())),
                Err(Interrupt::Error(e)) => log.push(format!("error {e:?}")),
            }
        }
        if first {
            client.enqueue_input(GREETING);
            first = false;
            continue;
        }
        if pos >= body.len() {
            return log;
        }
        let n = sizes().clamp(1, body.len() - pos);
        client.enqueue_input(&body[pos..pos + n]);
        pos += n;
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (flags, seed, body) = (data[0], data[1], &data[2..]);
    let kind = flags & 3;
    let relaxed = flags & 4 == 0;

    let whole = run(kind, relaxed, body, || usize::MAX);
    let mut x = u32::from(seed) | 1;
    let chunked = run(kind, relaxed, body, || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x % 64) as usize + 1
    });
    assert_eq!(whole, chunked, "decoding depends on chunking");
});
