//! A local OAuth 2.0 authorization server for tests (`tests/clients/oauth_server.py`, on
//! Python's HTTP stack) and the Dovecot settings that make a private Dovecot take its tokens.
//!
//! ```ignore
//! let auth = OAuthServer::start();
//! let dc = Dovecot::start_with_conf(&auth.dovecot_conf(&["alice", "bob"]));
//! // popbridge: [imap.oauth] token_url = auth.token_url(), client_secret_file = auth.secret_file()
//! auth.control(r#"{"revoke": "alice"}"#);
//! assert_eq!(auth.stats()["refreshes"]["alice"], 1);
//! ```
//!
//! Dovecot's `passdb oauth2` asks `POST /introspect/USER` (one passdb per user, filtered by
//! `username_filter`: 2.3.19 cannot put `%u` in the URL), so application tokens (good for every
//! user) and users' own tokens (good for their user only) are both checked as a provider would.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::reaper::{Registration, Started};
use crate::repo_root;

pub const CLIENT_ID: &str = "popbridge-test";
pub const SERVICE_ACCOUNT: &str = "bridge@popbridge-test.iam.example";

/// The running server. Dropping it kills it.
pub struct OAuthServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    _registration: Registration,
}

impl OAuthServer {
    /// A fresh RSA key pair and client secret in a temp dir, and the server on a free port.
    /// Panics if it does not start.
    pub fn start() -> OAuthServer {
        let dir = tempfile::Builder::new()
            .prefix("pbo")
            .tempdir_in("/tmp")
            .expect("create temp dir in /tmp");
        let key = dir.path().join("client-key.pem");
        let public = dir.path().join("client-key.pub.pem");
        run(Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key));
        run(Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public));
        let secret = "s3cret-client-secret-do-not-log";
        fs::write(dir.path().join("client-secret"), format!("{secret}\n")).unwrap();
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/clients/oauth_server.py"))
            .args(["--client-id", CLIENT_ID, "--client-secret", secret])
            .arg("--public-key")
            .arg(&public)
            .args(["--service-account", SERVICE_ACCOUNT])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run tests/clients/oauth_server.py");
        let registration = Registration::new(Started::Process(child.id()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the OAuth server's port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("OAuth server did not start: {line:?}"));
        OAuthServer {
            child,
            port,
            dir,
            _registration: registration,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
    pub fn device_url(&self) -> String {
        format!("http://127.0.0.1:{}/device", self.port)
    }
    /// The file holding the client secret.
    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("client-secret")
    }
    /// The PEM RSA private key the server trusts for client assertions and JWT bearer grants.
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("client-key.pem")
    }

    /// Dovecot settings appended to a sandbox's `dovecot.conf`: XOAUTH2 and OAUTHBEARER, checked
    /// by introspection here, one passdb per user of `users`.
    pub fn dovecot_conf(&self, users: &[&str]) -> String {
        let mut conf = String::from("auth_mechanisms = plain login xoauth2 oauthbearer\n");
        for user in users {
            let args = self.dir.path().join(format!("dovecot-oauth2-{user}.conf"));
            fs::write(
                &args,
                format!(
                    "introspection_mode = post\n\
                     introspection_url = http://127.0.0.1:{}/introspect/{user}\n\
                     username_attribute = username\n\
                     active_attribute = active\n\
                     active_value = true\n\
                     force_introspection = yes\n",
                    self.port
                ),
            )
            .unwrap();
            conf.push_str(&format!(
                "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  \
                 username_filter = {user}\n  args = {}\n}}\n",
                args.display()
            ));
        }
        conf
    }

    /// `POST /control` with a JSON object (see `tests/clients/oauth_server.py`).
    pub fn control(&self, json: &str) {
        let (status, body) = self.http("POST", "/control", json);
        assert_eq!(status, 200, "OAuth server /control {json}: {body}");
    }

    /// A new access token of `user`'s, as the user's own mail client would have got it.
    pub fn mint(&self, user: &str) -> String {
        self.mint_long(user, 0)
    }

    /// [`Self::mint`], `pad` octets longer.
    pub fn mint_long(&self, user: &str, pad: usize) -> String {
        let json = format!(r#"{{"mint": "{user}", "pad": {pad}}}"#);
        let (status, body) = self.http("POST", "/control", &json);
        assert_eq!(status, 200, "OAuth server mint: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        v["access_token"].as_str().expect("access_token").to_owned()
    }

    /// Every access and refresh token the server issued so far.
    pub fn issued(&self) -> Vec<String> {
        self.stats()["issued"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `GET /stats`: token requests by `grant:result`, refreshes by user, the most refreshes of
    /// one user in flight at once.
    pub fn stats(&self) -> serde_json::Value {
        let (status, body) = self.http("GET", "/stats", "");
        assert_eq!(status, 200, "OAuth server /stats: {body}");
        serde_json::from_str(&body).expect("stats are JSON")
    }

    /// Token requests of `grant` that ended in `result` (`ok` or an error code).
    pub fn requests(&self, grant: &str, result: &str) -> u64 {
        self.stats()["requests"][format!("{grant}:{result}")]
            .as_u64()
            .unwrap_or(0)
    }

    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read answer");
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_owned())
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run openssl");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
