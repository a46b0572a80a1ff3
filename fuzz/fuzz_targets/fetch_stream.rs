//! The streamed FETCH reader (`imap::conn::ImapConnection::body_start` / `body_start_at` /
//! `body_next` / `settle` / `take_ahead` / `prefetch`, with `imap::fetch_stream` underneath)
//! driven over an in-memory connection to a scripted server, with a model that knows what
//! every response carried.
//!
//! # How it runs
//!
//! The input decodes into (1) how the server's bytes are cut into reads, (2) a sequence of
//! client operations and (3) a list of response *plans*. The connection is a `Wire`: an
//! in-memory `AsyncRead + AsyncWrite` whose write side is a small IMAP server. When a complete
//! command line arrives (`P<n> UID FETCH <uid>,<others> (UID BODY.PEEK[])`, the ranged
//! `BODY.PEEK[]<origin.len>` form, or `P<n> NOOP`) the server checks it, takes the next plan
//! (or a default, well-formed answer once the plans run out), renders it for that command's
//! tag and UIDs, queues the bytes and records, for the model, what it sent: per FETCH line the
//! UID (before or after the body), the body (literal bytes, quoted string, NIL, none), its
//! origin, and whether the item list is one the reader must refuse; untagged noise; the
//! tagged completion; or the end of the stream (EOF, silence, BYE). Reads hand the queued
//! bytes out in the fuzz-chosen chunk sizes (cycled; at least 4 KiB once 64 KiB went by),
//! so every response is split at fuzz-chosen places. An empty queue (or a planned stall)
//! leaves the read pending: the runtime's clock is paused (tokio `test-util`), so the
//! connection's `io_timeout` fires at once instead of the run hanging.
//!
//! Response plans are either *structured* (FETCH lines built from UID / FLAGS / MODSEQ /
//! RFC822.SIZE / BODY[] / BODY[]<n> items in any order, with a literal, quoted, NIL or `""`
//! body, bodies from the input or long generated patterns (a read-ahead literal of exactly
//! 512 KiB and one byte more, a body over the 4 MiB drain limit); untagged EXISTS, EXPUNGE,
//! VANISHED, RECENT, FLAGS, `* OK [HIGHESTMODSEQ ..]`, `* NO` and free-text noise; the tagged
//! OK/NO/BAD with or without `[EXPUNGEISSUED]`; BYE, EOF, silence) or *raw* bytes (with
//! `{tag}` replaced by the command's tag), which the model cannot predict.
//!
//! # What it checks
//!
//! A model of the connection (what the doc comments of `imap::conn` promise) predicts every
//! operation's outcome from the recorded responses, and the target asserts it:
//!
//! - the command sent is exactly `UID FETCH <uid>[,<others>] (UID BODY.PEEK[])` (or the
//!   ranged form for `body_start_at`), or none when the call is refused before sending
//!   (UID 0, a UID twice, read-ahead before the server showed UID before BODY[], a prefetch
//!   while one is pending or the body is not delivered) — and such refusals leave the
//!   connection usable;
//! - `body_start` answers `Streaming` exactly when the response carried a body for the UID
//!   (literal, or quoted) at the asked origin, `NoBody` with the tagged completion's kind and
//!   text when it did not (NIL, `""`-less absence, `NO [EXPUNGEISSUED]`, EXPUNGE/VANISHED
//!   around it), and an error for what must be refused (a body for a UID not asked, a
//!   literal without UID before it in a FETCH of several UIDs, the wrong origin, two UIDs or
//!   two bodies in one FETCH, UID 0, BYE, EOF, silence);
//! - the bytes `body_next` hands out are exactly the literal (or the unescaped quoted
//!   string), in parts of 1..=max bytes, `last` exactly with the final part; an error only
//!   where the model says the rest of the response is bad;
//! - `take_ahead` gives exactly the read-ahead bodies the response carried for the other
//!   UIDs (first one per UID, literals up to 512 KiB with UID first, quoted strings; never
//!   NIL), in order, and nothing for a UID that was not asked;
//! - `settle`, a following `body_start` or a NOOP read the rest (or drain a prefetched
//!   response: only literals of its own UIDs, up to 4 MiB) and fail exactly when it is bad;
//! - after a completed response the connection is in step: a NOOP gets its own tagged OK
//!   (the server numbers them), and a prefetched FETCH is served without a new command;
//! - `streaming`, `unsettled`, `has_prefetch`, `prefetched`, `in_flight`, `uid_before_body`
//!   and `fetch_order_known` agree with the model after every operation;
//! - once an operation failed with anything but a refused call, the connection stays broken
//!   (every later `body_start`, `prefetch` and `execute` fails);
//! - whatever the bytes (raw plans), no panic, no hang, `body_next` parts never exceed
//!   `max`, read-ahead UIDs are always among those asked. Allocation is bounded by running
//!   with `-malloc_limit_mb`.
//!
//! An untagged response other than FETCH that carries a literal (`* OK [ALERT] {3}\r\nabc\r\n`)
//! broke the connection until edf3820 (see ../README.md, Findings, 2); the model expects it to
//! be passed over. `FETCH_STREAM_STRICT=0` makes that plan element unpredictable again (for
//! fuzzing a build from before the fix).
//!
//! # Input layout
//!
//! Little-endian; reading past the end gives zeros. `u8 flags` (bit 0: greeting is
//! Dovecot's long one; bit 1: greeting ends in LF), `u8 n` then `1 + n % 8` chunk sizes
//! (`u8`, 0 = 4096), then `u8 nops` (`% 33`) operations, then plans until the input ends (at
//! most 16). See `decode_*` below for each encoding; `fuzz/scripts/fetch_stream_seeds.py`
//! writes the same encoding.
#![no_main]

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::response::StatusKind;
use libfuzzer_sys::fuzz_target;
use popbridge::upstream::imap::{BodyStart, ConnLimits, ImapConnection, ImapError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

// The limits of `imap::conn` (private there): a read-ahead literal, a drained or abandoned
// body, the length asked for the rest of a message from an origin.
const AHEAD_LITERAL_MAX: u64 = 512 * 1024;
const DRAIN_MAX: u64 = 4 << 20;
const RANGE_TO_END: u32 = i32::MAX as u32;

/// Most `body_next` calls in one run (a 4 MiB body read a byte at a time would take long).
const MAX_BODY_CALLS: usize = 20_000;

/// `FETCH_STREAM_TRACE=1`: print every operation and the model's mode (for reading a run).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FETCH_STREAM_TRACE").is_some_and(|v| v == "1"))
}

fn strict_literals() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("FETCH_STREAM_STRICT").is_none_or(|v| v != "0"))
}

// ---------------------------------------------------------------------------------------------
// Input decoding

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Start { uid: u32, others: Vec<u32> },
    StartAt { uid: u32, origin: u32 },
    Next(usize),
    ReadAll(usize),
    Settle,
    TakeAhead,
    Prefetch { uid: u32, others: Vec<u32> },
    Noop,
}

fn uid_byte(b: u8) -> u32 {
    match b {
        255 => u32::MAX,
        b => u32::from(b),
    }
}

fn decode_uids(inp: &mut Input) -> Vec<u32> {
    let n = inp.u8() % 5;
    (0..n).map(|_| uid_byte(inp.u8())).collect()
}

