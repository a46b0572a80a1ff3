//! What the machine must have: checks that fail loudly (tests never skip).

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

const INSTALL_HINT: &str = "run scripts/test, which installs it \
     (or: apt-get install -y dovecot-imapd dovecot-pop3d openssl python3 curl)";

/// `Err` naming what is missing unless Dovecot (core, imapd, pop3d) is installed and this
/// process runs as root (the sandbox switches to the `mail` user).
pub(crate) fn check_dovecot() -> Result<(), String> {
    let missing: Vec<&str> = [
        ("/usr/sbin/dovecot", "dovecot-core"),
        ("/usr/lib/dovecot/imap", "dovecot-imapd"),
        ("/usr/lib/dovecot/pop3", "dovecot-pop3d"),
    ]
    .iter()
    .filter(|(p, _)| !Path::new(p).exists())
    .map(|(_, pkg)| *pkg)
    .collect();
    if !missing.is_empty() {
        return Err(format!(
            "Dovecot is not installed (missing {}): the private Dovecot needs it; {INSTALL_HINT}",
            missing.join(", ")
        ));
    }
    if !euid_root() {
        return Err("the Dovecot sandbox must run as root (it switches to the mail user)".into());
    }
    Ok(())
}

/// The effective uid is 0, read from /proc (std has no getuid).
fn euid_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// Panics (never skips) when the machine lacks what the integration tests need: Dovecot, root,
/// `openssl`, `python3` and `curl`.
pub fn require_tools() {
    if let Err(e) = check_dovecot() {
        panic!("{e}");
    }
    for tool in ["openssl", "python3", "curl"] {
        assert!(have(tool), "{tool} is not installed: {INSTALL_HINT}");
    }
}

/// `tool` is on the PATH.
pub(crate) fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
