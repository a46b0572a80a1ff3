//! A Dovecot master passdb for tests of popbridge's master-user logins (`imap.master_user`):
//! the master's passwd-file (readable by Dovecot's auth process), the password file popbridge
//! reads, and the `passdb` block to give [`crate::Dovecot::start_with_conf`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A master user's files, in a temp dir under /tmp (removed on drop).
pub struct MasterPassdb {
    dir: tempfile::TempDir,
    /// popbridge's `master_password_file`: the master's password and a newline.
    pub password_file: PathBuf,
    /// Dovecot's passdb block for the master user (`master = yes`, `pass = yes`).
    pub conf: String,
}

impl MasterPassdb {
    /// Master `user` with `password`.
    pub fn new(user: &str, password: &str) -> MasterPassdb {
        let dir = tempfile::Builder::new()
            .prefix("pbm")
            .tempdir_in("/tmp")
            .expect("temp dir for the master passdb");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the master passdb dir");
        let users = dir.path().join("master-users");
        std::fs::write(&users, format!("{user}:{{PLAIN}}{password}\n")).expect("master-users");
        std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o644))
            .expect("chmod master-users");
        let password_file = dir.path().join("master.pw");
        std::fs::write(&password_file, format!("{password}\n")).expect("master.pw");
        let conf = format!(
            "passdb {{\n  driver = passwd-file\n  master = yes\n  args = scheme=PLAIN {}\n  pass = yes\n}}",
            users.display()
        );
        MasterPassdb {
            dir,
            password_file,
            conf,
        }
    }

    /// The temp dir, for other files the test wants to keep as long (e.g. a routing file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
