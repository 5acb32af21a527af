//! `cargo xtask setup`: everything a fresh machine needs before the eBPF object can be built.
//! Each check is cheap, so every other command runs this first.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The bpf-linker release known to build here (it offers features llvm-21, llvm-22, llvm-23).
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Where xtask keeps tools it builds: `~/.cache/lb-xtask`. lb-userspace's build.rs looks in
/// `bin/` there for bpf-linker.
pub fn tools_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/lb-xtask"))
}

pub fn ensure() -> anyhow::Result<()> {
    ensure_toolchain()?;
    ensure_bpffs()?;
    Ok(())
}

/// What building needs (nightly with rust-src, bpf-linker), without touching the host (e.g. in a
/// container image build).
pub fn ensure_toolchain() -> anyhow::Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()
}

fn ensure_nightly() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        crate::step("installing the nightly toolchain (the eBPF crate needs -Z build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        crate::step("adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The nightly's LLVM major version, read from `rustc -vV` (never assumed).
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let version = output("rustc", &["+nightly", "-vV"])?;
    version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.trim().parse().ok())
        .context("no LLVM version in `rustc +nightly -vV`")
}

/// bpf-linker must read the bitcode rustc's LLVM writes, so it is linked against the libLLVM that
/// ships inside the nightly toolchain (Debian's LLVM is far older). See shared/TOOLCHAIN.md.
fn ensure_bpf_linker() -> anyhow::Result<()> {
    let major = nightly_llvm_major()?;
    let tools = tools_dir()?;
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&sysroot_lib)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", sysroot_lib.display()))?;
    // bpf-linker keeps an rpath to this prefix: `libLLVM.so` is what its build links against,
    // the versioned name is what the loader looks for at run time. Refreshed every time, so a
    // moved toolchain never leaves a dangling link.
    let prefix = tools.join(format!("llvm-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let soname = libllvm.file_name().expect("a file name").to_owned();
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname.as_os_str()] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }

    let link = tools.join("bin/bpf-linker");
    let stamp = tools.join("bin/bpf-linker.llvm");
    let stamped = std::fs::read_to_string(&stamp).ok();
    let works = Command::new(&link)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && stamped.as_deref() == Some(major.to_string().as_str()) {
        return Ok(());
    }
    crate::step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute, once)"
    ));
    let root = tools.join(format!("bpf-linker-llvm{major}"));
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
            "--root",
        ])
        .arg(&root)
        .env("LLVM_PREFIX", &prefix))?;
    std::fs::create_dir_all(tools.join("bin"))?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(root.join("bin/bpf-linker"), &link)?;
    std::fs::write(&stamp, major.to_string())?;
    Ok(())
}

/// Mounts bpffs when running as root and it is not mounted yet.
fn ensure_bpffs() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(());
    }
    lb_testbed::host::ensure_bpffs()
}
