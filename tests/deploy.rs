//! What an operator deploys, checked with the tools that will read it: the systemd unit
//! (`systemd-analyze verify` and `security` on a private root holding the Debian package's files
//! at their installed paths), the Debian package itself (cargo-deb from Cargo.toml's metadata:
//! control fields, files, maintainer scripts, the packaged binary), `popbridge --version`, the
//! HAProxy example (`haproxy -c`), the Prometheus scrape configuration (`promtool check
//! config`) and a fleet node's example configuration (`check-config`). The fleet test
//! (tests/fleet.rs) runs one node from the package and the others from the build.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use support::deb::DebPackage;
use support::*;

fn repo_file(path: &str) -> String {
    fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The `[Service]` value of `key` in the unit (the last one, as systemd reads a plain key).
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
}

/// `deploy/fleet-node.toml` as popbridge reads it (its certificate paths pointed at a real
/// pair first); `check-config` must accept it.
fn fleet_node_example(dir: &Path) -> popbridge::config::Config {
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    self_signed_cert(&cert, &key);
    let text = repo_file("deploy/fleet-node.toml")
        .replace("/etc/popbridge/pop3-cert.pem", &cert.display().to_string())
        .replace("/etc/popbridge/pop3-key.pem", &key.display().to_string());
    let path = dir.join("fleet-node.toml");
    fs::write(&path, &text).unwrap();
    let (code, said) = run(Command::new(POPBRIDGE_BIN)
        .args(["check-config", "--config"])
        .arg(&path));
    assert_eq!(code, 0, "check-config on deploy/fleet-node.toml: {said}");
    popbridge::config::Config::parse(&path, &text).unwrap()
}

#[test]
fn version_names_the_commit() {
    let (code, said) = run(Command::new(POPBRIDGE_BIN).arg("--version"));
    assert_eq!(code, 0, "{said}");
    let commit = env!("POPBRIDGE_COMMIT");
    assert_eq!(
        said.trim(),
        format!("popbridge {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
    // Built in a git checkout: the commit is HEAD's.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo_root())
        .output()
        .expect("git");
    if head.status.success() {
        assert_eq!(commit, String::from_utf8_lossy(&head.stdout).trim());
    }
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = repo_file("deploy/popbridge.service");
    let dir = tempfile::tempdir().unwrap();
    let node = fleet_node_example(dir.path());

    for (key, want) in [
        ("Type", "notify"),
        ("User", "popbridge"),
        ("StateDirectory", "popbridge"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        (
            "ExecStart",
            "/usr/bin/popbridge serve --config /etc/popbridge/popbridge.toml",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(unit_value(&unit, key), Some(want), "{key}");
    }
    // Enough descriptors for the connection limit (two per session), and time for the lame
    // duck phase and the drain before systemd's SIGKILL.
    let nofile: u64 = unit_value(&unit, "LimitNOFILE").unwrap().parse().unwrap();
    assert!(
        nofile >= 2 * node.limits.max_connections as u64 + 64,
        "LimitNOFILE {nofile}"
    );
    let stop: u64 = unit_value(&unit, "TimeoutStopSec")
        .unwrap()
        .parse()
        .unwrap();
    let pop3 = &node.pop3;
    assert!(
        stop > pop3.shutdown_lame_duck_secs + pop3.shutdown_drain_secs,
        "TimeoutStopSec {stop} leaves no time for the lame duck and the drain of deploy/fleet-node.toml"
    );

    // systemd-analyze on a root holding the packaged unit and binary where the package puts
    // them, next to this machine's own units (targets the unit refers to) and /bin/kill.
    let pkg = DebPackage::build(Path::new(POPBRIDGE_BIN));
    let root = &pkg.root;
    let packaged = root.join("usr/lib/systemd/system/popbridge.service");
    assert_eq!(fs::read_to_string(&packaged).unwrap(), unit);
    for entry in fs::read_dir("/usr/lib/systemd/system").unwrap().flatten() {
        let to = root.join("usr/lib/systemd/system").join(entry.file_name());
        if !to.exists() {
            let (code, said) = run(Command::new("cp").arg("-a").arg(entry.path()).arg(&to));
            assert_eq!(code, 0, "{said}");
        }
    }
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/kill", root.join("bin/kill")).unwrap();
    let root_arg = format!("--root={}", root.display());
    let (code, said) =
        run(Command::new("systemd-analyze").args(["verify", &root_arg, "popbridge.service"]));
    assert!(
        code == 0 && said.trim().is_empty(),
        "systemd-analyze verify ({code}):\n{said}"
    );
    let (code, said) = run(Command::new("systemd-analyze").args([
        "security",
        "--offline=true",
        &root_arg,
        "popbridge.service",
    ]));
    assert_eq!(code, 0, "{said}");
    let exposure: f64 = said
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for popbridge.service: ")
                .nth(1)
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{said}"));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{said}");
    report(&format!(
        "systemd unit: systemd-analyze verify clean, security exposure {exposure} (of 10)"
    ));
}

#[test]
fn the_debian_package_holds_the_binary_unit_examples_and_dashboards() {
    let started = std::time::Instant::now();
    let pkg = DebPackage::build(Path::new(POPBRIDGE_BIN));
    let took = started.elapsed();
    let field = |f: &str| {
        pkg.dpkg_deb(&["--field"])
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{f}: ")).map(str::to_string))
    };
    assert_eq!(field("Package").as_deref(), Some("popbridge"));
    assert_eq!(field("Section").as_deref(), Some("mail"));
    assert!(
        field("Version").is_some_and(|v| v.starts_with(env!("CARGO_PKG_VERSION"))),
        "{:?}",
        field("Version")
    );
    let depends = field("Depends").unwrap_or_default();
    assert!(
        depends.contains("adduser") && depends.contains("libc6"),
        "{depends}"
    );

    let contents = pkg.dpkg_deb(&["--contents"]);
    for path in [
        "./usr/bin/popbridge",
        "./usr/lib/systemd/system/popbridge.service",
        "./usr/share/doc/popbridge/README.md",
        "./usr/share/doc/popbridge/deploy.md",
        "./usr/share/doc/popbridge/copyright",
        "./usr/share/doc/popbridge/examples/popbridge.toml",
        "./usr/share/doc/popbridge/examples/fleet-node.toml",
        "./usr/share/doc/popbridge/examples/haproxy.cfg",
        "./usr/share/doc/popbridge/examples/prometheus.yml",
        "./usr/share/popbridge/dashboards/popbridge.json",
        "./usr/share/popbridge/dashboards/alerts.yml",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }
    // Nothing in /etc: the operator writes /etc/popbridge/popbridge.toml (the unit waits for it).
    assert!(!contents.contains("./etc/"), "{contents}");
    for (packaged, repo) in [
        (
            "usr/share/doc/popbridge/examples/popbridge.toml",
            "config/popbridge.toml",
        ),
        (
            "usr/share/popbridge/dashboards/popbridge.json",
            "dashboards/popbridge.json",
        ),
        (
            "usr/share/doc/popbridge/examples/haproxy.cfg",
            "deploy/haproxy.cfg",
        ),
    ] {
        assert_eq!(
            fs::read_to_string(pkg.root.join(packaged)).unwrap(),
            repo_file(repo),
            "{packaged}"
        );
    }
    // The packaged binary is this build (stripped), with its commit.
    let (code, packaged) = run(Command::new(pkg.bin()).arg("--version"));
    assert_eq!(code, 0, "{packaged}");
    let (_, ours) = run(Command::new(POPBRIDGE_BIN).arg("--version"));
    assert_eq!(packaged, ours);

    // Maintainer scripts: valid sh, the service user, the systemd handling cargo-deb adds.
    let control = tempfile::tempdir().unwrap();
    let (code, said) = run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&pkg.deb)
        .arg(control.path()));
    assert_eq!(code, 0, "{said}");
    for script in ["postinst", "postrm", "prerm"] {
        let path = control.path().join(script);
        let (code, said) = run(Command::new("sh").arg("-n").arg(&path));
        assert_eq!(code, 0, "{script}: {said}");
        assert!(!fs::read_to_string(&path).unwrap().contains("#DEBHELPER#"));
    }
    let postinst = fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group"), "{postinst}");
    assert!(postinst.contains("deb-systemd-helper enable popbridge.service"));
    report(&format!(
        "Debian package: {} bytes (stripped test build), built and unpacked in {took:.1?}",
        fs::metadata(&pkg.deb).unwrap().len()
    ));
}

#[test]
fn the_haproxy_example_passes_haproxy_c() {
    support::haproxy::require_haproxy();
    let (code, said) = run(Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(repo_root().join("deploy/haproxy.cfg")));
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("Configuration file is valid"), "{said}");
}

