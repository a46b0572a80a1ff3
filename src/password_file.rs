//! A local file of password hashes that checks POP3 passwords where the upstream cannot (a
//! backend logged in to with an application's OAuth token): `user:hash` lines, the hash an
//! argon2id PHC string (`$argon2id$v=19$...`) or, read for compatibility, bcrypt (`$2b$...`).
//! Blank lines and `#` comments are ignored. The file is read again when it changes (checked
//! at each login by its modification time, size and inode); a bad new version keeps the old
//! one and says why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordVerifier};

/// A line that cannot be used: the file, the line, why.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct PasswordFileError {
    pub file: PathBuf,
    pub line: usize,
    pub reason: String,
}

type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The hashes, by lower-cased login.
#[derive(Debug, Default)]
struct Hashes(HashMap<String, String>);

impl Hashes {
    fn parse(file: &Path, text: &str) -> Result<Hashes, PasswordFileError> {
        let mut out = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |reason: String| PasswordFileError {
                file: file.to_owned(),
                line: i + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected `user:hash`".into()))?;
            if user.is_empty() {
                return Err(err("empty user name".into()));
            }
            if hash.starts_with("$argon2") {
                let phc = PasswordHash::new(hash)
                    .map_err(|e| err(format!("not an argon2 PHC string: {e}")))?;
                if phc.salt.is_none() || phc.hash.is_none() {
                    return Err(err("an argon2 PHC string needs a salt and a hash".into()));
                }
            } else if hash.starts_with("$2a$")
                || hash.starts_with("$2b$")
                || hash.starts_with("$2y$")
            {
                if hash.len() != 60 {
                    return Err(err("a bcrypt hash is 60 characters".into()));
                }
            } else {
                return Err(err(
                    "the hash must be argon2id (`$argon2id$...`) or bcrypt (`$2b$...`)".into(),
                ));
            }
            if out.insert(user.to_lowercase(), hash.to_owned()).is_some() {
                return Err(err(format!("user {user:?} appears twice")));
            }
        }
        Ok(Hashes(out))
    }
}

/// The file, read again when it changes.
pub struct PasswordFile {
    path: PathBuf,
    current: Mutex<(Stamp, Arc<Hashes>)>,
}

impl PasswordFile {
    /// Reads `path`; an error names the file and the line.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        let s = stamp(path);
        let hashes = read(path)?;
        Ok(PasswordFile {
            path: path.to_owned(),
            current: Mutex::new((s, Arc::new(hashes))),
        })
    }

    fn hashes(&self) -> Arc<Hashes> {
        let now = stamp(&self.path);
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if now != cur.0 {
            match read(&self.path) {
                Ok(h) => {
                    tracing::info!(file = %self.path.display(), "password file changed: reloaded");
                    *cur = (now, Arc::new(h));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "password file changed but not reloaded, keeping the old one");
                    cur.0 = now;
                }
            }
        }
        Arc::clone(&cur.1)
    }

    /// Whether `password` is `user`'s. Hashing is deliberately slow: call it off the async
    /// runtime (see [`Self::verify_async`]).
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let hashes = self.hashes();
        let Some(hash) = hashes.0.get(&user.to_lowercase()) else {
            // Spend about the same time for an unknown user as for a known one.
            let _ = bcrypt::verify(password, DUMMY_BCRYPT);
            return false;
        };
        if hash.starts_with("$argon2") {
            PasswordHash::new(hash)
                .map(|h| {
                    argon2::Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                })
                .unwrap_or(false)
        } else {
            bcrypt::verify(password, hash).unwrap_or(false)
        }
    }

    /// [`Self::verify`] on the blocking pool.
    pub async fn verify_async(self: &Arc<Self>, user: &str, password: &str) -> bool {
        let (me, user, password) = (Arc::clone(self), user.to_owned(), password.to_owned());
        tokio::task::spawn_blocking(move || me.verify(&user, &password))
            .await
            .unwrap_or(false)
    }
}

/// An argon2id PHC string of `password` (a fresh salt, argon2's default cost), for a line of
/// the file: what `popbridge oauth hash-password` prints.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use ring::rand::SecureRandom;
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| "no randomness for the salt".to_owned())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A bcrypt hash of nothing anyone knows, for unknown users.
const DUMMY_BCRYPT: &str = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";

fn read(path: &Path) -> Result<Hashes, PasswordFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| PasswordFileError {
        file: path.to_owned(),
        line: 0,
        reason: format!("cannot read: {e}"),
    })?;
    Hashes::parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

    fn argon2_hash(pw: &str) -> String {
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        argon2::Argon2::default()
            .hash_password(pw.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn argon2id_and_bcrypt_lines_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwords");
        let bc = bcrypt::hash("old-secret", 4).unwrap();
        std::fs::write(
            &path,
            format!("# users\nAlice:{}\n\nbob:{bc}\n", argon2_hash("s3cret")),
        )
        .unwrap();
        let f = PasswordFile::load(&path).unwrap();
        assert!(f.verify("alice", "s3cret"));
        let fresh = hash_password("s3cret").unwrap();
        assert!(fresh.starts_with("$argon2id$v=19$") && fresh != hash_password("s3cret").unwrap());
        assert!(!f.verify("alice", "wrong"));
        assert!(f.verify("BOB", "old-secret"));
        assert!(!f.verify("carol", "s3cret"));
        // A changed file is read again; a broken one keeps the old hashes.
        std::fs::write(&path, format!("alice:{}\n", argon2_hash("new"))).unwrap();
        assert!(f.verify("alice", "new") && !f.verify("bob", "old-secret"));
        std::fs::write(&path, "alice:plaintext\n").unwrap();
        assert!(f.verify("alice", "new"), "kept after a bad reload");
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        for (text, line) in [
            ("alice\n", 1),
            ("# c\n:$2b$x\n", 2),
            ("alice:md5hash\n", 1),
            ("a:$argon2id$broken\n", 1),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = PasswordFile::load(&path).err().expect(text);
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e
                .to_string()
                .starts_with(&format!("{}:{line}: ", path.display())));
        }
    }
}
