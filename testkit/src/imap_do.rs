//! Changing the upstream mailbox as another IMAP client would, through Python's imaplib.

use std::process::Command;

use crate::repo_root;

/// Runs `tests/clients/imap_do.py`: each step is a list of strings (see that script), run in
/// order on `mailbox` after SELECT. Panics with imaplib's message when a step fails.
pub fn imap_do(port: u16, user: &str, password: &str, mailbox: &str, steps: &[&[&str]]) {
    let json = format!(
        "[{}]",
        steps
            .iter()
            .map(|step| format!(
                "[{}]",
                step.iter()
                    .map(|s| crate::clients::json_quote(s))
                    .collect::<Vec<_>>()
                    .join(",")
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let out = Command::new("python3")
        .arg(repo_root().join("tests/clients/imap_do.py"))
        .args([
            "--port",
            &port.to_string(),
            "--user",
            user,
            "--password",
            password,
        ])
        .args(["--mailbox", mailbox])
        .arg(&json)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "imap_do.py {json} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