/// `u8 code % 8`: 0 body_start (u8 uid, u8 n%5, n u8 others), 1 body_start_at (u8 uid,
/// u8 sel: %4 = 0 origin 0, 1 u8, 2 u16, 3 u32), 2 body_next (u16 max), 3 body_next until
/// last (u16 max), 4 settle, 5 take_ahead, 6 prefetch (as 0), 7 NOOP. UID byte 255 is
/// u32::MAX.
fn decode_op(inp: &mut Input) -> Op {
    match inp.u8() % 8 {
        0 => Op::Start {
            uid: uid_byte(inp.u8()),
            others: decode_uids(inp),
        },
        1 => {
            let uid = uid_byte(inp.u8());
            let origin = match inp.u8() % 4 {
                0 => 0,
                1 => u32::from(inp.u8()),
                2 => u32::from(inp.u16()),
                _ => inp.u32(),
            };
            Op::StartAt { uid, origin }
        }
        2 => Op::Next(usize::from(inp.u16())),
        3 => Op::ReadAll(usize::from(inp.u16())),
        4 => Op::Settle,
        5 => Op::TakeAhead,
        6 => Op::Prefetch {
            uid: uid_byte(inp.u8()),
            others: decode_uids(inp),
        },
        _ => Op::Noop,
    }
}

#[derive(Debug, Clone)]
enum Plan {
    Raw(Vec<u8>),
    Structured {
        lf: bool,
        lower: bool,
        elems: Vec<Elem>,
    },
}

#[derive(Debug, Clone)]
enum Elem {
    Noise { tpl: u8, n: u32, text: Vec<u8> },
    Fetch { seq: u16, items: Vec<Item> },
    Tagged { kind: u8, code: u8, text: Vec<u8> },
    Bye(Vec<u8>),
    Cut,
    Stall,
    Raw(Vec<u8>),
    OtherLiteral { tpl: u8, data: Vec<u8> },
}

#[derive(Debug, Clone)]
enum Item {
    Uid(UidSel),
    Size(u32),
    Flags(u8),
    Modseq(u32),
    Body { origin: OriginSel, value: Value },
}

#[derive(Debug, Clone, Copy)]
enum UidSel {
    Cur,
    Other(u8),
    Foreign(u8),
    Zero,
    Max,
}

#[derive(Debug, Clone, Copy)]
enum OriginSel {
    /// `BODY[]` for a whole body, `BODY[]<origin>` for a range: what servers send.
    Natural,
    /// `BODY[]<origin>` always (`BODY[]<0>` for a whole body).
    Angle,
    /// `BODY[]` always.
    Bare,
    Explicit(u32),
}

#[derive(Debug, Clone)]
enum Value {
    Literal(Vec<u8>),
    Quoted(Vec<u8>),
    Nil,
    Empty,
    Pattern { len: u32, seed: u8 },
}

/// `u8 kind`: `% 4 == 3` raw (`u16 len`, bytes), else structured: `u8 flags` (bit 0 LF line
/// ends, bit 1 lower case), `u8 n % 17` elements.
fn decode_plan(inp: &mut Input) -> Plan {
    if inp.u8() % 4 == 3 {
        let n = usize::from(inp.u16());
        return Plan::Raw(inp.bytes(n));
    }
    let flags = inp.u8();
    let n = inp.u8() % 17;
    let elems = (0..n).map(|_| decode_elem(inp)).collect();
    Plan::Structured {
        lf: flags & 1 != 0,
        lower: flags & 2 != 0,
        elems,
    }
}

/// `u8 code % 10`: 0 noise (u8 template, u32 n, u8 len, text), 1 FETCH (u16 seq, u8 n % 9
/// items), 2 tagged (u8 kind: %3 OK/NO/BAD, /3 %4 none/EXPUNGEISSUED/SERVERBUG/UNAVAILABLE;
/// u8 len, text), 3 BYE (u8 len, text), 4 EOF, 5 silence, 6 raw (u16 len, bytes), 7 an
/// untagged response with a literal (u8 template, u16 len, bytes), 8 `* n FETCH (UID u
/// BODY[] {len}` (u8 uid selector, u16 len, bytes), 9 a flag update `* n FETCH (UID u FLAGS
/// (..))` (u8 uid selector, u8 flags).
fn decode_elem(inp: &mut Input) -> Elem {
    match inp.u8() % 10 {
        0 => {
            let tpl = inp.u8();
            let n = inp.u32();
            let len = usize::from(inp.u8());
            Elem::Noise {
                tpl,
                n,
                text: inp.bytes(len),
            }
        }
        1 => {
            let seq = inp.u16();
            let n = inp.u8() % 9;
            let items = (0..n).map(|_| decode_item(inp)).collect();
            Elem::Fetch { seq, items }
        }
        2 => {
            let k = inp.u8();
            let len = usize::from(inp.u8());
            Elem::Tagged {
                kind: k % 3,
                code: (k / 3) % 4,
                text: inp.bytes(len),
            }
        }
        3 => {
            let len = usize::from(inp.u8());
            Elem::Bye(inp.bytes(len))
        }
        4 => Elem::Cut,
        5 => Elem::Stall,
        6 => {
            let len = usize::from(inp.u16());
            Elem::Raw(inp.bytes(len))
        }
        7 => {
            let tpl = inp.u8();
            let len = usize::from(inp.u16());
            Elem::OtherLiteral {
                tpl,
                data: inp.bytes(len),
            }
        }
        8 => {
            let uid = decode_uid_sel(inp);
            let len = usize::from(inp.u16());
            Elem::Fetch {
                seq: 1,
                items: vec![
                    Item::Uid(uid),
                    Item::Body {
                        origin: OriginSel::Natural,
                        value: Value::Literal(inp.bytes(len)),
                    },
                ],
            }
        }
        _ => {
            let uid = decode_uid_sel(inp);
            let flags = inp.u8();
            Elem::Fetch {
                seq: 2,
                items: vec![Item::Uid(uid), Item::Flags(flags)],
            }
        }
    }
}

/// `u8 % 8`: 0 the UID streamed, 1-4 the n-th other UID of the command, 5 a foreign UID
/// (900 + next u8), 6 zero, 7 u32::MAX.
fn decode_uid_sel(inp: &mut Input) -> UidSel {
    match inp.u8() % 8 {
        0 => UidSel::Cur,
        k @ 1..=4 => UidSel::Other(k - 1),
        5 => UidSel::Foreign(inp.u8()),
        6 => UidSel::Zero,
        _ => UidSel::Max,
    }
}