#[test]
fn the_prometheus_example_passes_promtool() {
    support::prometheus::require_prometheus();
    let dir = tempfile::tempdir().unwrap();
    let text = repo_file("deploy/prometheus.yml").replace(
        "/etc/prometheus/rules/popbridge-alerts.yml",
        &repo_root()
            .join("dashboards/alerts.yml")
            .display()
            .to_string(),
    );
    let path = dir.path().join("prometheus.yml");
    fs::write(&path, text).unwrap();
    let (code, said) = run(Command::new("promtool")
        .args(["check", "config"])
        .arg(&path));
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("SUCCESS"), "{said}");
    // One target per node of the fleet example.
    assert_eq!(
        repo_file("deploy/prometheus.yml")
            .matches(":9110\"]")
            .count(),
        3
    );
}

/// `popbridge serve` under `ulimit` settings given to sh; returns the soft and hard
/// "Max open files" of the running process and its log, then kills it.
fn open_file_limit_under(ulimits: &str, max_connections: usize) -> (u64, u64, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(1)[0];
    let config = dir.path().join("p.toml");
    fs::write(
        &config,
        format!(
            "[pop3]\nlisten = \"127.0.0.1:{port}\"\nplaintext_auth = \"always\"\n\
             [imap]\nhost = \"127.0.0.1\"\nport = 1\nsecurity = \"none\"\n\
             [state]\ndir = \"{}\"\n[limits]\nmax_connections = {max_connections}\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -e; {ulimits}; exec \"$0\" serve --config \"$1\" 2>\"$2\"",
        ))
        .arg(POPBRIDGE_BIN)
        .arg(&config)
        .arg(&log)
        .spawn()
        .unwrap();
    assert!(
        wait_port(port, std::time::Duration::from_secs(20)),
        "not listening"
    );
    let limits = fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (f[0], f[1], fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn the_open_file_limit_is_raised_for_max_connections() {
    // A shell's usual soft limit, a generous hard one: raised to 2 x 1000 + 64, quietly.
    let (soft, hard, log) = open_file_limit_under("ulimit -Sn 256 && ulimit -Hn 8192", 1000);
    assert_eq!((soft, hard), (2064, 8192));
    assert!(!log.contains("open file limit"), "{log}");
    // A hard limit too low for max_connections: as far as it goes, and a warning.
    let (soft, hard, log) = open_file_limit_under("ulimit -Sn 256 && ulimit -Hn 1500", 1000);
    assert_eq!((soft, hard), (1500, 1500));
    assert!(
        log.contains("WARN") && log.contains("the open file limit cannot hold"),
        "{log}"
    );
}
