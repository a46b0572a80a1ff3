//! Progress of a `migrate` wave on stderr: on a terminal a bar redrawn in place with the rate
//! and the time left; otherwise a plain line every [`PLAIN_EVERY`] and at the end.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a plain progress line is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);
/// How often the bar is redrawn on a terminal.
const REDRAW_EVERY: Duration = Duration::from_millis(200);

/// Nothing for a single user.
pub struct Progress {
    total: usize,
    done: usize,
    tty: bool,
    started: Instant,
    last: Instant,
}

/// `h:mm:ss`.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl Progress {
    /// A wave of `total` users to work on.
    pub fn new(total: usize) -> Progress {
        let now = Instant::now();
        Progress {
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
            started: now,
            last: now,
        }
    }

    /// Users per second so far.
    pub fn rate(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    fn line(&self, user: &str) -> String {
        let width = 30;
        let filled = (width * self.done).checked_div(self.total).unwrap_or(width);
        let rate = self.rate();
        let left = self.total.saturating_sub(self.done);
        let eta = if rate > 0.0 {
            clock(Duration::from_secs_f64(left as f64 / rate))
        } else {
            "?".into()
        };
        format!(
            "[{}{}] {}/{} users, {rate:.1} users/s, {} elapsed, ETA {eta} ({user})",
            "#".repeat(filled.min(width)),
            ".".repeat(width - filled.min(width)),
            self.done,
            self.total,
            clock(self.started.elapsed()),
        )
    }

    /// `user` is done.
    pub fn step(&mut self, user: &str) {
        self.done += 1;
        if self.total < 2 {
            return;
        }
        let end = self.done >= self.total;
        let due = if self.tty { REDRAW_EVERY } else { PLAIN_EVERY };
        if !end && self.last.elapsed() < due {
            return;
        }
        self.last = Instant::now();
        let line = self.line(user);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if end {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
    }

    /// The wave ended before every user was done (stopped): ends the bar's line.
    pub fn interrupted(&mut self) {
        if self.total < 2 || self.done >= self.total {
            return;
        }
        let line = self.line("stopped");
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
    }
}
