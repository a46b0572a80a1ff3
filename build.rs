//! Build script: the commit the binary is built from, for `popbridge --version` and the
//! `commit` label of `popbridge_build_info`. From `POPBRIDGE_COMMIT` when set (a packager
//! building from a tarball), else from git; `unknown` outside a git checkout.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=POPBRIDGE_COMMIT");
    let commit = match std::env::var("POPBRIDGE_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it points to (a
            // commit) and packed-refs. In a worktree HEAD lives in the worktree's git dir and
            // the branches in the common one.
            if let (Some(dir), Some(common)) = (
                git(&["rev-parse", "--git-dir"]),
                git(&["rev-parse", "--git-common-dir"]),
            ) {
                let (dir, common) = (PathBuf::from(dir), PathBuf::from(common));
                let mut watched = vec![dir.join("HEAD"), common.join("packed-refs")];
                if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                    watched.push(common.join(branch));
                }
                // Only files that exist: cargo reruns the script every build for a missing one.
                for path in watched.iter().filter(|p| p.exists()) {
                    println!("cargo:rerun-if-changed={}", path.display());
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=POPBRIDGE_COMMIT={commit}");
}
