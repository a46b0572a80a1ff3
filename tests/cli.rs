//! The command line: help, check-config's verdicts, and serve refusing a bad config.

mod support;

use std::process::Command;

fn popbridge(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_popbridge"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn write(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("popbridge.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const VALID: &str = "[pop3]\nlisten = \"127.0.0.1:1110\"\nplaintext_auth = \"always\"\n[imap]\nhost = \"127.0.0.1\"\nsecurity = \"none\"\n[state]\ndir = \"/tmp/pb-cli-state\"\n";

#[test]
fn help_documents_every_flag() {
    let (code, out, _) = popbridge(&["--help"]);
    assert_eq!(code, 0);
    for word in ["serve", "check-config", "--log-level", "--version"] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
    for sub in ["serve", "check-config"] {
        let (code, out, _) = popbridge(&[sub, "--help"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("--config"),
            "{sub} --help lacks --config:\n{out}"
        );
    }
}

#[test]
fn check_config_accepts_valid_and_the_shipped_example() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, VALID);
    let (code, out, err) = popbridge(&["check-config", "--config", &path]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid"));
    // The documented example, with its placeholder CA path pointed at a real PEM.
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/popbridge.toml"),
    )
    .unwrap()
    .replace(
        "/etc/popbridge/upstream-ca.pem",
        "/etc/ssl/certs/ca-certificates.crt",
    )
    .replace(
        "/etc/popbridge/pop3-cert.pem",
        &format!("{}/cert.pem", dir.path().display()),
    )
    .replace(
        "/etc/popbridge/pop3-key.pem",
        &format!("{}/key.pem", dir.path().display()),
    );
    support::self_signed_cert(&dir.path().join("cert.pem"), &dir.path().join("key.pem"));
    let path = write(&dir, &example);
    let (code, _, err) = popbridge(&["check-config", "--config", &path]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn check_config_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            VALID.replace("[state]", "[state]\ncolour = \"blue\""),
            "colour",
        ),
        (VALID.replace("\"none\"", "\"maybe\""), "imap.security"),
        (VALID.replace("127.0.0.1:1110", "localhost"), "pop3.listen"),
        (
            format!("{VALID}[deletion]\nmode = \"move\"\nmove_to = \"INBOX\"\n"),
            "deletion.move_to",
        ),
        (
            VALID.replace("[pop3]", "[pop3]\nuidl_format = \"%g\""),
            "pop3.uidl_format",
        ),
        (
            VALID.replace("[pop3]", "[pop3]\nidle_timeout_secs = -5"),
            "pop3.idle_timeout_secs",
        ),
        ("[pop3\n".to_string(), "popbridge.toml"),
    ];
    for (text, key) in cases {
        let path = write(&dir, &text);
        let (code, _, err) = popbridge(&["check-config", "--config", &path]);
        assert_eq!(code, 2, "{text}");
        assert!(err.contains(&path), "error must name the file: {err}");
        assert!(err.contains(key), "error must name {key}: {err}");
    }
    let (code, _, err) = popbridge(&["check-config", "--config", "/nonexistent/p.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/p.toml"));
}

#[test]
fn serve_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &VALID.replace("[imap]", "[imap]\nprot = 143"));
    let (code, _, err) = popbridge(&["serve", "--config", &path]);
    assert_eq!(code, 2);
    assert!(err.contains("prot"), "{err}");
}

#[test]
fn check_config_reads_the_routing_file_and_names_the_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.csv");
    std::fs::write(&routes, "# wave 1\nalice@example.org,imap,%n\n").unwrap();
    let text = format!("{VALID}[routing]\nfile = \"{}\"\n", routes.display());
    let path = write(&dir, &text);
    let (code, out, err) = popbridge(&["check-config", "--config", &path]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid"), "{out}");
    std::fs::write(&routes, "# wave 1\nalice@example.org,imap,%n\nbob,legacy\n").unwrap();
    let (code, _, err) = popbridge(&["check-config", "--config", &path]);
    assert_eq!(code, 2);
    let want = format!("{}:3: backend \"legacy\" is not defined", routes.display());
    assert!(err.contains(&want), "{err}");
}
