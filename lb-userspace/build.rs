//! Builds the eBPF object (lb-ebpf, for bpfel-unknown-none with the nightly toolchain) so that a
//! plain `cargo build` of the agent embeds an up-to-date packet path.

use std::{env, path::PathBuf};

/// Puts the commit being built into `LB_GIT_COMMIT` for `lb --version` ("unknown" outside a git
/// checkout, e.g. from a source tarball).
fn git_commit() {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let commit = std::process::Command::new("git")
        .args(["-C", repo, "rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=LB_GIT_COMMIT={commit}");
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        let path = PathBuf::from(repo).join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn main() -> anyhow::Result<()> {
    git_commit();
    // `cargo xtask setup` builds bpf-linker against the nightly's own LLVM and links it here.
    let tools_dir = env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/lb-xtask/bin"))
        .filter(|dir| dir.join("bpf-linker").exists());
    if let Some(dir) = tools_dir {
        let mut paths = vec![dir.clone()];
        paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        let path = env::join_paths(paths)?;
        // SAFETY: build scripts are single-threaded here; nothing reads the environment concurrently.
        unsafe { env::set_var("PATH", path) };
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("bpf-linker").display()
        );
    }
    let has_linker = env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .any(|dir| dir.join("bpf-linker").is_file());
    if !has_linker && env::var_os("AYA_BUILD_SKIP").is_none() {
        anyhow::bail!(
            "bpf-linker not found: run `cargo xtask setup` (it builds one against the nightly \
             toolchain's LLVM) or put a compatible bpf-linker on PATH"
        );
    }
    // lb-common is compiled into the eBPF object too.
    println!("cargo:rerun-if-changed=../lb-common/src");
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
