//! popbridge's test kit, shared by the integration tests (`tests/`, through the shim
//! `tests/support/mod.rs`) and the benchmark (`bench/`, crate `popbridge-bench`): a private
//! Dovecot (via `scripts/dovecot-sandbox`) or Cyrus ([`cyrus::Cyrus`]), both behind the
//! [`MailServer`] trait, a running `popbridge serve` ([`Popbridge`]), real clients (Python's
//! poplib and imaplib, curl), and the helpers around them: free ports, the fault relay, a private
//! Prometheus, CRLF and dot-stuffing, the edge-case mailbox. Not published.
//!
//! ```ignore
//! let dc = Dovecot::start();                       // panics if Dovecot is not installed
//! // or Dovecot::start_with_conf("imap_capability = IMAP4rev1 IDLE") to append to dovecot.conf
//! dc.add_user("alice", "pw");
//! dc.seed("alice", &[b"Subject: hi\r\n\r\nhello\r\n"]);   // UIDs 1.. in this order
//! let pb = Popbridge::start_bin(env!("CARGO_BIN_EXE_popbridge"), &dc, "[deletion]\nmode = \"expunge\"\n");
//! // (in tests/: Popbridge::start(&dc, ...), from the shim tests/support/mod.rs)
//! let s = poplib(pb.pop3_port(), &["user alice", "pass pw", "retr 1", "quit"]);
//! assert!(s.step("retr 1").ok);
//! let st = dc.imap_state("alice", "pw", "INBOX");
//! ```
//!
//! Two forms of the same machinery: the test form panics with everything needed to debug
//! ([`Dovecot::start`], [`Popbridge::start_bin`]); the fallible form returns `Err(String)` for
//! callers that report and clean up themselves, as the benchmark does ([`Dovecot::try_start`],
//! [`Popbridge::try_start`]). Whatever is started is registered until dropped, so
//! [`stop_all`] can end it all from a signal handler.
//!
//! Needs root (Dovecot drops to the `mail` user), `dovecot-imapd`, `dovecot-pop3d`, `openssl`,
//! `python3` and `curl`: `scripts/test` installs them. Set `POPBRIDGE_KEEP_SANDBOX=1` to keep the
//! temp directories of a run for inspection.

use std::fs;
use std::path::{Path, PathBuf};

mod certs;
mod clients;
mod config;
mod corpus;
mod dovecot;
mod mail;
mod mail_server;
mod master;
mod popbridge;
mod ports;
mod reaper;
mod tools;

pub mod cyrus;
pub mod deb;
pub mod haproxy;
pub mod imap_do;
pub mod imap_raw;
pub mod ledger;
pub mod oauth;
pub mod pop3_proxy;
pub mod prometheus;
pub mod raw;
pub mod relay;

pub use certs::self_signed_cert;
pub use clients::{
    curl_pop3, imap_state, json_quote, poplib, poplib_with, uidl_list, CurlResult, ImapMessage,
    ImapState, PopOpts, PopSession, PopStep, PopTls,
};
pub use config::{merge_toml, render_config, Sections};
pub use corpus::{
    base64_wrapped, big_message, edge_case_messages, edge_case_named, edge_case_named_small,
};
pub use dovecot::{Dovecot, DovecotOptions};
pub use mail::{
    crlf_size, dot_stuff, dot_unstuff, expected_retr_body, expected_top, split_status, to_crlf,
};
pub use mail_server::MailServer;
pub use master::MasterPassdb;
pub use popbridge::{Popbridge, PopbridgeOptions};
pub use ports::{free_ports, try_free_ports, wait_port};
pub use reaper::stop_all;
pub use tools::require_tools;

/// The repository root (the workspace root: `scripts/`, `config/`, `tests/clients/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ lies inside the repository")
        .to_path_buf()
}

/// `POPBRIDGE_KEEP_SANDBOX` is set (and not `0`): keep temp directories on drop.
fn keep_dirs() -> bool {
    std::env::var_os("POPBRIDGE_KEEP_SANDBOX").is_some_and(|v| !v.is_empty() && v != "0")
}

/// The last `n` lines of the file at `path` ("" if it cannot be read).
fn file_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Prints a test's figures (soak, kill rounds, upstream versions) and, when
/// `POPBRIDGE_FIGURES` names a file, appends them to it: `scripts/test` shows that file in its
/// summary, since cargo hides what passing tests print.
pub fn report(line: &str) {
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("POPBRIDGE_FIGURES").filter(|p| !p.is_empty()) {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", Path::new(&path).display()));
        std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()).unwrap();
    }
}

/// `on_both_servers!(f, g)`: for each generic `fn f<S: MailServer>(server: S)` of the test file,
/// a module `f` with the tests `f::dovecot` and `f::cyrus`, each calling `f` with a freshly
/// started server of that kind (`use support::*` brings it in).
#[macro_export]
macro_rules! on_both_servers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn dovecot() {
                super::$name($crate::Dovecot::start());
            }
            #[test]
            fn cyrus() {
                super::$name($crate::cyrus::Cyrus::start());
            }
        }
    )*};
}