/// `u8 code % 5`: 0 UID (selector), 1 RFC822.SIZE (u32), 2 FLAGS (u8 list), 3 MODSEQ (u32),
/// 4 BODY: `u8 origin % 4` (natural, `<origin>`, bare, explicit u32), `u8 value % 6`:
/// 0 literal (u16 len, bytes), 1 quoted (u8 len, bytes; LF dropped), 2 NIL, 3 `""`,
/// 4 a long generated literal (u8 size % 4: 512 KiB, 512 KiB + 1, 70,000, 4 MiB + 1; u8 seed),
/// 5 a generated literal of u16 length (u8 seed).
fn decode_item(inp: &mut Input) -> Item {
    match inp.u8() % 5 {
        0 => Item::Uid(decode_uid_sel(inp)),
        1 => Item::Size(inp.u32()),
        2 => Item::Flags(inp.u8()),
        3 => Item::Modseq(inp.u32()),
        _ => {
            let origin = match inp.u8() % 4 {
                0 => OriginSel::Natural,
                1 => OriginSel::Angle,
                2 => OriginSel::Bare,
                _ => OriginSel::Explicit(inp.u32()),
            };
            let value = match inp.u8() % 6 {
                0 => {
                    let len = usize::from(inp.u16());
                    Value::Literal(inp.bytes(len))
                }
                1 => {
                    let len = usize::from(inp.u8());
                    Value::Quoted(inp.bytes(len))
                }
                2 => Value::Nil,
                3 => Value::Empty,
                4 => {
                    let len = match inp.u8() % 4 {
                        0 => AHEAD_LITERAL_MAX as u32,
                        1 => AHEAD_LITERAL_MAX as u32 + 1,
                        2 => 70_000,
                        _ => DRAIN_MAX as u32 + 1,
                    };
                    Value::Pattern {
                        len,
                        seed: inp.u8(),
                    }
                }
                _ => {
                    let len = u32::from(inp.u16());
                    Value::Pattern {
                        len,
                        seed: inp.u8(),
                    }
                }
            };
            Item::Body { origin, value }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies: bytes from the input, or a long generated pattern (never held in memory whole).

const PATTERN: &[u8] = b"ab\r\n.x{1}\r\n)* 1 FETCH (UID 1 BODY[] {2}\r\nP1 OK\r\n";

#[derive(Debug, Clone, PartialEq)]
enum Spec {
    Bytes(Vec<u8>),
    Pattern { len: u32, seed: u8 },
}

impl Spec {
    fn len(&self) -> u64 {
        match self {
            Spec::Bytes(b) => b.len() as u64,
            Spec::Pattern { len, .. } => u64::from(*len),
        }
    }
    fn byte_at(&self, i: u64) -> u8 {
        match self {
            Spec::Bytes(b) => b[i as usize],
            Spec::Pattern { seed, .. } => {
                PATTERN[((i + u64::from(*seed)) % PATTERN.len() as u64) as usize]
            }
        }
    }
    /// Whether `part` is this body's bytes from `at` on.
    fn matches(&self, at: u64, part: &[u8]) -> bool {
        if at + part.len() as u64 > self.len() {
            return false;
        }
        match self {
            Spec::Bytes(b) => &b[at as usize..at as usize + part.len()] == part,
            Spec::Pattern { .. } => part
                .iter()
                .enumerate()
                .all(|(i, &c)| self.byte_at(at + i as u64) == c),
        }
    }
    fn equals(&self, data: &[u8]) -> bool {
        self.len() == data.len() as u64 && self.matches(0, data)
    }
}

// ---------------------------------------------------------------------------------------------
// What the server sent, as the model sees it.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Ok,
    No,
    Bad,
}

#[derive(Debug, Clone)]
enum BodyVal {
    Nil,
    Quoted(Spec),
    Literal(Spec),
}

#[derive(Debug, Clone, Default)]
struct FetchLine {
    /// The item list up to the body literal (or the whole line) must be refused.
    head_err: bool,
    /// The items after the body literal must be refused.
    tail_err: bool,
    /// The UID given before the body item.
    uid_first: Option<u32>,
    /// The UID of the response, wherever it stands (when no error).
    uid: Option<u32>,
    /// The (first) body item: origin and value.
    body: Option<(u32, BodyVal)>,
}

#[derive(Debug, Clone)]
enum El {
    /// Untagged responses the reader passes over.
    Noise,
    Fetch(FetchLine),
    Done(Kind, String),
    /// BYE, EOF or silence: reading on fails.
    Fatal,
    /// Raw bytes: what follows cannot be predicted.
    Unknown,
}

#[derive(Debug, Clone, PartialEq)]
enum CmdKind {
    Fetch {
        uids: Vec<u32>,
        origin: u32,
        /// The length of a ranged FETCH.
        len: Option<u32>,
    },
    Noop,
    Other,
}

#[derive(Debug)]
struct Record {
    line: String,
    kind: CmdKind,
    resp: Vec<El>,
}

// ---------------------------------------------------------------------------------------------
// The server side of the wire.

enum Seg {
    Data(Vec<u8>, usize),
    Pattern(Spec, u64),
    Eof,
    Stall,
}

struct Server {
    plans: VecDeque<Plan>,
    out: VecDeque<Seg>,
    cmd: Vec<u8>,
    records: Vec<Record>,
    dead: bool,
    noops: u32,
    chunks: Vec<usize>,
    chunk_i: usize,
    sent: u64,
}

fn flag_list(i: u8) -> &'static str {
    // The last three as Dovecot and Cyrus send them for a message another session changed.
    const LISTS: [&str; 10] = [
        "\\Seen",
        "\\Seen \\Deleted",
        "",
        "$Forwarded $MDNSent \\Answered",
        "\\Recent \\Flagged",
        "$POP3Deleted \\Seen",
        "\\Draft NonJunk",
        "\\Seen \\Recent",
        "\\Recent \\Seen",
        "\\Recent \\Deleted",
    ];
    LISTS[usize::from(i) % LISTS.len()]
}

/// Text for an untagged or tagged line: no line end in it, and no `{n}` at its end (that
/// would announce a literal).
fn line_text(text: &[u8]) -> Vec<u8> {
    let mut t: Vec<u8> = text
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    if t.last() == Some(&b'}') {
        t.push(b'.');
    }
    t
}

/// Text imap-next certainly accepts in `* OK text` (read after a completion, by a NOOP).
fn safe_text(text: &[u8]) -> String {
    let t: String = text
        .iter()
        .map(|&b| b as char)
        .filter(|c| c.is_ascii_alphanumeric() || *c == ' ')
        .collect();
    let t = t.trim().to_string();
    if t.is_empty() {
        "still here".into()
    } else {
        t
    }
}

fn escape_quoted(raw: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let value: Vec<u8> = raw.iter().copied().filter(|&b| b != b'\n').collect();
    let mut out = vec![b'"'];
    for &b in &value {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    (out, value)
}

fn default_body(uid: u32) -> Vec<u8> {
    format!("From: a@example.org\r\nSubject: message {uid}\r\n\r\nbody of {uid}\r\n.\r\n")
        .into_bytes()
}

fn parse_command(line: &str) -> (String, CmdKind) {
    let line = line.trim_end_matches('\n').trim_end_matches('\r');
    let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
    if rest == "NOOP" {
        return (tag.into(), CmdKind::Noop);
    }
    let parsed = (|| {
        let rest = rest.strip_prefix("UID FETCH ")?;
        let (set, items) = rest.split_once(' ')?;
        let uids: Vec<u32> = set
            .split(',')
            .map(|u| u.parse().ok())
            .collect::<Option<_>>()?;
        if items == "(UID BODY.PEEK[])" {
            return Some(CmdKind::Fetch {
                uids,
                origin: 0,
                len: None,
            });
        }
        let range = items
            .strip_prefix("(UID BODY.PEEK[]<")?
            .strip_suffix(">)")?;
        let (o, l) = range.split_once('.')?;
        Some(CmdKind::Fetch {
            uids,
            origin: o.parse().ok()?,
            len: Some(l.parse().ok()?),
        })
    })();
    (tag.into(), parsed.unwrap_or(CmdKind::Other))
}

/// Builds the bytes of one response and the model's view of it.
struct Render<'a> {
    out: &'a mut VecDeque<Seg>,
    cur: Vec<u8>,
    eol: &'static [u8],
}

impl Render<'_> {
    fn text(&mut self, b: &[u8]) {
        self.cur.extend_from_slice(b);
    }
    fn eol(&mut self) {
        let eol = self.eol;
        self.cur.extend_from_slice(eol);
    }
    fn body(&mut self, spec: &Spec) {
        match spec {
            Spec::Bytes(b) => self.cur.extend_from_slice(b),
            Spec::Pattern { .. } => {
                self.flush();
                self.out.push_back(Seg::Pattern(spec.clone(), 0));
            }
        }
    }
    fn flush(&mut self) {
        if !self.cur.is_empty() {
            self.out
                .push_back(Seg::Data(std::mem::take(&mut self.cur), 0));
        }
    }
}

