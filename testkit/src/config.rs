//! The configuration a test's popbridge runs with: defaults merged with the test's own lines.

use std::path::Path;

/// Config sections in order, each with its keys in order; values are TOML literals.
pub type Sections = Vec<(String, Vec<(String, String)>)>;

/// The configuration file of a test's popbridge: the defaults (listening on `port`, in
/// front of plain IMAP on `imap_port`, state in `state`) merged with `extra_toml` (see
/// [`merge_toml`]).
pub(crate) fn test_config(imap_port: u16, port: u16, state: &Path, extra_toml: &str) -> String {
    render_config(&merge_toml(
        default_sections(imap_port, port, state),
        extra_toml,
    ))
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn default_sections(imap_port: u16, port: u16, state: &Path) -> Sections {
    let kv = |pairs: &[(&str, String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    vec![
        (
            "pop3".into(),
            kv(&[
                ("listen", toml_str(&format!("127.0.0.1:{port}"))),
                ("mark_seen", "true".into()),
                ("uidl_format", toml_str("%08Xu%08Xv")),
                ("idle_timeout_secs", "600".into()),
                ("plaintext_auth_loopback", "true".into()),
            ]),
        ),
        (
            "imap".into(),
            kv(&[
                ("host", toml_str("127.0.0.1")),
                ("port", imap_port.to_string()),
                ("security", toml_str("none")),
                ("mailbox", toml_str("INBOX")),
            ]),
        ),
        (
            "state".into(),
            kv(&[("dir", toml_str(&state.display().to_string()))]),
        ),
        (
            "deletion".into(),
            kv(&[
                ("mode", toml_str("hide")),
                ("move_to", toml_str("Trash")),
                ("hide_keyword", toml_str("$POP3Deleted")),
            ]),
        ),
    ]
}

/// Merges one-line `key = value` entries under `[section]` headers into `base` (see
/// [`crate::Popbridge`]). Panics on a line it does not understand.
pub fn merge_toml(mut base: Sections, extra: &str) -> Sections {
    let mut section: Option<String> = None;
    for raw in extra.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            if !base.iter().any(|(s, _)| *s == name) {
                base.push((name.clone(), Vec::new()));
            }
            section = Some(name);
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("extra_toml: not `key = value`: {raw:?}"));
        let sec = section
            .as_ref()
            .unwrap_or_else(|| panic!("extra_toml: `{raw}` comes before any [section]"));
        let entries = &mut base.iter_mut().find(|(s, _)| s == sec).unwrap().1;
        let (key, value) = (key.trim().to_string(), value.trim().to_string());
        match entries.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = value,
            None => entries.push((key, value)),
        }
    }
    base
}

pub fn render_config(sections: &Sections) -> String {
    let mut out = String::new();
    for (name, entries) in sections {
        out.push_str(&format!("[{name}]\n"));
        for (k, v) in entries {
            out.push_str(&format!("{k} = {v}\n"));
        }
        out.push('\n');
    }
    out
}

pub(crate) fn config_listen_port(config: &str) -> Option<u16> {
    let mut in_pop3 = false;
    for line in config.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_pop3 = line == "[pop3]";
        } else if in_pop3 {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == "listen" {
                    return v.trim().trim_matches('"').rsplit(':').next()?.parse().ok();
                }
            }
        }
    }
    None
}
