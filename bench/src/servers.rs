//! The bench's settings for the test kit's private Dovecot and popbridge: sized for hundreds of
//! simultaneous sessions, quiet logs, POP3S on both sides.

use std::path::{Path, PathBuf};
use std::time::Duration;

use popbridge_testkit::{try_free_ports, Dovecot, DovecotOptions, Popbridge, PopbridgeOptions};

use crate::Result;

/// Dovecot settings the bench needs on top of the sandbox's: hundreds of simultaneous
/// sessions (each a login process, then a pop3 or imap process).
const DOVECOT_EXTRA: &str = "default_process_limit = 1500
default_client_limit = 20000
default_vsz_limit = 1G
service anvil {
  client_limit = 20000
}
service auth {
  client_limit = 20000
}
";

/// Starts the sandbox in `dir` with `script` (default: the repository's
/// `scripts/dovecot-sandbox`).
pub fn start_dovecot(script: Option<PathBuf>, dir: PathBuf) -> Result<Dovecot> {
    let defaults = DovecotOptions::default();
    let opts = DovecotOptions {
        script: script.unwrap_or(defaults.script),
        dir: Some(dir),
        extra_conf: DOVECOT_EXTRA.into(),
    };
    Ok(Dovecot::try_start(&opts)?)
}

/// Starts `bin` with a fresh state directory `dir` in front of `dc`'s plain IMAP port, listening
/// for POP3 and POP3S ([`tls_port`]); `extra` is appended to its configuration.
pub fn start_popbridge(bin: &Path, dc: &Dovecot, dir: PathBuf, extra: &str) -> Result<Popbridge> {
    start_popbridge_upstream(bin, dc, dir, extra, dc.imap_port())
}

/// [`start_popbridge`] with its upstream IMAP at `imap_port` on loopback (a latency relay in
/// front of `dc`'s IMAP port).
pub fn start_popbridge_upstream(
    bin: &Path,
    dc: &Dovecot,
    dir: PathBuf,
    extra: &str,
    imap_port: u16,
) -> Result<Popbridge> {
    let p = try_free_ports(2)?;
    let (imap_extra, extra) = split_imap(extra);
    let config = format!(
        r#"[pop3]
listen = "127.0.0.1:{port}"
listen_tls = "127.0.0.1:{tls}"
plaintext_auth = "always"
mark_seen = true

[pop3.tls]
cert = "{dc}/server.pem"
key = "{dc}/server.key"

[imap]
host = "127.0.0.1"
port = {imap}
security = "none"
{imap_extra}
[state]
dir = "{state}"

[limits]
max_connections = 2000
max_connections_per_ip = 2000
auth_penalty_base_ms = 1

{extra}
"#,
        port = p[0],
        tls = p[1],
        dc = dc.dir().display(),
        imap = imap_port,
        state = dir.join("state").display(),
    );
    Ok(Popbridge::try_start(PopbridgeOptions {
        bin: bin.to_path_buf(),
        dir,
        config,
        rust_log: "warn".into(),
        ports: p,
        timeout: Duration::from_secs(30),
    })?)
}

/// The entries of an `[imap]` section in `extra` (`--popbridge-config '[imap]
/// keep_alive_secs = 120'`), which go into the `[imap]` table above (TOML allows a table
/// once), and the rest of `extra`.
fn split_imap(extra: &str) -> (String, String) {
    let (mut imap, mut rest, mut in_imap) = (String::new(), String::new(), false);
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_imap = t == "[imap]";
            if in_imap {
                continue;
            }
        }
        let out = if in_imap { &mut imap } else { &mut rest };
        out.push_str(line);
        out.push('\n');
    }
    (imap, rest)
}

/// The POP3S port of a popbridge from [`start_popbridge`].
pub fn tls_port(pb: &Popbridge) -> u16 {
    pb.listen_ports()[1]
}