impl Server {
    fn on_command(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line).into_owned();
        let (tag, kind) = parse_command(&line);
        let mut rec = Record {
            line,
            kind: kind.clone(),
            resp: Vec::new(),
        };
        if self.dead {
            rec.resp.push(El::Fatal);
            self.records.push(rec);
            return;
        }
        let queued = self.out.len();
        let mut r = Render {
            out: &mut self.out,
            cur: Vec::new(),
            eol: b"\r\n",
        };
        match kind {
            CmdKind::Noop => {
                self.noops += 1;
                let text = format!("noop {}", self.noops);
                r.text(format!("* {} EXISTS\r\n{tag} OK {text}\r\n", self.noops).as_bytes());
                rec.resp.push(El::Noise);
                rec.resp.push(El::Done(Kind::Ok, text));
            }
            CmdKind::Other => {
                r.text(format!("{tag} BAD unexpected command\r\n").as_bytes());
                rec.resp
                    .push(El::Done(Kind::Bad, "unexpected command".into()));
            }
            CmdKind::Fetch {
                ref uids, origin, ..
            } => {
                let plan = self.plans.pop_front().unwrap_or_else(|| default_plan(uids));
                let dead = render_plan(&plan, &tag, uids, origin, &mut r, &mut rec.resp);
                self.dead |= dead;
            }
        }
        r.flush();
        if trace() {
            let mut bytes = Vec::new();
            for seg in self.out.range(queued..) {
                match seg {
                    Seg::Data(v, _) => bytes.extend_from_slice(v),
                    Seg::Pattern(spec, _) => bytes.extend(format!("<pattern {spec:?}>").bytes()),
                    Seg::Eof => bytes.extend_from_slice(b"<EOF>"),
                    Seg::Stall => bytes.extend_from_slice(b"<stall>"),
                }
            }
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("response to {:?}: {hex}", rec.line.trim_end());
        }
        self.records.push(rec);
    }
}

/// A well-formed answer: every UID's body as a literal, UID first, then OK.
fn default_plan(uids: &[u32]) -> Plan {
    let mut elems: Vec<Elem> = uids
        .iter()
        .enumerate()
        .map(|(i, &u)| Elem::Fetch {
            seq: i as u16 + 1,
            items: vec![
                Item::Uid(if i == 0 {
                    UidSel::Cur
                } else {
                    UidSel::Other(i as u8 - 1)
                }),
                Item::Size(default_body(u).len() as u32),
                Item::Body {
                    origin: OriginSel::Natural,
                    value: Value::Literal(default_body(u)),
                },
            ],
        })
        .collect();
    elems.push(Elem::Tagged {
        kind: 0,
        code: 0,
        text: b"Fetch completed.".to_vec(),
    });
    Plan::Structured {
        lf: false,
        lower: false,
        elems,
    }
}

fn kw(lower: bool, s: &str) -> String {
    if lower {
        s.to_ascii_lowercase()
    } else {
        s.to_string()
    }
}

/// Renders `plan` for the command `tag` / `uids` / `origin`; the model's elements go to
/// `resp`. Returns whether the server is dead afterwards (EOF, silence, BYE).
fn render_plan(
    plan: &Plan,
    tag: &str,
    uids: &[u32],
    origin: u32,
    r: &mut Render,
    resp: &mut Vec<El>,
) -> bool {
    let (lf, lower, elems) = match plan {
        Plan::Raw(bytes) => {
            r.text(&replace_tag(bytes, tag));
            resp.push(El::Unknown);
            return false;
        }
        Plan::Structured { lf, lower, elems } => (*lf, *lower, elems),
    };
    r.eol = if lf { b"\n" } else { b"\r\n" };
    let mut done = false;
    for e in elems {
        if done {
            // After the completion only what any reader passes over (the next command's
            // reader, imap-next for a NOOP, sees it), or the end of the connection.
            match e {
                Elem::Noise { tpl, n, text } => {
                    let line = match tpl % 4 {
                        0 => format!("* {n} EXISTS"),
                        1 => format!("* {} EXPUNGE", (*n).max(1)),
                        2 => format!("* {n} RECENT"),
                        _ => format!("* OK {}", safe_text(text)),
                    };
                    r.text(line.as_bytes());
                    r.eol();
                }
                Elem::Cut => {
                    r.flush();
                    r.out.push_back(Seg::Eof);
                    return true;
                }
                Elem::Stall => {
                    r.flush();
                    r.out.push_back(Seg::Stall);
                    return true;
                }
                Elem::Bye(text) => {
                    r.text(b"* BYE ");
                    r.text(&line_text(text));
                    r.eol();
                    return true;
                }
                _ => {}
            }
            continue;
        }
        match e {
            Elem::Noise { tpl, n, text } => {
                let t = line_text(text);
                let t = String::from_utf8_lossy(&t);
                let line = match tpl % 13 {
                    0 => format!("* {n} EXISTS"),
                    1 => format!("* {} EXPUNGE", (*n).max(1)),
                    2 => format!("* {n} RECENT"),
                    3 => format!("* OK {}", safe_text(text)),
                    4 => format!("* VANISHED {}", (*n).max(1)),
                    5 => format!(
                        "* VANISHED (EARLIER) {}:{}",
                        (*n).max(1),
                        n.saturating_add(3)
                    ),
                    6 => format!("* OK [HIGHESTMODSEQ {n}] {t}"),
                    7 => "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded)"
                        .to_string(),
                    8 => format!("* NO [ALERT] {t}"),
                    9 => format!("* OK [EXPUNGEISSUED] {t}"),
                    10 => "* CAPABILITY IMAP4rev1 IDLE QRESYNC".to_string(),
                    11 => format!("* BAD {t}"),
                    _ => {
                        // Free text, kept from reading as BYE or FETCH.
                        let mut t = line_text(text);
                        let first: Vec<u8> =
                            t.iter().take_while(|&&b| b != b' ').copied().collect();
                        if first.eq_ignore_ascii_case(b"BYE")
                            || (!first.is_empty() && first.iter().all(u8::is_ascii_digit))
                        {
                            t.insert(0, b'x');
                        }
                        let mut line = b"* ".to_vec();
                        line.extend_from_slice(&t);
                        r.text(&line);
                        r.eol();
                        resp.push(El::Noise);
                        continue;
                    }
                };
                r.text(line.as_bytes());
                r.eol();
                resp.push(El::Noise);
            }
            Elem::Fetch { seq, items } => {
                let line = render_fetch(*seq, items, lower, uids, origin, r);
                resp.push(El::Fetch(line));
            }
            Elem::Tagged { kind, code, text } => {
                let (k, word) = match kind {
                    0 => (Kind::Ok, "OK"),
                    1 => (Kind::No, "NO"),
                    _ => (Kind::Bad, "BAD"),
                };
                let code =
                    ["", "[EXPUNGEISSUED]", "[SERVERBUG]", "[UNAVAILABLE]"][usize::from(*code)];
                let text = line_text(text);
                let mut rest = code.as_bytes().to_vec();
                if !rest.is_empty() && !text.is_empty() {
                    rest.push(b' ');
                }
                rest.extend_from_slice(&text);
                r.text(format!("{tag} {}", kw(lower, word)).as_bytes());
                if !rest.is_empty() {
                    r.text(b" ");
                    r.text(&rest);
                }
                r.eol();
                resp.push(El::Done(k, String::from_utf8_lossy(&rest).into_owned()));
                done = true;
            }
            Elem::Bye(text) => {
                r.text(b"* BYE ");
                r.text(&line_text(text));
                r.eol();
                resp.push(El::Fatal);
                return true;
            }
            Elem::Cut => {
                r.flush();
                r.out.push_back(Seg::Eof);
                resp.push(El::Fatal);
                return true;
            }
            Elem::Stall => {
                r.flush();
                r.out.push_back(Seg::Stall);
                resp.push(El::Fatal);
                return true;
            }
            Elem::Raw(bytes) => {
                r.text(&replace_tag(bytes, tag));
                resp.push(El::Unknown);
            }
            Elem::OtherLiteral { tpl, data } => {
                // A literal inside an untagged response, the line going on after it.
                let (prefix, suffix) = match tpl % 4 {
                    0 => ("* OK [ALERT] note", ""),
                    1 => ("* STATUS", " (MESSAGES 3)"),
                    2 => ("* METADATA INBOX (/private/comment", ")"),
                    _ => ("* LIST () \"/\"", ""),
                };
                r.text(format!("{prefix} {{{}}}", data.len()).as_bytes());
                r.eol();
                r.text(data);
                r.text(suffix.as_bytes());
                r.eol();
                resp.push(if strict_literals() {
                    El::Noise
                } else {
                    El::Unknown
                });
            }
        }
    }
    if !done {
        r.text(format!("{tag} {} Fetch completed.", kw(lower, "OK")).as_bytes());
        r.eol();
        resp.push(El::Done(Kind::Ok, "Fetch completed.".into()));
    }
    false
}

