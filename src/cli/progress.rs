//! Plain-text progress on stderr for `migrate` waves.

use std::io::{IsTerminal, Write};

/// A bar on a terminal, a line per user otherwise; nothing for a single user.
pub struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// `user` is done.
    pub fn step(&mut self, user: &str) {
        if self.total < 2 {
            return;
        }
        self.done += 1;
        let width = 30;
        let filled = width * self.done / self.total;
        let bar = format!(
            "[{}{}] {}/{} users ({user})",
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.done,
            self.total
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{bar}");
            if self.done == self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{bar}");
        }
    }
}
