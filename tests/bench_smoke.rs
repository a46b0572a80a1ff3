//! `popbridge-bench --smoke`: the benchmark's plumbing and its correctness check (popbridge
//! must deliver, session for session, exactly what Dovecot's own POP3 service delivers).
//! Needs what the other integration tests need: root and Dovecot (scripts/test installs it).

use std::process::Command;

#[test]
fn bench_smoke_runs_every_scenario_and_agrees_with_dovecot() {
    let out = Command::new(env!("CARGO_BIN_EXE_popbridge-bench"))
        .args(["--smoke", "--popbridge", env!("CARGO_BIN_EXE_popbridge")])
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
