//! The keys that shape what one maildrop serves (issue #15): several folders, retention and
//! per-device views. Each is per IMAP backend with a global default; the defaults are filled
//! into the backends at load ([`Config::inherit_defaults`]), after the checks, which name the
//! key in effect (the backend's own, or the global one it inherits).

#[cfg(test)]
use super::ViewDele;
use super::{BackendConfig, Config, DeletionMode, ImapConfig, RetentionAction};

impl Config {
    /// Every IMAP backend section, with its name in keys (`imap`, `backends.X`).
    fn imap_sections(&self) -> Vec<(String, &ImapConfig)> {
        let mut all = vec![("imap".to_owned(), &self.imap)];
        for (name, b) in &self.backends {
            if let BackendConfig::Imap(i) = b {
                all.push((format!("backends.{name}"), i));
            }
        }
        all
    }

    /// Fill each IMAP backend's unset keys from the global defaults (`[folders]`).
    pub(super) fn inherit_defaults(&mut self) {
        let folders = self.folders.clone();
        let retention_days = self.deletion.retention_days;
        let recent_days = self.views.recent_days;
        let fill = |i: &mut ImapConfig| {
            if i.mailboxes.is_empty() {
                i.mailboxes = folders.mailboxes.clone();
            }
            i.retention_days.get_or_insert(retention_days);
            i.recent_days.get_or_insert(recent_days);
        };
        fill(&mut self.imap);
        for b in self.backends.values_mut() {
            if let BackendConfig::Imap(i) = b {
                fill(i);
            }
        }
    }

