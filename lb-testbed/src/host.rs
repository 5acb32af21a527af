//! Host facts the testbed, setup and tests share.

use std::process::Command;

use anyhow::bail;

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (it is not at boot on some
/// machines). Needs root; a no-op when already mounted.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounted = nix::sys::statfs::statfs("/sys/fs/bpf")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if mounted {
        return Ok(());
    }
    eprintln!("==> mounting bpffs at /sys/fs/bpf");
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()?;
    if !status.success() {
        bail!("`mount -t bpf bpf /sys/fs/bpf` failed ({status})");
    }
    Ok(())
}
