//! Users' refresh tokens (`tokens = "user"`), each sealed with a key derived from the user's
//! POP3 password: argon2id (a fresh salt per write) and ChaCha20-Poly1305 (ring), the login as
//! associated data. A copied store yields nothing without the passwords; a wrong password fails
//! to open the seal exactly like a damaged file. One small file per user, replaced atomically
//! (write, fsync, rename, fsync the directory), so a rotation is never half-written.
//!
//! Not in the sled state: that is a cache an operator may delete, and losing these would make
//! every user authorize again. Back the directory up; a fleet shares it (one path on shared
//! storage), since a refresh token rotated by one node must be what the next node reads.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// argon2id cost: 19 MiB, 2 passes, 1 lane (OWASP's first recommendation).
const M_COST_KIB: u32 = 19 * 1024;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no refresh token stored for this user (run `popbridge oauth authorize`)")]
    Missing,
    /// The password is wrong, or the file was altered: the seal does not open.
    #[error("the stored refresh token does not open with this password")]
    Sealed,
    #[error("the stored refresh token file is damaged: {0}")]
    Damaged(String),
    #[error("token store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot derive the key: {0}")]
    Kdf(String),
}

/// The file format (version 1).
#[derive(Serialize, Deserialize)]
struct Sealed {
    v: u8,
    m_cost: u32,
    t_cost: u32,
    p_cost: u32,
    salt: String,
    nonce: String,
    sealed: String,
}

/// The directory of sealed refresh tokens.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    pub fn new(dir: &Path) -> TokenStore {
        TokenStore {
            dir: dir.to_owned(),
        }
    }

    /// `<dir>/<sha256 of the lower-cased login>.json`: any login is a safe file name.
    fn path(&self, user: &str) -> PathBuf {
        let digest = ring::digest::digest(&ring::digest::SHA256, user.to_lowercase().as_bytes());
        let name: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.json"))
    }

    pub fn has(&self, user: &str) -> bool {
        self.path(user).is_file()
    }

    /// The refresh token of `user`, opened with `password`.
    pub fn open(&self, user: &str, password: &str) -> Result<String, StoreError> {
        let path = self.path(user);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::Missing),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let s: Sealed =
            serde_json::from_slice(&text).map_err(|e| StoreError::Damaged(e.to_string()))?;
        if s.v != 1 {
            return Err(StoreError::Damaged(format!("unknown version {}", s.v)));
        }
        let b64 = |x: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(x)
                .map_err(|e| StoreError::Damaged(e.to_string()))
        };
        let (salt, nonce, mut sealed) = (b64(&s.salt)?, b64(&s.nonce)?, b64(&s.sealed)?);
        let key = derive(password, &salt, s.m_cost, s.t_cost, s.p_cost)?;
        let nonce = Nonce::try_assume_unique_for_key(&nonce)
            .map_err(|_| StoreError::Damaged("bad nonce".into()))?;
        let plain = key
            .open_in_place(nonce, aad(user), &mut sealed)
            .map_err(|_| StoreError::Sealed)?;
        String::from_utf8(plain.to_vec()).map_err(|_| StoreError::Damaged("not UTF-8".into()))
    }

    /// Seals `refresh_token` for `user` under `password`, replacing what was there atomically.
    pub fn seal(&self, user: &str, password: &str, refresh_token: &str) -> Result<(), StoreError> {
        let rng = SystemRandom::new();
        let (mut salt, mut nonce) = ([0u8; 16], [0u8; 12]);
        rng.fill(&mut salt)
            .and_then(|()| rng.fill(&mut nonce))
            .map_err(|_| StoreError::Kdf("no randomness".into()))?;
        let key = derive(password, &salt, M_COST_KIB, T_COST, P_COST)?;
        let mut sealed = refresh_token.as_bytes().to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), aad(user), &mut sealed)
            .map_err(|_| StoreError::Kdf("sealing failed".into()))?;
        let b64 = |x: &[u8]| base64::engine::general_purpose::STANDARD.encode(x);
        let file = Sealed {
            v: 1,
            m_cost: M_COST_KIB,
            t_cost: T_COST,
            p_cost: P_COST,
            salt: b64(&salt),
            nonce: b64(&nonce),
            sealed: b64(&sealed),
        };
        let text = serde_json::to_vec(&file).map_err(|e| StoreError::Damaged(e.to_string()))?;
        self.replace(&self.path(user), &text)
    }

    /// Forgets `user`'s grant (re-authorization starts from nothing).
    pub fn remove(&self, user: &str) -> Result<(), StoreError> {
        let path = self.path(user);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Write a temporary file beside `path`, fsync it, rename it over `path`, fsync the
    /// directory: a crash leaves the old file or the new one, never half of one.
    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
        }
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

fn aad(user: &str) -> Aad<Vec<u8>> {
    let mut a = b"popbridge refresh token v1\0".to_vec();
    a.extend_from_slice(user.to_lowercase().as_bytes());
    Aad::from(a)
}

fn derive(password: &str, salt: &[u8], m: u32, t: u32, p: u32) -> Result<LessSafeKey, StoreError> {
    // Bounded: a file cannot make a login spend more than a few hundred MiB or passes.
    if m > 256 * 1024 || t > 16 || p > 8 || salt.len() < 8 {
        return Err(StoreError::Damaged(
            "key derivation parameters out of bounds".into(),
        ));
    }
    let params =
        argon2::Params::new(m, t, p, Some(32)).map_err(|e| StoreError::Kdf(e.to_string()))?;
    let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    kdf.hash_password_into(password.as_bytes(), salt, &mut key)
        .map_err(|e| StoreError::Kdf(e.to_string()))?;
    let unbound =
        UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| StoreError::Kdf("key".into()))?;
    key.iter_mut().for_each(|b| *b = 0);
    Ok(LessSafeKey::new(unbound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_wrong_password_and_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(&dir.path().join("tokens"));
        assert!(matches!(
            store.open("alice", "pw"),
            Err(StoreError::Missing)
        ));
        store.seal("Alice", "pw", "refresh-1").unwrap();
        assert!(store.has("alice"));
        assert_eq!(store.open("alice", "pw").unwrap(), "refresh-1");
        assert!(matches!(
            store.open("alice", "wrong"),
            Err(StoreError::Sealed)
        ));
        // Rotation replaces it; the file never holds the token in the clear.
        store.seal("alice", "pw", "refresh-2").unwrap();
        assert_eq!(store.open("alice", "pw").unwrap(), "refresh-2");
        let path = store.path("alice");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("refresh-2"));
        // Another user's file does not open as alice's (the login is bound in).
        let bob = store.path("bob");
        std::fs::copy(&path, &bob).unwrap();
        assert!(matches!(store.open("bob", "pw"), Err(StoreError::Sealed)));
        // No temporary files left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tokens"))
                .unwrap()
                .count(),
            2
        );
        store.remove("alice").unwrap();
        assert!(!store.has("alice"));
    }
}
