//! RFC 8474 OBJECTID: the EMAILID of listed messages, which a server offering OBJECTID keeps
//! when a message is moved between folders (Cyrus does; Dovecot 2.3 does not offer it).
//! imap-codec can neither send nor parse EMAILID, so [`ImapConnection::email_ids`] writes
//! `UID FETCH <set> (UID EMAILID)` itself (one command per UID set, all pipelined) and reads
//! the answers line by line through the engine's bounded reader, with the small pure parser
//! [`parse_line`]. Anything it does not understand is passed over: a message without a known
//! EMAILID simply keeps the UIDL of where it is.

use tokio::io::AsyncWriteExt;

use super::conn::ImapConnection;
use super::engine::ImapError;
use super::fetch_parse;
use crate::uidl::moved::is_objectid;

/// Length of the UID set in one command (command lines stay short for every server).
const SET_CHARS: usize = 2000;

/// The UIDs as compact sets (`1:5,7`), each about [`SET_CHARS`] long at most.
pub fn sets(uids: &[u32]) -> Vec<String> {
    super::uids::uid_set_texts(uids, SET_CHARS)
}

/// `* <n> FETCH (... UID <u> ... EMAILID (<id>) ...)`, items in any order: `(u, id)`. `None`
/// for any other line, or a FETCH without both items or with a malformed one.
pub fn parse_line(line: &[u8]) -> Option<(u32, String)> {
    let line = std::str::from_utf8(fetch_parse::trim_eol(line)).ok()?;
    let rest = line.strip_prefix("* ")?;
    let (seq, rest) = rest.split_once(' ')?;
    seq.parse::<u32>().ok()?;
    let (name, rest) = rest.split_once(' ')?;
    if !name.eq_ignore_ascii_case("FETCH") {
        return None;
    }
    let mut rest = rest.strip_prefix('(')?;
    let (mut uid, mut id) = (None, None);
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.starts_with(')') || rest.is_empty() {
            break;
        }
        let (item, after) = rest.split_once(' ')?;
        let (value, after) = value(after)?;
        if item.eq_ignore_ascii_case("UID") {
            uid = Some(value.parse::<u32>().ok().filter(|&u| u != 0)?);
        } else if item.eq_ignore_ascii_case("EMAILID") {
            let inner = value.strip_prefix('(')?.strip_suffix(')')?;
            if !is_objectid(inner) {
                return None;
            }
            id = Some(inner.to_owned());
        }
        rest = after;
    }
    Some((uid?, id?))
}

