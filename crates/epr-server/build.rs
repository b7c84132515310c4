//! Build facts for `epr_build_info` and the start-up line: the git commit (or
//! `EPR_GIT_COMMIT` when building outside a git checkout) and the compiler version.

use std::process::Command;

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=EPR_GIT_COMMIT");
    let commit = std::env::var("EPR_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| output("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild when HEAD moves: HEAD itself (branch switches) and the ref it points to.
    // Only existing files: cargo reruns the script on every build for a missing one.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(output("git", &["symbolic-ref", "-q", "HEAD"]));
    for path in watched {
        if let Some(p) = output("git", &["rev-parse", "--git-path", &path]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = output(&rustc, &["--version"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EPR_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=EPR_RUSTC_VERSION={rustc_version}");
}