    /// The per-backend checks of what a maildrop serves, on the values in effect (a
    /// backend's own, else the global default, named as such in errors).
    pub(super) fn validate_maildrops(&self) -> Result<(), (String, String)> {
        self.validate_retention()?;
        self.validate_views()?;
        for (prefix, imap) in self.imap_sections() {
            let (key, effective);
            if imap.mailboxes.is_empty() && !self.folders.mailboxes.is_empty() {
                key = "folders.mailboxes".to_owned();
                effective = ImapConfig {
                    mailboxes: self.folders.mailboxes.clone(),
                    ..imap.clone()
                };
            } else {
                key = format!("{prefix}.mailboxes");
                effective = imap.clone();
            }
            let format = imap
                .uidl_format
                .as_deref()
                .unwrap_or(&self.pop3.uidl_format);
            validate_folders(&key, &effective, format)
                .map_err(|(k, m)| (k, format!("{m} (backend {prefix})")))?;
            let retention = imap.retention_days.unwrap_or(self.deletion.retention_days);
            let moves_for_retention =
                retention > 0 && self.deletion.retention_action == RetentionAction::Move;
            if self.deletion.mode == DeletionMode::Move || moves_for_retention {
                if let Some(name) = effective
                    .folders()
                    .iter()
                    .find(|f| same_folder(f, &self.deletion.move_to))
                {
                    return Err((
                        "deletion.move_to".into(),
                        format!("{name:?} is a folder {prefix} serves: mail moved there would come back"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Most folders one maildrop may serve.
pub const MAX_FOLDERS: usize = 16;

/// Whether two folder names name the same folder (`INBOX` is case-insensitive, RFC 3501).
pub fn same_folder(a: &str, b: &str) -> bool {
    a == b || (a.eq_ignore_ascii_case("INBOX") && b.eq_ignore_ascii_case("INBOX"))
}

/// The checks of a several-folder maildrop: `key` names the list (`imap.mailboxes`, or
/// `folders.mailboxes` when inherited), `format` is the UIDL format its users get.
impl Config {
    /// Whether any IMAP backend offers the per-device view.
    pub fn views_enabled(&self) -> bool {
        self.imap_sections()
            .iter()
            .any(|(_, i)| i.recent_days.unwrap_or(self.views.recent_days) > 0)
    }

    fn validate_views(&self) -> Result<(), (String, String)> {
        let mut days = vec![("views.recent_days".to_owned(), self.views.recent_days)];
        for (prefix, imap) in self.imap_sections() {
            if let Some(n) = imap.recent_days {
                days.push((format!("{prefix}.recent_days"), n));
            }
        }
        for (key, n) in days {
            if n > 36_500 {
                return Err((key, "must be at most 36500; 0 turns the view off".into()));
            }
        }
        let p = &self.views.prefix;
        if self.views_enabled()
            && (p.is_empty() || p.len() > 32 || !p.bytes().all(|b| (0x21..0x7f).contains(&b)))
        {
            return Err((
                "views.prefix".into(),
                "must be 1 to 32 printable ASCII characters without spaces (e.g. \"recent:\")"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Retention only makes sense for hidden mail, within sane bounds.
    fn validate_retention(&self) -> Result<(), (String, String)> {
        let d = &self.deletion;
        if !(1..=10_000).contains(&d.retention_batch) {
            return Err((
                "deletion.retention_batch".into(),
                "must be between 1 and 10000".into(),
            ));
        }
        let mut days = vec![("deletion.retention_days".to_owned(), d.retention_days)];
        for (prefix, imap) in self.imap_sections() {
            if let Some(n) = imap.retention_days {
                days.push((format!("{prefix}.retention_days"), n));
            }
        }
        for (key, n) in days {
            if n > 36_500 {
                return Err((
                    key,
                    "must be at most 36500 (100 years); 0 keeps hidden mail for ever".into(),
                ));
            }
            if n > 0 && d.mode != DeletionMode::Hide {
                return Err((
                    key,
                    "only applies with deletion.mode = \"hide\" (the other modes keep no hidden mail)".into(),
                ));
            }
        }
        if d.retention_action == RetentionAction::Move && d.move_to.is_empty() {
            return Err(("deletion.move_to".into(), "must not be empty".into()));
        }
        Ok(())
    }
}

fn validate_folders(key: &str, imap: &ImapConfig, format: &str) -> Result<(), (String, String)> {
    use crate::uidl::folders::{folder_tag, MARK};
    let list = &imap.mailboxes;
    if list.is_empty() {
        return Ok(());
    }
    if list.len() > MAX_FOLDERS {
        return Err((key.into(), format!("lists more than {MAX_FOLDERS} folders")));
    }
    if !same_folder(&list[0], &imap.mailbox) {
        return Err((
            key.into(),
            format!(
                "starts with {:?} but mailbox is {:?}: the first folder must be the one `mailbox` names (its messages keep their UIDLs); set mailbox = {:?} or reorder",
                list[0], imap.mailbox, list[0]
            ),
        ));
    }
    for (i, name) in list.iter().enumerate() {
        if name.is_empty() {
            return Err((format!("{key}[{i}]"), "must not be empty".into()));
        }
        if let Some(j) = list[..i].iter().position(|o| same_folder(o, name)) {
            return Err((
                format!("{key}[{i}]"),
                format!("repeats {key}[{j}] ({name:?})"),
            ));
        }
        if let Some(j) = list[1.min(i)..i]
            .iter()
            .position(|o| folder_tag(o) == folder_tag(name))
        {
            return Err((
                format!("{key}[{i}]"),
                format!(
                    "{name:?} and {:?} would give the same UIDLs (their name hashes collide): rename one",
                    list[j + 1]
                ),
            ));
        }
    }
    if list.len() > 1 && crate::uidl::expand_preset(format).contains(MARK) {
        return Err((
            key.into(),
            format!("several folders need a UIDL format without {MARK:?} (their later folders' UIDLs use it): the format is {format:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::MINIMAL;
    use super::*;
    use std::path::Path;

    fn parse(extra: &str) -> Result<Config, super::super::ConfigError> {
        Config::parse(Path::new("t.toml"), &format!("{MINIMAL}{extra}"))
    }

    fn key_of(extra: &str) -> String {
        parse(extra).unwrap_err().key.unwrap_or_default()
    }

    #[test]
    fn folders_default_and_inherit() {
        let c = parse("").unwrap();
        assert_eq!(c.imap.folders(), vec!["INBOX".to_owned()]);
        let c = parse("[folders]\nmailboxes = [\"INBOX\", \"Junk\"]\n").unwrap();
        assert_eq!(c.imap.folders(), vec!["INBOX".to_owned(), "Junk".into()]);
        let c = parse("[folders]\nmailboxes = [\"inbox\", \"Junk\"]\n").unwrap();
        assert_eq!(c.imap.folders().len(), 2, "INBOX in any case");
    }

    #[test]
    fn views_are_checked_and_inherited() {
        let c = parse("").unwrap();
        assert!(!c.views_enabled());
        assert_eq!(c.imap.recent_days, Some(0));
        let c = parse("[views]\nrecent_days = 30\ndele = \"seen\"\n").unwrap();
        assert!(c.views_enabled());
        assert_eq!(c.imap.recent_days, Some(30));
        assert_eq!(c.views.dele, ViewDele::Seen);
        assert_eq!(c.views.prefix, "recent:");
        assert_eq!(
            key_of("[views]\nrecent_days = 30\nprefix = \"re cent:\"\n"),
            "views.prefix"
        );
        assert_eq!(
            key_of("[views]\nrecent_days = 40000\n"),
            "views.recent_days"
        );
        let own = MINIMAL.replace("[imap]\n", "[imap]\nrecent_days = 7\n");
        let c = Config::parse(Path::new("t.toml"), &own).unwrap();
        assert!(c.views_enabled(), "one backend is enough");
        assert_eq!(c.imap.recent_days, Some(7));
    }

    #[test]
    fn retention_is_checked_and_inherited() {
        let c = parse("").unwrap();
        assert_eq!(c.imap.retention_days, Some(0));
        let c = parse("[deletion]\nretention_days = 30\n").unwrap();
        assert_eq!(c.imap.retention_days, Some(30));
        assert_eq!(c.deletion.retention_action, RetentionAction::Expunge);
        assert_eq!(c.deletion.retention_batch, 500);
        let own = MINIMAL.replace("[imap]\n", "[imap]\nretention_days = 7\n");
        let c = Config::parse(
            Path::new("t.toml"),
            &format!("{own}[deletion]\nretention_days = 30\n"),
        )
        .unwrap();
        assert_eq!(c.imap.retention_days, Some(7), "the backend's own wins");
        assert_eq!(
            key_of("[deletion]\nmode = \"expunge\"\nretention_days = 30\n"),
            "deletion.retention_days"
        );
        assert_eq!(
            key_of("[deletion]\nretention_days = 99999\n"),
            "deletion.retention_days"
        );
        assert_eq!(
            key_of("[deletion]\nretention_batch = 0\n"),
            "deletion.retention_batch"
        );
        let e = Config::parse(
            Path::new("t.toml"),
            &format!("{own}[deletion]\nmode = \"move\"\n"),
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("imap.retention_days"), "{e}");
        assert_eq!(
            key_of("[folders]\nmailboxes = [\"INBOX\", \"Trash\"]\n[deletion]\nretention_days = 3\nretention_action = \"move\"\n"),
            "deletion.move_to"
        );
    }

    #[test]
    fn folder_lists_are_checked() {
        let imap =
            |list: &str| MINIMAL.replace("[imap]\n", &format!("[imap]\nmailboxes = {list}\n"));
        let e = Config::parse(Path::new("t.toml"), &imap("[\"Junk\", \"INBOX\"]")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("imap.mailboxes"), "{e}");
        assert!(e.to_string().contains("first folder"), "{e}");
        let e = Config::parse(
            Path::new("t.toml"),
            &imap("[\"INBOX\", \"Junk\", \"Junk\"]"),
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("imap.mailboxes[2]"), "{e}");
        let e = Config::parse(Path::new("t.toml"), &imap("[\"INBOX\", \"\"]")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("imap.mailboxes[1]"), "{e}");
        assert_eq!(
            key_of("[folders]\nmailboxes = [\"Archive\", \"Junk\"]\n"),
            "folders.mailboxes"
        );
        assert_eq!(
            key_of("[folders]\nmailboxes = [\"INBOX\", \"Trash\"]\n[deletion]\nmode = \"move\"\n"),
            "deletion.move_to"
        );
        let e = Config::parse(
            Path::new("t.toml"),
            &MINIMAL.replace(
                "[imap]\n",
                "[imap]\nuidl_format = \"%u~%v\"\nmailboxes = [\"INBOX\", \"Junk\"]\n",
            ),
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("imap.mailboxes"), "{e}");
        assert!(e.to_string().contains("UIDL format"), "{e}");
    }
}
