//! `LineBuffer` + `parse`: client bytes pushed in arbitrary chunks, lines popped and parsed the
//! way `pop3::connection` does it (limit set before every `next_line`, at most `room()` bytes
//! pushed at a time).
//!
//! Input layout: byte 0 = limit mode (bits 0-1) and repeat count (bits 2-7: the stream is
//! repeated 1..=64 times, so `MAX_BUFFERED` is reached with small inputs), byte 1 = a limit / per-line schedule, bytes 2..8 = chunk
//! sizes (cycled), the rest = the client byte stream.
//!
//! Checks:
//! - no panic in `push`/`next_line`/`parse`;
//! - popped lines agree with a reference framer (split at LF, one trailing CR stripped, a line
//!   whose raw length incl. its LF exceeds the limit in force becomes exactly one `TooLong`);
//! - an `Ok` line never exceeds the limit; `buffered()` <= `MAX_BUFFERED` after every push and
//!   < `limit()` once drained;
//! - `parse` is consistent: a parsed command re-serialised canonically parses to the same
//!   command, numbers are in range, `Debug` of PASS never shows the password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popbridge::pop3::command::{
    parse, Command, LineBuffer, TooLong, MAX_BUFFERED, MAX_COMMAND_LINE, MAX_SASL_LINE,
};

const HEADER: usize = 8;

fn chunk_len(b: u8) -> usize {
    match b {
        0..=199 => b as usize + 1,
        // A few big chunks so the MAX_BUFFERED bound is reached.
        _ => (b as usize - 199) * 1500,
    }
}

/// The limit in force while line number `k` (0-based, counting TooLong items) is framed.
fn limit_for(mode: u8, sched: u8, k: usize) -> usize {
    match mode % 4 {
        0 => MAX_COMMAND_LINE,
        1 => MAX_SASL_LINE,
        // Switches like a session does around AUTH PLAIN.
        2 => {
            if sched >> (k % 8) & 1 == 1 {
                MAX_SASL_LINE
            } else {
                MAX_COMMAND_LINE
            }
        }
        // Small arbitrary limits (set_limit clamps to >= 3).
        _ => sched as usize,
    }
}

/// Reference framing of the whole stream with the same limit schedule.
fn reference(stream: &[u8], mode: u8, sched: u8) -> Vec<Result<Vec<u8>, TooLong>> {
    let mut out = Vec::new();
    let mut rest = stream;
    loop {
        let limit = limit_for(mode, sched, out.len()).max(3);
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                if i + 1 <= limit {
                    let mut l = &rest[..i];
                    if l.last() == Some(&b'\r') {
                        l = &l[..l.len() - 1];
                    }
                    out.push(Ok(l.to_vec()));
                } else {
                    out.push(Err(TooLong));
                }
                rest = &rest[i + 1..];
            }
            None => {
                if rest.len() >= limit {
                    out.push(Err(TooLong));
                }
                return out;
            }
        }
    }
}

fn check_parse(line: &[u8]) {
    let Ok(cmd) = parse(line) else { return };
    let canonical = match &cmd {
        Command::User(u) => {
            assert!(!u.is_empty());
            format!("USER {u}")
        }
        Command::Pass(p) => {
            assert!(!p.as_str().is_empty());
            assert_eq!(format!("{cmd:?}"), "Pass(<redacted>)");
            format!("PASS {}", p.as_str())
        }
        Command::Apop { name, digest } => format!("APOP {name} {digest}"),
        Command::Auth {
            mechanism,
            initial_response,
        } => {
            if let Some(m) = mechanism {
                assert_eq!(m, &m.to_ascii_uppercase());
            }
            assert!(mechanism.is_some() || initial_response.is_none());
            match (mechanism, initial_response) {
                (None, _) => "AUTH".to_owned(),
                (Some(m), None) => format!("AUTH {m}"),
                (Some(m), Some(r)) => format!("AUTH {m} {r}"),
            }
        }
        Command::Capa => "CAPA".into(),
        Command::Stat => "STAT".into(),
        Command::Noop => "NOOP".into(),
        Command::Rset => "RSET".into(),
        Command::Quit => "QUIT".into(),
        Command::Stls => "STLS".into(),
        Command::List(n) | Command::Uidl(n) => {
            let kw = if matches!(cmd, Command::List(_)) {
                "LIST"
            } else {
                "UIDL"
            };
            match n {
                Some(n) => {
                    assert!(*n >= 1);
                    format!("{kw} {n}")
                }
                None => kw.to_owned(),
            }
        }
        Command::Retr(n) => {
            assert!(*n >= 1);
            format!("RETR {n}")
        }
        Command::Dele(n) => {
            assert!(*n >= 1);
            format!("DELE {n}")
        }
        Command::Top { msg, lines } => {
            assert!(*msg >= 1);
            format!("TOP {msg} {lines}")
        }
    };
    // The keyword really is the line's first word.
    let kw_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    assert!(canonical.as_bytes()[..kw_len].eq_ignore_ascii_case(&line[..kw_len]));
    let again = parse(canonical.as_bytes()).expect("canonical form must parse");
    assert_eq!(
        format!("{again:?}"),
        format!("{cmd:?}"),
        "{:?}",
        String::from_utf8_lossy(line)
    );
    if let (Command::Pass(a), Command::Pass(b)) = (&cmd, &again) {
        assert_eq!(a.as_str(), b.as_str());
    }
    // Error texts go to the client: must be one clean line.
    if let Err(e) = parse(line.get(..line.len() / 2).unwrap_or_default()) {
        assert!(!e.to_string().bytes().any(|b| b.is_ascii_control()));
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let (header, stream) = data.split_at(HEADER);
    let (mode, sched, chunks) = (header[0], header[1], &header[2..]);
    let stream = stream.repeat(1 + (mode >> 2) as usize);
    let stream = &stream[..];

    let mut lb = LineBuffer::new();
    let mut got: Vec<Result<Vec<u8>, TooLong>> = Vec::new();
    let mut pos = 0;
    let mut ci = 0;

    let drain = |lb: &mut LineBuffer, got: &mut Vec<Result<Vec<u8>, TooLong>>| loop {
        let want = limit_for(mode, sched, got.len());
        lb.set_limit(want);
        assert_eq!(lb.limit(), want.max(3));
        let limit = lb.limit();
        match lb.next_line() {
            None => {
                assert!(
                    lb.buffered() < limit,
                    "{} buffered, limit {limit}",
                    lb.buffered()
                );
                assert!(lb.room() > 0);
                return;
            }
            Some(Ok(line)) => {
                assert!(line.len() < limit, "line of {} > limit {limit}", line.len());
                check_parse(&line);
                got.push(Ok(line.to_vec()));
            }
            Some(Err(e)) => got.push(Err(e)),
        }
        assert!(lb.buffered() <= MAX_BUFFERED);
    };

    while pos < stream.len() {
        let want = chunk_len(chunks[ci % chunks.len()]);
        ci += 1;
        let n = want.min(lb.room()).min(stream.len() - pos);
        assert!(n > 0, "room() is zero after draining");
        lb.push(&stream[pos..pos + n]);
        pos += n;
        assert!(lb.buffered() <= MAX_BUFFERED);
        drain(&mut lb, &mut got);
    }
    drain(&mut lb, &mut got);

    let want = reference(stream, mode, sched);
    assert_eq!(got, want, "framing differs from the reference");
});