fn replace_tag(bytes: &[u8], tag: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(i) = rest.windows(5).position(|w| w == b"{tag}") {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(tag.as_bytes());
        rest = &rest[i + 5..];
    }
    out.extend_from_slice(rest);
    out
}

fn render_fetch(
    seq: u16,
    items: &[Item],
    lower: bool,
    uids: &[u32],
    origin: u32,
    r: &mut Render,
) -> FetchLine {
    let mut f = FetchLine::default();
    let mut uid: Option<u32> = None;
    let mut in_tail = false;
    let mut body_seen = false;
    r.text(format!("* {seq} {} (", kw(lower, "FETCH")).as_bytes());
    let mut space = false;
    for item in items {
        if space {
            r.text(b" ");
        }
        space = true;
        let bad = match item {
            Item::Uid(sel) => {
                let u = match *sel {
                    UidSel::Cur => uids[0],
                    UidSel::Other(i) => uids
                        .get(1 + usize::from(i))
                        .copied()
                        .unwrap_or(700 + u32::from(i)),
                    UidSel::Foreign(b) => 900 + u32::from(b),
                    UidSel::Zero => 0,
                    UidSel::Max => u32::MAX,
                };
                r.text(format!("{} {u}", kw(lower, "UID")).as_bytes());
                let bad = u == 0 || uid.is_some_and(|v| v != u);
                if !bad {
                    uid = Some(u);
                    if !body_seen {
                        f.uid_first = Some(u);
                    }
                }
                bad
            }
            Item::Size(n) => {
                r.text(format!("{} {n}", kw(lower, "RFC822.SIZE")).as_bytes());
                false
            }
            Item::Flags(i) => {
                r.text(format!("{} ({})", kw(lower, "FLAGS"), flag_list(*i)).as_bytes());
                false
            }
            Item::Modseq(n) => {
                r.text(format!("{} ({n})", kw(lower, "MODSEQ")).as_bytes());
                false
            }
            Item::Body { origin: o, value } => {
                let (name, at) = match *o {
                    OriginSel::Natural if origin == 0 => ("BODY[]".to_string(), 0),
                    OriginSel::Natural | OriginSel::Angle => (format!("BODY[]<{origin}>"), origin),
                    OriginSel::Bare => ("BODY[]".to_string(), 0),
                    OriginSel::Explicit(x) => (format!("BODY[]<{x}>"), x),
                };
                r.text(kw(lower, &name).as_bytes());
                let bad = body_seen;
                body_seen = true;
                let val = match value {
                    Value::Nil => {
                        r.text(kw(lower, " NIL").as_bytes());
                        BodyVal::Nil
                    }
                    Value::Empty => {
                        r.text(b" \"\"");
                        BodyVal::Quoted(Spec::Bytes(Vec::new()))
                    }
                    Value::Quoted(raw) => {
                        let (wire, v) = escape_quoted(raw);
                        r.text(b" ");
                        r.text(&wire);
                        BodyVal::Quoted(Spec::Bytes(v))
                    }
                    Value::Literal(_) | Value::Pattern { .. } => {
                        let spec = match value {
                            Value::Literal(b) => Spec::Bytes(b.clone()),
                            Value::Pattern { len, seed } => Spec::Pattern {
                                len: *len,
                                seed: *seed,
                            },
                            _ => unreachable!(),
                        };
                        r.text(format!(" {{{}}}", spec.len()).as_bytes());
                        r.eol();
                        r.body(&spec);
                        if in_tail {
                            // A second body, after the first literal.
                            f.tail_err = true;
                        } else if bad || f.head_err {
                            f.head_err = true;
                        } else {
                            f.body = Some((at, BodyVal::Literal(spec)));
                        }
                        // The literal ends the line's head; what follows continues the line.
                        in_tail = true;
                        continue;
                    }
                };
                if !bad && f.body.is_none() {
                    f.body = Some((at, val));
                }
                bad
            }
        };
        if bad {
            if in_tail {
                f.tail_err = true;
            } else {
                f.head_err = true;
            }
        }
    }
    r.text(b")");
    r.eol();
    f.uid = if f.head_err || f.tail_err { None } else { uid };
    f
}

// ---------------------------------------------------------------------------------------------
// The wire: the client's side of the connection.

