//! systemd's readiness protocol (`sd_notify`, `Type=notify` in `deploy/popbridge.service`):
//! one datagram per state change to the socket named by `NOTIFY_SOCKET`. Without that variable
//! (not started by systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;

/// Tell the service manager `state` (newline-separated `KEY=value` lines, e.g. `READY=1`).
/// Failures are logged at debug level only: a service manager that went away is no reason to
/// stop serving mail.
pub(super) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(path.as_encoded_bytes(), state.as_bytes()) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

fn send(path: &[u8], state: &[u8]) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    match path.strip_prefix(b"@") {
        // An abstract socket (Linux): `@name` stands for a leading NUL byte.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state, &addr)?;
        }
        None => {
            use std::os::unix::ffi::OsStrExt;
            socket.send_to(state, std::ffi::OsStr::from_bytes(path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("pb-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str().as_encoded_bytes(), b"READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("pb-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send(format!("@{name}").as_bytes(), b"STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
