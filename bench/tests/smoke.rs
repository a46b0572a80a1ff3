//! `popbridge-bench --smoke`: the benchmark's plumbing and its correctness check (popbridge
//! must deliver, session for session, exactly what Dovecot's own POP3 service delivers).
//! Needs what the other integration tests need: root and Dovecot (scripts/test installs it).
//!
//! The popbridge under test is the one cargo built next to the bench, in the same
//! `target/<profile>/`: `cargo test --workspace` (what `scripts/test` runs) builds both before
//! running any test. Alone, `cargo test -p popbridge-bench` does not build popbridge: build it
//! first (`cargo build -p popbridge`), or this test fails saying so (also when a file of
//! popbridge's source is newer than that executable).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

/// The newest modification time under `path` (a file or a directory tree).
fn newest(path: &Path) -> SystemTime {
    let Ok(meta) = fs::metadata(path) else {
        return SystemTime::UNIX_EPOCH;
    };
    if !meta.is_dir() {
        return meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    }
    fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| newest(&e.path()))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

#[test]
fn bench_smoke_runs_every_scenario_and_agrees_with_dovecot() {
    let bench = Path::new(env!("CARGO_BIN_EXE_popbridge-bench"));
    let popbridge = bench.with_file_name("popbridge");
    assert!(
        popbridge.is_file(),
        "no popbridge at {}: run the workspace's tests (cargo test --workspace), or build it \
         first (cargo build -p popbridge)",
        popbridge.display()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = newest(&popbridge);
    for source in ["src", "Cargo.toml", "Cargo.lock"] {
        assert!(
            newest(&root.join(source)) <= built,
            "{} is older than popbridge's {source}: rebuild it (cargo build -p popbridge), or run \
             the workspace's tests (cargo test --workspace)",
            popbridge.display()
        );
    }
    let out = Command::new(bench)
        .arg("--smoke")
        .arg("--popbridge")
        .arg(&popbridge)
        .output()
        .expect("run popbridge-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "popbridge-bench --smoke failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for scenario in ["throughput", "tls", "huge", "big", "concurrency"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("| {scenario} "))),
            "the table has no row for {scenario}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("popbridge delivered exactly what Dovecot did"),
        "{stdout}"
    );
}