struct Wire(Arc<Mutex<Server>>);

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut s = self.0.lock().unwrap();
        let s = &mut *s;
        let mut chunk = s.chunks[s.chunk_i % s.chunks.len()];
        if s.sent > 64 * 1024 {
            chunk = chunk.max(4096);
        }
        loop {
            let want = chunk.min(buf.remaining());
            match s.out.front_mut() {
                // Nothing to send (yet): the client waits, until its deadline. The clock is
                // paused, so that comes at once; no waker is needed.
                None | Some(Seg::Stall) => return Poll::Pending,
                Some(Seg::Eof) => return Poll::Ready(Ok(())),
                Some(Seg::Data(v, pos)) => {
                    if *pos == v.len() {
                        s.out.pop_front();
                        continue;
                    }
                    let n = want.min(v.len() - *pos);
                    buf.put_slice(&v[*pos..*pos + n]);
                    *pos += n;
                    s.sent += n as u64;
                }
                Some(Seg::Pattern(spec, pos)) => {
                    if *pos == spec.len() {
                        s.out.pop_front();
                        continue;
                    }
                    let n = (want as u64).min(spec.len() - *pos);
                    let bytes: Vec<u8> = (0..n).map(|i| spec.byte_at(*pos + i)).collect();
                    buf.put_slice(&bytes);
                    *pos += n;
                    s.sent += n;
                }
            }
            s.chunk_i += 1;
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut s = self.0.lock().unwrap();
        s.cmd.extend_from_slice(buf);
        while let Some(i) = s.cmd.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = s.cmd.drain(..=i).collect();
            s.on_command(&line);
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------------------------------------
// The model of the client.

/// A predicted outcome.
#[derive(Debug, Clone, PartialEq)]
enum Exp<T> {
    Ok(T),
    /// Refused before anything was sent or read (`ImapError::Command`); the connection stays.
    Refused,
    /// Fails; the connection is broken from then on.
    Err,
    /// Not predictable (raw bytes were read).
    Unknown,
}

#[derive(Debug, Clone)]
struct Stream {
    cmd: usize,
    idx: usize,
    uid: u32,
    origin: u32,
    others: Vec<u32>,
    body: Spec,
    pos: u64,
    /// The UID was known when the body started (UID before the literal, or anywhere on
    /// a quoted body's line): the rest is read later, by settle or the next command.
    known_uid: bool,
    literal: bool,
    /// `body_next` said last (the body is delivered, its response not read to the end).
    delivered: bool,
}

#[derive(Debug, Clone)]
struct Pre {
    cmd: usize,
    uid: u32,
    others: Vec<u32>,
}

#[derive(Debug)]
enum StartOutcome {
    NoBody(Kind, String),
    Stream {
        idx: usize,
        body: Spec,
        known_uid: bool,
        literal: bool,
    },
}

#[derive(Default)]
struct Model {
    broken: bool,
    lost: bool,
    uid_first: Option<bool>,
    stream: Option<Stream>,
    prefetch: Option<Pre>,
    ahead: Vec<(u32, Spec)>,
    /// The others of the FETCH the read-ahead buffer belongs to.
    ahead_others: Vec<u32>,
    records_seen: usize,
    body_calls: usize,
}

fn push_ahead(ahead: &mut Vec<(u32, Spec)>, uid: u32, spec: &Spec) {
    if ahead.iter().all(|(a, _)| *a != uid) {
        ahead.push((uid, spec.clone()));
    }
}

/// Reading a streamed FETCH up to the body of `cur` at `origin` (or its completion).
fn model_start(
    resp: &[El],
    cur: u32,
    origin: u32,
    others: &[u32],
    ahead: &mut Vec<(u32, Spec)>,
) -> Exp<StartOutcome> {
    for (i, el) in resp.iter().enumerate() {
        match el {
            El::Noise => {}
            El::Unknown => return Exp::Unknown,
            El::Fatal => return Exp::Err,
            El::Done(k, text) => return Exp::Ok(StartOutcome::NoBody(*k, text.clone())),
            El::Fetch(f) => {
                if f.head_err {
                    return Exp::Err;
                }
                match &f.body {
                    None | Some((_, BodyVal::Nil)) => {}
                    Some((o, BodyVal::Quoted(q))) => {
                        let whose = f.uid.or(if others.is_empty() { Some(cur) } else { None });
                        if whose == Some(cur) && *o == origin {
                            return Exp::Ok(StartOutcome::Stream {
                                idx: i,
                                body: q.clone(),
                                known_uid: f.uid.is_some(),
                                literal: false,
                            });
                        }
                        match whose {
                            Some(u) if others.contains(&u) && *o == 0 => push_ahead(ahead, u, q),
                            _ => return Exp::Err,
                        }
                    }
                    Some((o, BodyVal::Literal(b))) => match f.uid_first {
                        Some(u) if u == cur && *o == origin => {
                            return Exp::Ok(StartOutcome::Stream {
                                idx: i,
                                body: b.clone(),
                                known_uid: true,
                                literal: true,
                            })
                        }
                        None if others.is_empty() && *o == origin => {
                            return Exp::Ok(StartOutcome::Stream {
                                idx: i,
                                body: b.clone(),
                                known_uid: false,
                                literal: true,
                            })
                        }
                        Some(u)
                            if others.contains(&u)
                                && b.len() <= AHEAD_LITERAL_MAX
                                && *o == 0
                                && !f.tail_err =>
                        {
                            push_ahead(ahead, u, b)
                        }
                        _ => return Exp::Err,
                    },
                }
            }
        }
    }
    Exp::Err
}

/// Reading the rest of a streamed FETCH after its body.
fn model_tail(resp: &[El], s: &Stream, ahead: &mut Vec<(u32, Spec)>) -> Exp<()> {
    let El::Fetch(f) = &resp[s.idx] else {
        unreachable!()
    };
    if (s.literal && f.tail_err) || f.uid != Some(s.uid) {
        return Exp::Err;
    }
    for el in &resp[s.idx + 1..] {
        match el {
            El::Noise => {}
            El::Unknown => return Exp::Unknown,
            El::Fatal => return Exp::Err,
            El::Done(..) => return Exp::Ok(()),
            El::Fetch(f) => {
                if f.head_err {
                    return Exp::Err;
                }
                match &f.body {
                    None | Some((_, BodyVal::Nil)) => {}
                    Some((o, BodyVal::Quoted(q))) => match f.uid {
                        Some(u) if s.others.contains(&u) && *o == 0 => push_ahead(ahead, u, q),
                        _ => return Exp::Err,
                    },
                    Some((o, BodyVal::Literal(b))) => match f.uid_first {
                        Some(u)
                            if s.others.contains(&u)
                                && b.len() <= AHEAD_LITERAL_MAX
                                && *o == 0
                                && !f.tail_err =>
                        {
                            push_ahead(ahead, u, b)
                        }
                        _ => return Exp::Err,
                    },
                }
            }
        }
    }
    Exp::Err
}

/// Draining a prefetched response nobody asked for.
fn model_drain(resp: &[El], p: &Pre) -> Exp<()> {
    for el in resp {
        match el {
            El::Noise => {}
            El::Unknown => return Exp::Unknown,
            El::Fatal => return Exp::Err,
            El::Done(..) => return Exp::Ok(()),
            El::Fetch(f) => {
                if f.head_err {
                    return Exp::Err;
                }
                if let Some((_, BodyVal::Literal(b))) = &f.body {
                    match f.uid_first {
                        Some(u)
                            if (u == p.uid || p.others.contains(&u))
                                && b.len() <= DRAIN_MAX
                                && !f.tail_err => {}
                        _ => return Exp::Err,
                    }
                }
            }
        }
    }
    Exp::Err
}

/// Chains a stage: later stages run only when the earlier ones went well.
fn and<T>(a: Exp<()>, b: impl FnOnce() -> Exp<T>) -> Exp<T> {
    match a {
        Exp::Ok(()) => b(),
        Exp::Refused => Exp::Refused,
        Exp::Err => Exp::Err,
        Exp::Unknown => Exp::Unknown,
    }
}

fn kind_of(k: StatusKind) -> Kind {
    match k {
        StatusKind::Ok => Kind::Ok,
        StatusKind::No => Kind::No,
        StatusKind::Bad => Kind::Bad,
    }
}

fn is_refusal(e: &ImapError) -> bool {
    matches!(e, ImapError::Command(_))
}

struct Harness {
    conn: ImapConnection,
    srv: Arc<Mutex<Server>>,
    m: Model,
}

impl Harness {
    /// Records of the commands sent since the last look.
    fn new_records(&mut self) -> Vec<usize> {
        let n = self.srv.lock().unwrap().records.len();
        let r = (self.m.records_seen..n).collect();
        self.m.records_seen = n;
        r
    }

    fn resp(&self, i: usize) -> Vec<El> {
        self.srv.lock().unwrap().records[i].resp.clone()
    }

    /// Checks the one command the operation was to send.
    fn expect_sent(&mut self, sent: &[usize], want: &CmdKind) -> usize {
        assert_eq!(
            sent.len(),
            1,
            "one command expected ({want:?}), got {}",
            sent.len()
        );
        let s = self.srv.lock().unwrap();
        let rec = &s.records[sent[0]];
        assert_eq!(&rec.kind, want, "the command sent: {:?}", rec.line);
        sent[0]
    }

    /// The effect of ending the current body stream (settle, the next body, any command).
    fn model_abandon(&mut self) -> Exp<()> {
        let Some(s) = self.m.stream.take() else {
            return Exp::Ok(());
        };
        let left = if s.literal { s.body.len() - s.pos } else { 0 };
        if left > DRAIN_MAX && s.origin == 0 {
            return Exp::Err;
        }
        let resp = self.resp(s.cmd);
        model_tail(&resp, &s, &mut self.m.ahead)
    }

    fn model_drain(&mut self) -> Exp<()> {
        let Some(p) = self.m.prefetch.take() else {
            return Exp::Ok(());
        };
        let resp = self.resp(p.cmd);
        model_drain(&resp, &p)
    }

    /// Applies an outcome to the model's modes; `true` when the model still predicts.
    fn settle_mode<T, E>(&mut self, exp: &Exp<T>, got: &Result<E, ImapError>, what: &str) -> bool {
        match (exp, got) {
            (Exp::Ok(_), Ok(_)) => true,
            (Exp::Ok(_), Err(e)) => panic!("{what}: expected success, got {e:?}"),
            (Exp::Refused, Err(e)) if is_refusal(e) => true,
            (Exp::Refused, r) => {
                panic!("{what}: expected a refusal, got {:?}", r.as_ref().err())
            }
            (Exp::Err, Err(e)) if !is_refusal(e) => {
                self.m.broken = true;
                false
            }
            (Exp::Err, r) => panic!("{what}: expected a failure, got {:?}", r.as_ref().err()),
            (Exp::Unknown, Ok(_)) => {
                self.m.lost = true;
                false
            }
            (Exp::Unknown, Err(e)) => {
                if !is_refusal(e) {
                    self.m.broken = true;
                }
                self.m.lost = true;
                false
            }
        }
    }

    /// Where the model has given up: only the properties that hold whatever was read.
    fn note_error<T>(&mut self, r: &Result<T, ImapError>) {
        if let Err(e) = r {
            if !is_refusal(e) {
                self.m.broken = true;
            }
        }
    }

    async fn body_start(&mut self, uid: u32, origin: u32, others: &[u32]) {
        let matched_pre = self.conn.prefetched(uid) && origin == 0;
        let eff_others: Vec<u32> = if origin == 0 {
            others.to_vec()
        } else {
            Vec::new()
        };
        if self.m.broken {
            let r = self.conn.body_start_at(uid, origin, others).await;
            assert!(r.is_err(), "body_start on a broken connection succeeded");
            self.new_records();
            return;
        }
        if self.m.lost {
            // The buffer may or may not be cleared (not if reading the previous response
            // fails first): what either command asked is allowed.
            let asked = match &self.m.prefetch {
                Some(p) if matched_pre => p.others.clone(),
                _ => eff_others.clone(),
            };
            self.m.ahead_others.extend(asked);
            self.m.prefetch = None;
            let r = self.conn.body_start_at(uid, origin, others).await;
            self.note_error(&r);
            self.new_records();
            self.m.stream = None;
            return;
        }
        // Before the command: the current stream, then a prefetch not for this body.
        let mut stage = self.model_abandon();
        // The connection clears its read-ahead buffer once the previous response was read.
        let cleared = stage == Exp::Ok(());
        self.m.ahead.clear();
        let pre = self.m.prefetch.take();
        let use_pre = pre.as_ref().is_some_and(|p| p.uid == uid && origin == 0);
        assert_eq!(
            use_pre, matched_pre,
            "prefetched() disagrees with the model"
        );
        if !use_pre {
            self.m.prefetch = pre.clone();
            stage = and(stage, || self.model_drain());
            self.m.prefetch = None;
        }
        let refused = uid == 0
            || eff_others.contains(&0)
            || eff_others.contains(&uid)
            || (!eff_others.is_empty() && self.m.uid_first != Some(true));
        if !use_pre && refused {
            stage = and(stage, || Exp::Refused);
        }
        let asked = if use_pre {
            pre.as_ref().unwrap().others.clone()
        } else {
            eff_others.clone()
        };
        if cleared {
            self.m.ahead_others = asked;
        } else {
            self.m.ahead_others.extend(asked);
        }
        let r = self.conn.body_start_at(uid, origin, others).await;
        let sent = self.new_records();
        if matches!(stage, Exp::Refused | Exp::Err) {
            assert!(sent.is_empty(), "body_start sent a command after {stage:?}");
        }
        // The command (or the prefetched one) and what reading its response gives.
        let exp: Exp<(usize, Vec<u32>, StartOutcome)> = and(stage, || {
            let (cmd, others) = if use_pre {
                let p = pre.clone().unwrap();
                assert!(sent.is_empty(), "a prefetched FETCH sent again");
                (p.cmd, p.others)
            } else {
                let len = (origin != 0).then(|| RANGE_TO_END - origin.min(RANGE_TO_END - 1));
                let mut uids = vec![uid];
                uids.extend_from_slice(&eff_others);
                let cmd = self.expect_sent(&sent, &CmdKind::Fetch { uids, origin, len });
                (cmd, eff_others.clone())
            };
            let resp = self.resp(cmd);
            match model_start(&resp, uid, origin, &others, &mut self.m.ahead) {
                Exp::Ok(o) => Exp::Ok((cmd, others, o)),
                Exp::Err => Exp::Err,
                Exp::Unknown => Exp::Unknown,
                Exp::Refused => unreachable!(),
            }
        });
        if !self.settle_mode(&exp, &r, "body_start") {
            return;
        }
        let Exp::Ok((cmd, others, outcome)) = exp else {
            return;
        };
        match (outcome, r.unwrap()) {
            (StartOutcome::NoBody(k, text), BodyStart::NoBody(done)) => {
                assert_eq!(kind_of(done.kind), k, "completion kind");
                assert_eq!(done.text, text, "completion text");
            }
            (
                StartOutcome::Stream {
                    idx,
                    body,
                    known_uid,
                    literal,
                },
                BodyStart::Streaming,
            ) => {
                if literal {
                    self.m.uid_first = Some(known_uid);
                }
                self.m.stream = Some(Stream {
                    cmd,
                    idx,
                    uid,
                    origin,
                    others,
                    body,
                    pos: 0,
                    known_uid,
                    literal,
                    delivered: false,
                });
            }
            (o, BodyStart::NoBody(done)) => {
                panic!(
                    "expected {o:?}, got no body ({:?} {:?})",
                    done.kind, done.text
                )
            }
            (o, BodyStart::Streaming) => panic!("expected {o:?}, got a body"),
        }
    }

    /// One `body_next`; `true` when the body is over (last part, error, or none).
    async fn body_next(&mut self, max: usize) -> bool {
        self.m.body_calls += 1;
        let r = self.conn.body_next(max).await;
        let mx = max.max(1);
        if let Ok((part, _)) = &r {
            assert!(
                part.len() <= mx,
                "a part of {} bytes for max {max}",
                part.len()
            );
        }
        if self.m.broken || self.m.lost {
            self.note_error(&r);
            return !matches!(r, Ok((_, false)));
        }
        let Some(mut s) = self.m.stream.take() else {
            assert!(
                matches!(&r, Err(e) if is_refusal(e)),
                "body_next without a body: {r:?}"
            );
            return true;
        };
        let rem = s.body.len() - s.pos;
        match r {
            Ok((part, last)) => {
                assert!(part.len() as u64 <= rem, "more bytes than the body has");
                if rem > 0 {
                    assert!(!part.is_empty(), "an empty part before the end");
                }
                assert!(
                    s.body.matches(s.pos, &part),
                    "wrong bytes at {} of the body of UID {}",
                    s.pos,
                    s.uid
                );
                s.pos += part.len() as u64;
                assert_eq!(
                    last,
                    s.pos == s.body.len(),
                    "last at {} of {}",
                    s.pos,
                    s.body.len()
                );
                if !last {
                    self.m.stream = Some(s);
                    return false;
                }
                if s.delivered || s.known_uid {
                    s.delivered = true;
                    self.m.stream = Some(s);
                    return true;
                }
                // UID after the body: the rest of the response was read to its end.
                let resp = self.resp(s.cmd);
                match model_tail(&resp, &s, &mut self.m.ahead) {
                    Exp::Ok(()) => {}
                    Exp::Unknown => self.m.lost = true,
                    e => panic!("body_next ended well but the rest of the response is {e:?}"),
                }
                true
            }
            Err(e) => {
                assert!(!is_refusal(&e), "body_next refused with a body: {e:?}");
                assert!(
                    !s.known_uid && !s.delivered && rem as usize <= mx,
                    "body_next failed ({e:?}) at {} of {} (max {max}, UID known: {})",
                    s.pos,
                    s.body.len(),
                    s.known_uid
                );
                let resp = self.resp(s.cmd);
                let mut scratch = Vec::new();
                match model_tail(&resp, &s, &mut scratch) {
                    Exp::Ok(()) => panic!("body_next failed ({e:?}) on a good response"),
                    Exp::Unknown => self.m.lost = true,
                    _ => {}
                }
                self.m.broken = true;
                true
            }
        }
    }

    async fn settle(&mut self) {
        if self.m.broken || self.m.lost {
            let r = self.conn.settle().await;
            self.note_error(&r);
            self.m.stream = None;
            return;
        }
        let exp = self.model_abandon();
        let r = self.conn.settle().await;
        assert!(self.new_records().is_empty(), "settle sent a command");
        self.settle_mode(&exp, &r, "settle");
    }

    fn take_ahead(&mut self) {
        let got = self.conn.take_ahead();
        for (i, (u, _)) in got.iter().enumerate() {
            assert!(
                self.m.ahead_others.contains(u),
                "read-ahead body for UID {u}, not asked ({:?})",
                self.m.ahead_others
            );
            assert!(
                got[..i].iter().all(|(a, _)| a != u),
                "UID {u} read ahead twice"
            );
        }
        if self.m.broken || self.m.lost {
            return;
        }
        let want = std::mem::take(&mut self.m.ahead);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            want.iter().map(|w| w.0).collect::<Vec<_>>(),
            "read-ahead UIDs"
        );
        for ((u, data), (_, spec)) in got.iter().zip(&want) {
            assert!(spec.equals(data), "read-ahead body of UID {u} differs");
        }
    }

    async fn prefetch(&mut self, uid: u32, others: &[u32]) {
        if self.m.broken {
            assert!(self.conn.prefetch(uid, others).await.is_err());
            self.new_records();
            return;
        }
        if self.m.lost {
            let r = self.conn.prefetch(uid, others).await;
            self.note_error(&r);
            let sent = self.new_records();
            if r.is_ok() {
                self.m.prefetch = Some(Pre {
                    cmd: sent.first().copied().unwrap_or(0),
                    uid,
                    others: others.to_vec(),
                });
            }
            return;
        }
        let refused = self.m.prefetch.is_some()
            || self.m.uid_first != Some(true)
            || self.m.stream.as_ref().is_some_and(|s| !s.delivered)
            || uid == 0
            || others.contains(&0)
            || others.contains(&uid);
        let r = self.conn.prefetch(uid, others).await;
        let sent = self.new_records();
        if refused {
            assert!(sent.is_empty(), "a refused prefetch sent a command");
            self.settle_mode(&Exp::<()>::Refused, &r, "prefetch");
            return;
        }
        let mut uids = vec![uid];
        uids.extend_from_slice(others);
        let cmd = self.expect_sent(
            &sent,
            &CmdKind::Fetch {
                uids,
                origin: 0,
                len: None,
            },
        );
        self.settle_mode(&Exp::Ok(()), &r, "prefetch");
        self.m.prefetch = Some(Pre {
            cmd,
            uid,
            others: others.to_vec(),
        });
    }

    async fn noop(&mut self) {
        if self.m.broken {
            assert!(
                self.conn.execute(CommandBody::Noop, |_| {}).await.is_err(),
                "NOOP on a broken connection succeeded"
            );
            self.new_records();
            return;
        }
        if self.m.lost {
            let r = self.conn.execute(CommandBody::Noop, |_| {}).await;
            self.note_error(&r);
            self.m.stream = None;
            self.m.prefetch = None;
            self.new_records();
            return;
        }
        let stage = self.model_abandon();
        let stage = and(stage, || self.model_drain());
        self.m.prefetch = None;
        let r = self.conn.execute(CommandBody::Noop, |_| {}).await;
        let sent = self.new_records();
        let exp: Exp<String> = and(stage, || {
            let cmd = self.expect_sent(&sent, &CmdKind::Noop);
            match self.resp(cmd).as_slice() {
                [El::Noise, El::Done(Kind::Ok, text)] => Exp::Ok(text.clone()),
                _ => Exp::Err,
            }
        });
        if self.settle_mode(&exp, &r, "NOOP") {
            let (Exp::Ok(text), Ok(done)) = (exp, r) else {
                unreachable!()
            };
            assert!(done.is_ok(), "NOOP completion {:?}", done.kind);
            assert_eq!(done.text, text, "a NOOP got another command's completion");
        }
    }

    /// The connection's view agrees with the model's.
    fn check_state(&self) {
        if self.m.broken || self.m.lost {
            return;
        }
        let c = &self.conn;
        let m = &self.m;
        assert_eq!(c.unsettled(), m.stream.is_some(), "unsettled()");
        let streaming = m.stream.as_ref().filter(|s| !s.delivered);
        assert_eq!(c.streaming_any(), streaming.is_some(), "streaming_any()");
        if let Some(s) = streaming {
            assert!(c.streaming(s.uid), "streaming(uid)");
        }
        assert_eq!(c.has_prefetch(), m.prefetch.is_some(), "has_prefetch()");
        if let Some(p) = &m.prefetch {
            assert!(c.prefetched(p.uid), "prefetched(uid)");
        }
        let mut flight: Vec<u32> = m.stream.iter().flat_map(|s| s.others.clone()).collect();
        if let Some(p) = &m.prefetch {
            flight.push(p.uid);
            flight.extend_from_slice(&p.others);
        }
        assert_eq!(c.in_flight().collect::<Vec<_>>(), flight, "in_flight()");
        assert_eq!(
            c.uid_before_body(),
            m.uid_first == Some(true),
            "uid_before_body()"
        );
        assert_eq!(
            c.fetch_order_known(),
            m.uid_first.is_some(),
            "fetch_order_known()"
        );
    }

    async fn run(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Start { uid, others } => self.body_start(*uid, 0, others).await,
                Op::StartAt { uid, origin } => self.body_start(*uid, *origin, &[]).await,
                Op::Next(max) => {
                    if self.m.body_calls < MAX_BODY_CALLS {
                        self.body_next(*max).await;
                    }
                }
                Op::ReadAll(max) => {
                    while self.m.body_calls < MAX_BODY_CALLS {
                        if self.body_next(*max).await {
                            break;
                        }
                    }
                }
                Op::Settle => self.settle().await,
                Op::TakeAhead => self.take_ahead(),
                Op::Prefetch { uid, others } => self.prefetch(*uid, others).await,
                Op::Noop => self.noop().await,
            }
            self.check_state();
            if trace() {
                eprintln!(
                    "{op:?}: broken={} lost={} stream={:?} prefetch={:?} ahead={:?} uid_first={:?}",
                    self.m.broken,
                    self.m.lost,
                    self.m
                        .stream
                        .as_ref()
                        .map(|s| (s.uid, s.pos, s.body.len(), s.delivered)),
                    self.m.prefetch.as_ref().map(|p| p.uid),
                    self.m.ahead.iter().map(|a| a.0).collect::<Vec<_>>(),
                    self.m.uid_first,
                );
            }
        }
        if trace() {
            for r in &self.srv.lock().unwrap().records {
                eprintln!("sent {:?} -> {:?}", r.line.trim_end(), r.resp);
            }
        }
        // The end of a session: whatever is left is read, then one more NOOP.
        self.settle().await;
        self.check_state();
        self.take_ahead();
        self.noop().await;
        self.check_state();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let flags = inp.u8();
    let n = 1 + usize::from(inp.u8() % 8);
    let chunks: Vec<usize> = (0..n)
        .map(|_| match inp.u8() {
            0 => 4096,
            c => usize::from(c),
        })
        .collect();
    let nops = inp.u8() % 33;
    let ops: Vec<Op> = (0..nops).map(|_| decode_op(&mut inp)).collect();
    let mut plans = VecDeque::new();
    while !inp.is_empty() && plans.len() < 16 {
        plans.push_back(decode_plan(&mut inp));
    }

    let mut greeting: Vec<u8> = if flags & 1 != 0 {
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot (Debian) ready.".to_vec()
    } else {
        b"* OK ready".to_vec()
    };
    greeting.extend_from_slice(if flags & 2 != 0 { b"\n" } else { b"\r\n" });
    let srv = Arc::new(Mutex::new(Server {
        plans,
        out: VecDeque::from([Seg::Data(greeting, 0)]),
        cmd: Vec::new(),
        records: Vec::new(),
        dead: false,
        noops: 0,
        chunks,
        chunk_i: 0,
        sent: 0,
    }));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let limits = ConnLimits {
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(1),
            max_response_size: 64 * 1024,
        };
        let conn = ImapConnection::over(Box::new(Wire(Arc::clone(&srv))), limits, false)
            .await
            .expect("the greeting is read");
        let mut h = Harness {
            conn,
            srv,
            m: Model::default(),
        };
        h.run(&ops).await;
    });
});
