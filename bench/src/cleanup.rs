//! Clean-up however the bench ends: the test kit stops what it started (Dovecot sandbox,
//! popbridge processes), and the bench's temp root `/tmp/pbb<pid>` is removed (or kept).

use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::Result;

/// The temp root to delete at the end.
static ROOT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Stops everything still running and removes the temp root (idempotent). Called at the end,
/// on error, on a signal. Holds the lock throughout: a second caller (the main thread, while the
/// signal handler cleans up) waits until the first is done rather than exiting under it.
pub fn cleanup_all(keep: bool) {
    let mut root = ROOT.lock().unwrap_or_else(|p| p.into_inner());
    popbridge_testkit::stop_all();
    if let Some(root) = root.take() {
        if keep {
            eprintln!("popbridge-bench: keeping {}", root.display());
        } else {
            let _ = fs::remove_dir_all(&root);
        }
    }
}

/// SIGINT/SIGTERM: clean up, then exit 130.
pub fn install_signal_handler(keep: bool) {
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => return,
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("popbridge-bench: interrupted, cleaning up");
            cleanup_all(keep);
            std::process::exit(130);
        });
    });
}

/// A fresh private directory `/tmp/pbb<pid>` (short: Dovecot's socket paths live under it).
pub fn make_root() -> Result<PathBuf> {
    let root = PathBuf::from(format!("/tmp/pbb{}", std::process::id()));
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir(&root)?;
    *ROOT.lock().unwrap_or_else(|p| p.into_inner()) = Some(root.clone());
    Ok(root)
}
