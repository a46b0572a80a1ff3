//! Other POP3 proxies in popbridge's place, for the benchmark's context rows: nginx's mail proxy
//! (Debian's `nginx-core` with `libnginx-mod-mail`) and perdition (`perdition`). Each runs in
//! the foreground, privately (its own configuration and directory, loopback ports, its own
//! process group, killed on drop or by [`crate::stop_all`]) and proxies every POP3 login to one
//! upstream POP3 server, whatever the user.
//!
//! ```ignore
//! let p = Pop3Proxy::start(ProxyKind::Nginx, dir, far_pop3_addr)?;   // Err if not installed
//! pop3_session(p.port());
//! ```

use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::file_tail;
use crate::ports::{try_free_ports, wait_port};
use crate::reaper::{Registration, Started};

const NGINX: &str = "/usr/sbin/nginx";
const NGINX_MAIL_MODULE: &str = "/usr/lib/nginx/modules/ngx_mail_module.so";
const PERDITION: &str = "/usr/sbin/perdition.pop3";

/// Which proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// nginx's mail module; logins are routed by a tiny `auth_http` location in the same nginx
    /// that answers every user with the upstream.
    Nginx,
    /// perdition, with a static outgoing server (`--outgoing_server`, no map library).
    Perdition,
}

impl ProxyKind {
    /// How it is named in figures.
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::Nginx => "nginx mail",
            ProxyKind::Perdition => "perdition",
        }
    }

    /// `Err` naming the package to install unless its files are there.
    pub fn check_installed(self) -> Result<(), String> {
        let (files, packages): (&[&str], &str) = match self {
            ProxyKind::Nginx => (&[NGINX, NGINX_MAIL_MODULE], "nginx-core libnginx-mod-mail"),
            ProxyKind::Perdition => (&[PERDITION], "perdition"),
        };
        match files.iter().find(|f| !Path::new(f).exists()) {
            None => Ok(()),
            Some(f) => Err(format!(
                "{} is not installed ({f} is missing; apt-get install -y {packages})",
                self.name()
            )),
        }
    }
}

/// A running proxy. Dropping it kills its process group.
pub struct Pop3Proxy {
    kind: ProxyKind,
    child: Child,
    registration: Option<Registration>,
    port: u16,
    log: PathBuf,
}

impl Pop3Proxy {
    /// Starts `kind` with its files in `dir` (created), proxying POP3 to `upstream`; waits up
    /// to 10 s until it listens. `Err` (with its log) if it is not installed or does not start.
    pub fn start(kind: ProxyKind, dir: &Path, upstream: SocketAddr) -> Result<Pop3Proxy, String> {
        kind.check_installed()?;
        fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let ports = try_free_ports(2).map_err(|e| format!("free ports: {e}"))?;
        let (port, auth_port) = (ports[0], ports[1]);
        let log = dir.join(format!("{}.log", kind.name().replace(' ', "-")));
        let out = fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let mut cmd = match kind {
            ProxyKind::Nginx => {
                let conf = dir.join("nginx.conf");
                fs::write(&conf, nginx_conf(dir, port, auth_port, upstream))
                    .map_err(|e| format!("write {}: {e}", conf.display()))?;
                let mut c = Command::new(NGINX);
                c.arg("-p").arg(dir).arg("-c").arg(&conf);
                c
            }
            ProxyKind::Perdition => {
                let mut c = Command::new(PERDITION);
                c.args(["--no_daemon", "--ssl_mode", "none", "--map_library", ""])
                    .args(["--config_file", "/dev/null", "--log_facility", "-"])
                    .args(["--bind_address", "127.0.0.1", "--listen_port"])
                    .arg(port.to_string())
                    .arg("--outgoing_server")
                    .arg(upstream.to_string())
                    // It drops privileges before removing its pid file: a world-writable dir.
                    .arg("--pid_file")
                    .arg(world_writable(&dir.join("run"))?.join("perdition.pid"));
                c
            }
        };
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", kind.name()))?;
        let registration = Some(Registration::new(Started::Group(child.id())));
        let mut p = Pop3Proxy {
            kind,
            child,
            registration,
            port,
            log,
        };
        if !wait_port(port, Duration::from_secs(10)) {
            p.stop();
            return Err(format!(
                "{} did not listen on 127.0.0.1:{port} within 10 s; log:\n{}",
                kind.name(),
                file_tail(&p.log, 40)
            ));
        }
        Ok(p)
    }

    /// Its POP3 port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its name in figures.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        self.registration = None;
        let _ = self.child.wait();
    }
}

impl Drop for Pop3Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `path`, created with mode 1777.
fn world_writable(path: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o1777))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}

/// nginx in the foreground with one worker, its temp paths in `dir`, a mail server on `port`
/// and an `auth_http` location on `auth_port` that sends every login to `upstream`.
fn nginx_conf(dir: &Path, port: u16, auth_port: u16, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "load_module {NGINX_MAIL_MODULE};
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp-body;
    proxy_temp_path {d}/tmp-proxy;
    fastcgi_temp_path {d}/tmp-fastcgi;
    uwsgi_temp_path {d}/tmp-uwsgi;
    scgi_temp_path {d}/tmp-scgi;
    server {{
        listen 127.0.0.1:{auth_port};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server {ip};
            add_header Auth-Port {up_port};
            return 204;
        }}
    }}
}}
mail {{
    server_name popbridge-bench;
    auth_http 127.0.0.1:{auth_port}/auth;
    proxy_pass_error_message on;
    server {{
        listen 127.0.0.1:{port};
        protocol pop3;
        pop3_auth plain;
    }}
}}
",
        ip = upstream.ip(),
        up_port = upstream.port(),
    )
}
