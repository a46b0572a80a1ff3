//! What the kit has started and not yet stopped, so that [`stop_all`] can end it from a signal
//! handler (the benchmark's Ctrl-C), where no destructor runs. Every server and process wrapper
//! holds a [`Registration`] from just before it starts until its drop has stopped it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One thing to stop.
#[derive(Debug, Clone)]
pub(crate) enum Started {
    /// A Dovecot sandbox: `SCRIPT stop DIR --fast`.
    Sandbox { script: PathBuf, dir: PathBuf },
    /// A child process: SIGKILL.
    Process(u32),
    /// A process group (Cyrus's master and what it forked): SIGKILL to the group.
    Group(u32),
}

static LIVE: Mutex<Vec<(u64, Started)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

fn live() -> MutexGuard<'static, Vec<(u64, Started)>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Keeps its [`Started`] on the list until dropped.
#[derive(Debug)]
pub(crate) struct Registration(u64);

impl Registration {
    pub(crate) fn new(what: Started) -> Registration {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        live().push((id, what));
        Registration(id)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        live().retain(|(id, _)| *id != self.0);
    }
}

/// Stops everything the kit started that is still running (Dovecot and Cyrus sandboxes, popbridge
/// and Prometheus processes), without waiting for the owners' destructors: for a signal handler
/// that is about to exit. Last started, first stopped. Idempotent.
pub fn stop_all() {
    let all: Vec<Started> = live().drain(..).map(|(_, what)| what).collect();
    for what in all.into_iter().rev() {
        match what {
            Started::Process(pid) => kill(&pid.to_string()),
            Started::Group(pgid) => kill(&format!("-{pgid}")),
            Started::Sandbox { script, dir } => {
                let _ = Command::new(&script)
                    .arg("stop")
                    .arg(&dir)
                    .arg("--fast")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn kill(target: &str) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", target])
        .stderr(Stdio::null())
        .status();
}
