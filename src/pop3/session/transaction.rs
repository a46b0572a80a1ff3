//! The TRANSACTION state's commands (RFC 1939 section 5): STAT, LIST, UIDL, RETR, TOP, DELE,
//! RSET, NOOP and QUIT over the listing taken at login and the session's deletion marks.

use super::{err, multiline, ok, Action, Command, SessionConfig, Snapshot};

impl super::Session {
    pub(super) fn transaction(
        cmd: Command,
        snapshot: &Snapshot,
        deleted: &mut [bool],
        cfg: &SessionConfig,
    ) -> Result<Action, TxError> {
        let live = || {
            snapshot
                .messages
                .iter()
                .zip(deleted.iter())
                .enumerate()
                .filter(|(_, (_, d))| !**d)
                .map(|(i, (m, _))| (i + 1, m))
        };
        let totals = |deleted: &[bool]| {
            snapshot
                .messages
                .iter()
                .zip(deleted)
                .filter(|(_, d)| !**d)
                .fold((0usize, 0u64), |(n, o), (m, _)| (n + 1, o + m.size))
        };
        Ok(match cmd {
            Command::Stat => {
                let (n, o) = totals(deleted);
                Action::Reply(ok(&format!("{n} {o}")))
            }
            Command::List(None) => {
                let (n, o) = totals(deleted);
                Action::Reply(multiline(
                    &format!("{n} messages ({o} octets)"),
                    live().map(|(i, m)| format!("{i} {}", m.size)),
                ))
            }
            Command::List(Some(n)) => {
                let m = lookup(snapshot, deleted, n)?;
                Action::Reply(ok(&format!("{n} {}", snapshot.messages[m].size)))
            }
            Command::Uidl(None) => Action::Reply(multiline(
                "",
                live().map(|(i, m)| format!("{i} {}", snapshot.uidl(m.uid, &cfg.uidl_format))),
            )),
            Command::Uidl(Some(n)) => {
                let m = &snapshot.messages[lookup(snapshot, deleted, n)?];
                Action::Reply(ok(&format!(
                    "{n} {}",
                    snapshot.uidl(m.uid, &cfg.uidl_format)
                )))
            }
            Command::Retr(n) => {
                let m = &snapshot.messages[lookup(snapshot, deleted, n)?];
                Action::Retrieve {
                    msg: n,
                    uid: m.uid,
                    size: m.size,
                    top_lines: None,
                    ok_line: ok(&format!("{} octets", m.size)),
                }
            }
            Command::Top { msg, lines } => {
                let m = &snapshot.messages[lookup(snapshot, deleted, msg)?];
                Action::Retrieve {
                    msg,
                    uid: m.uid,
                    size: m.size,
                    top_lines: Some(lines),
                    ok_line: ok(""),
                }
            }
            Command::Dele(n) => {
                let i = lookup(snapshot, deleted, n)?;
                deleted[i] = true;
                Action::Reply(ok(&format!("message {n} deleted")))
            }
            Command::Rset => {
                deleted.iter_mut().for_each(|d| *d = false);
                let (n, o) = totals(deleted);
                Action::Reply(ok(&format!("maildrop has {n} messages ({o} octets)")))
            }
            Command::Noop => Action::Reply(ok("")),
            Command::Quit => {
                let uids = snapshot
                    .messages
                    .iter()
                    .zip(deleted.iter())
                    .filter(|(_, d)| **d)
                    .map(|(m, _)| m.uid)
                    .collect();
                return Err(TxError {
                    reply: Vec::new(),
                    quit: Some(Action::Commit { uids }),
                });
            }
            _ => return Err(TxError::reply(err(None, "Not valid in TRANSACTION state."))),
        })
    }
}

/// A TRANSACTION outcome that needs `self` (error counting, state change).
pub(super) struct TxError {
    pub(super) reply: Vec<u8>,
    pub(super) quit: Option<Action>,
}

impl TxError {
    fn reply(reply: Vec<u8>) -> Self {
        Self { reply, quit: None }
    }
}

/// Index of live message number `n`.
fn lookup(snapshot: &Snapshot, deleted: &[bool], n: u32) -> Result<usize, TxError> {
    let i = usize::try_from(n).unwrap_or(usize::MAX).wrapping_sub(1);
    match deleted.get(i) {
        None => Err(TxError::reply(err(None, "no such message"))),
        Some(true) => Err(TxError::reply(err(
            None,
            &format!("message {n} already deleted"),
        ))),
        Some(false) if i < snapshot.messages.len() => Ok(i),
        Some(false) => Err(TxError::reply(err(None, "no such message"))),
    }
}
