//! The Debian package, built by cargo-deb from a popbridge already built (the tests' own, so
//! nothing is compiled again) and unpacked into a private root: what the package holds, run
//! from where it puts it, without touching the machine's dpkg database.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::repo_root;
use crate::tools::have;

const INSTALL_HINT: &str =
    "run scripts/test, which installs it (or: cargo install cargo-deb --locked)";

/// Panics (never skips) unless `cargo deb` and `dpkg-deb` are there.
pub fn require_cargo_deb() {
    assert!(have("dpkg-deb"), "dpkg-deb is not installed");
    let ok = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "cargo-deb is not installed: {INSTALL_HINT}");
}

/// A built and unpacked package; its directory goes away on drop.
pub struct DebPackage {
    /// The `.deb` file.
    pub deb: PathBuf,
    /// Where `dpkg-deb -x` unpacked it: `usr/bin/popbridge`, `usr/lib/systemd/system/...`.
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl DebPackage {
    /// `cargo deb --no-build` with `bin` standing in for the release build (the package's
    /// metadata in Cargo.toml decides everything else), then `dpkg-deb -x`. Panics with
    /// cargo-deb's output if it fails.
    pub fn build(bin: &Path) -> DebPackage {
        require_cargo_deb();
        let repo = repo_root();
        // Under target/, on the binary's file system: a hard link, not a 100 MB copy.
        let target = repo.join("target");
        fs::create_dir_all(&target).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("deb-")
            .tempdir_in(&target)
            .expect("temp dir under target/");
        let release = dir.path().join("cargo/release");
        fs::create_dir_all(&release).unwrap();
        let staged = release.join("popbridge");
        if fs::hard_link(bin, &staged).is_err() {
            fs::copy(bin, &staged).expect("stage the popbridge binary");
        }
        let out_dir = dir.path().join("out");
        let out = Command::new("cargo")
            .args(["deb", "--no-build", "--fast", "--manifest-path"])
            .arg(repo.join("Cargo.toml"))
            .arg("--output")
            .arg(&out_dir)
            .env("CARGO_TARGET_DIR", dir.path().join("cargo"))
            .output()
            .expect("run cargo deb");
        assert!(
            out.status.success(),
            "cargo deb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deb = fs::read_dir(&out_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .expect("cargo deb wrote no .deb");
        let root = dir.path().join("root");
        let x = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .output()
            .expect("run dpkg-deb -x");
        assert!(
            x.status.success(),
            "dpkg-deb -x: {}",
            String::from_utf8_lossy(&x.stderr)
        );
        DebPackage {
            deb,
            root,
            _dir: dir,
        }
    }

    /// `dpkg-deb ARGS DEB`'s standard output (`--info`, `--contents`, `--field`).
    pub fn dpkg_deb(&self, args: &[&str]) -> String {
        let out = Command::new("dpkg-deb")
            .args(args)
            .arg(&self.deb)
            .output()
            .expect("run dpkg-deb");
        assert!(
            out.status.success(),
            "dpkg-deb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The packaged `popbridge`.
    pub fn bin(&self) -> PathBuf {
        self.root.join("usr/bin/popbridge")
    }
}