/// The value at the start of `s` (an atom, a quoted string or a parenthesized list) and what
/// follows it.
fn value(s: &str) -> Option<(&str, &str)> {
    let bytes = s.as_bytes();
    let end = match bytes.first()? {
        b'(' => {
            let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
            let mut end = None;
            for (i, &b) in bytes.iter().enumerate() {
                if quoted {
                    match (escaped, b) {
                        (true, _) => escaped = false,
                        (false, b'\\') => escaped = true,
                        (false, b'"') => quoted = false,
                        _ => {}
                    }
                    continue;
                }
                match b {
                    b'"' => quoted = true,
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(i + 1);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            end?
        }
        b'"' => {
            let mut escaped = false;
            let mut end = None;
            for (i, &b) in bytes.iter().enumerate().skip(1) {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => {
                        end = Some(i + 1);
                        break;
                    }
                    _ => {}
                }
            }
            end?
        }
        _ => s.find([' ', ')']).unwrap_or(s.len()),
    };
    Some((&s[..end], &s[end..]))
}

impl ImapConnection {
    /// The EMAILIDs of `uids` in the selected folder: `(uid, emailid)` for each the server
    /// answered, sorted by UID. Pipelined `UID FETCH <set> (UID EMAILID)`, one per UID set;
    /// a command the server refuses gives nothing for its UIDs (they keep the UIDLs of where
    /// they are). Only for a server that offers OBJECTID. Every line is read through the
    /// engine's reader (bounded by `max_response_size`, with the I/O deadline); a literal in
    /// an answer (unexpected here) is skipped.
    pub async fn email_ids(&mut self, uids: &[u32]) -> Result<Vec<(u32, String)>, ImapError> {
        if self.engine.broken {
            return Err(ImapError::Broken);
        }
        self.abandon_body().await?;
        self.drain_prefetch().await?;
        let sets = sets(uids);
        if sets.is_empty() {
            return Ok(Vec::new());
        }
        let mut tags = Vec::with_capacity(sets.len());
        let mut command = String::new();
        for set in &sets {
            let tag = format!("P{}", self.engine.next_tag);
            self.engine.next_tag = self.engine.next_tag.wrapping_add(1);
            command.push_str(&format!("{tag} UID FETCH {set} (UID EMAILID)\r\n"));
            tags.push(tag);
        }
        let t = self.engine.limits.io_timeout;
        let written = tokio::time::timeout(t, async {
            self.engine.io.write_all(command.as_bytes()).await?;
            self.engine.io.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.engine.fail(e.into())),
            Err(_) => return Err(self.engine.fail(ImapError::Timeout(t))),
        }
        let mut asked: Vec<u32> = uids.to_vec();
        asked.sort_unstable();
        let mut found: Vec<(u32, String)> = Vec::new();
        let mut open = tags.len();
        while open > 0 {
            let line = self.engine.read_line().await?;
            if let Some(n) = fetch_parse::announced_literal(&line) {
                self.engine.skip(u64::from(n)).await?;
                continue;
            }
            if let Some(tag) = tags
                .iter()
                .find(|t| line.starts_with(t.as_bytes()) && line.get(t.len()) == Some(&b' '))
            {
                let text = String::from_utf8_lossy(fetch_parse::trim_eol(&line[tag.len()..]));
                if !text.trim_start().starts_with("OK") {
                    tracing::debug!(answer = %text.trim(), "UID FETCH (UID EMAILID) not answered OK");
                }
                open -= 1;
                continue;
            }
            if let Some((uid, id)) = parse_line(&line) {
                if asked.binary_search(&uid).is_ok() && found.len() < asked.len() {
                    found.push((uid, id));
                }
            }
        }
        found.sort_unstable();
        found.dedup_by_key(|e| e.0);
        self.engine.reader.shrink_idle();
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers_in_any_order() {
        assert_eq!(
            parse_line(b"* 3 FETCH (UID 7 EMAILID (M6d99ac3275bb4e))\r\n"),
            Some((7, "M6d99ac3275bb4e".into()))
        );
        assert_eq!(
            parse_line(b"* 1 FETCH (EMAILID (Mabc_-1) FLAGS (\\Seen \"x)\") UID 12)\r\n"),
            Some((12, "Mabc_-1".into()))
        );
        assert_eq!(
            parse_line(b"* 1 fetch (uid 5 emailid (E1) MODSEQ (9))"),
            Some((5, "E1".into()))
        );
    }

    #[test]
    fn refuses_what_is_not_an_answer() {
        for l in [
            &b"* 3 FETCH (UID 7)\r\n"[..],
            b"* 3 FETCH (FLAGS (\\Seen))\r\n",
            b"* 3 FETCH (UID 7 EMAILID NIL)\r\n",
            b"* 3 FETCH (UID 7 EMAILID (bad id))\r\n",
            b"* 3 FETCH (UID 7 EMAILID (a.b))\r\n",
            b"* 3 FETCH (UID 0 EMAILID (M1))\r\n",
            b"* 3 EXPUNGE\r\n",
            b"* OK [ALERT] hi\r\n",
            b"P3 OK done\r\n",
            b"* 3 FETCH (UID 7 EMAILID (M1)",
        ] {
            if l == b"* 3 FETCH (UID 7 EMAILID (M1)" {
                // An unclosed item list still names both: accepted (the line is whole).
                assert_eq!(parse_line(l), Some((7, "M1".into())));
                continue;
            }
            assert_eq!(parse_line(l), None, "{}", String::from_utf8_lossy(l));
        }
        let long = format!("* 1 FETCH (UID 1 EMAILID ({}))", "a".repeat(256));
        assert_eq!(parse_line(long.as_bytes()), None);
    }

    #[test]
    fn compact_sets() {
        assert_eq!(sets(&[5, 1, 2, 3, 0, 9, 3]), vec!["1:3,5,9".to_owned()]);
        assert!(sets(&[]).is_empty());
        let many: Vec<u32> = (1..=4000).map(|i| i * 2).collect();
        let s = sets(&many);
        assert!(s.len() > 1);
        assert!(s.iter().all(|x| x.len() < SET_CHARS + 16));
        let back: usize = s.iter().map(|x| x.split(',').count()).sum();
        assert_eq!(back, 4000);
    }
}
