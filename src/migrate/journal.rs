//! A wave's journal: one line per user outcome, appended and synced to disk before the outcome
//! is reported, so that a re-run of the wave skips the users already done, and a crash loses
//! at most the users in flight.
//!
//! ```text
//! # popbridge migrate journal v1 uidls
//! 1764892800 clean alice@example.org
//! 1764892801 attention bob@example.org
//! 1764892801 failed carol@example.org
//! ```
//!
//! The first line names the job (a `verify` journal is not a `uidls` one). Then `<unix time>
//! <class> <login>` per outcome; the last line for a login counts. A line cut short by a crash
//! (no line end) is ignored and cut off when the journal is opened again. Only `clean`
//! users count as done: a user that needs attention or failed is worked on again.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC: &str = "# popbridge migrate journal v1";

/// How a user's outcome counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Nothing to do: the map is stored with no changed UIDL, the import is in, verify found
    /// no difference.
    Clean,
    /// Done, but a person should look (changed UIDLs refused or accepted, differences).
    Attention,
    /// The work failed (login, connection, server error).
    Failed,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Clean => "clean",
            Class::Attention => "attention",
            Class::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Class> {
        match s {
            "clean" => Some(Class::Clean),
            "attention" => Some(Class::Attention),
            "failed" => Some(Class::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {}: {reason}", path.display())]
    Foreign { path: PathBuf, reason: String },
}

/// An open journal, positioned for appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    done: HashSet<String>,
    /// Lines that could not be read (cut short by a crash, or edited by hand).
    pub unreadable: usize,
}

impl Journal {
    /// Opens (or creates) the journal of the job `job` at `path`. With `redo`, what it holds
    /// is ignored (and kept: new lines are appended).
    pub fn open(path: &Path, job: &str, redo: bool) -> Result<Journal, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io)?;
        let header = format!("{MAGIC} {job}");
        let mut journal = Journal {
            path: path.to_owned(),
            file,
            done: HashSet::new(),
            unreadable: 0,
        };
        if text.is_empty() {
            journal.append(&format!("{header}\n"))?;
            return Ok(journal);
        }
        let raw = text;
        let text = String::from_utf8_lossy(&raw);
        let mut lines = text.split_inclusive('\n');
        let first = lines.next().unwrap_or_default().trim_end();
        if first != header {
            return Err(JournalError::Foreign {
                path: path.to_owned(),
                reason: match first.strip_prefix(MAGIC) {
                    Some(other) => format!(
                        "it is the journal of `{}`, not `{job}`: give this job its own --journal",
                        other.trim()
                    ),
                    None => "not a popbridge migrate journal (its first line differs)".into(),
                },
            });
        }
        let mut last: std::collections::HashMap<String, Class> = Default::default();
        for line in lines {
            let parsed = line.strip_suffix('\n').and_then(|l| {
                let mut f = l.split(' ');
                let (time, class, login) = (f.next()?, f.next()?, f.next()?);
                time.parse::<u64>().ok()?;
                (f.next().is_none() && !login.is_empty()).then_some((Class::parse(class)?, login))
            });
            match parsed {
                Some((class, login)) => {
                    last.insert(login.to_owned(), class);
                }
                None => journal.unreadable += 1,
            }
        }
        if !raw.ends_with(b"\n") {
            // A record cut short by a crash: dropped, so that it never reads as another login.
            let keep = raw.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            journal.file.set_len(keep as u64).map_err(io)?;
            journal.file.sync_data().map_err(io)?;
        }
        if !redo {
            journal.done = last
                .into_iter()
                .filter(|(_, c)| *c == Class::Clean)
                .map(|(l, _)| l)
                .collect();
        }
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `login` is done (its last outcome was clean, and the run is not a redo).
    pub fn done(&self, login: &str) -> bool {
        self.done.contains(login)
    }

    /// Records `login`'s outcome and syncs it to disk.
    pub fn record(&mut self, login: &str, class: Class) -> Result<(), JournalError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.append(&format!("{now} {} {login}\n", class.as_str()))?;
        if class == Class::Clean {
            self.done.insert(login.to_owned());
        } else {
            self.done.remove(login);
        }
        Ok(())
    }

    fn append(&mut self, text: &str) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.seek(SeekFrom::End(0)).map_err(io)?;
        self.file.write_all(text.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// Where a wave's journal goes by default: next to the users file, named after it and the job.
pub fn default_path(users_file: &Path, job: &str) -> PathBuf {
    let mut name = users_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{job}.journal"));
    users_file.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_survives_a_torn_line_and_refuses_another_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wave.txt.uidls.journal");
        assert_eq!(default_path(&dir.path().join("wave.txt"), "uidls"), p);
        let mut j = Journal::open(&p, "uidls", false).unwrap();
        j.record("a", Class::Clean).unwrap();
        j.record("b", Class::Failed).unwrap();
        j.record("c", Class::Clean).unwrap();
        j.record("c", Class::Attention).unwrap();
        drop(j);
        // A crash in the middle of a record.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"1764892800 clean d").unwrap();
        drop(f);
        let mut j = Journal::open(&p, "uidls", false).unwrap();
        assert!(j.done("a"));
        assert!(!j.done("b") && !j.done("c"), "only clean users are done");
        assert!(!j.done("d"), "a torn record does not count");
        assert_eq!(j.unreadable, 1);
        j.record("d", Class::Clean).unwrap();
        drop(j);
        let j = Journal::open(&p, "uidls", false).unwrap();
        assert!(j.done("d") && j.done("a"));
        assert_eq!(j.unreadable, 0, "the torn record was cut off");
        let j = Journal::open(&p, "uidls", true).unwrap();
        assert!(!j.done("a"), "--redo ignores it");
        let e = Journal::open(&p, "verify", false).unwrap_err().to_string();
        assert!(e.contains("journal of `uidls`, not `verify`"), "{e}");
        let other = dir.path().join("users.txt");
        std::fs::write(&other, "alice\n").unwrap();
        let e = Journal::open(&other, "uidls", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a popbridge migrate journal"), "{e}");
    }
}
