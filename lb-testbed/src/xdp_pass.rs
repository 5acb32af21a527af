//! A do-nothing XDP program (`return XDP_PASS`) for the testbed's switch ports.
//!
//! A veth hands frames its peer sent with XDP_TX/XDP_REDIRECT to its NAPI ring, but only kicks
//! that ring promptly when it runs an XDP program itself (with GRO alone a frame can sit there
//! until unrelated traffic arrives). A physical switch has no such quirk; this program makes the
//! testbed's veth switch ports behave like one for the nodes' XDP fast path.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::Context as _;

use crate::{
    bpf_syscall::{BPF_OBJ_PIN, EXIT, bpf, load_xdp, mov64_imm},
    netns::Netns,
};

const XDP_PASS: i32 = 2;

/// Attaches the XDP_PASS program to `ifname` in `ns` (native mode), pinning it at `pin` only
/// while `ip` attaches it.
pub fn attach(ns: &Netns, ifname: &str, pin: &Path) -> anyhow::Result<()> {
    let program = load_xdp(&[mov64_imm(0, XDP_PASS), EXIT]).context("the XDP_PASS program")?;
    attach_program(ns, ifname, &program, pin)
}

/// Attaches a loaded XDP `program` to `ifname` in `ns` (native mode, replacing any), pinning it
/// at `pin` only while `ip` attaches it.
pub fn attach_program(
    ns: &Netns,
    ifname: &str,
    program: &OwnedFd,
    pin: &Path,
) -> anyhow::Result<()> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr)
        .with_context(|| format!("pinning an XDP program at {}", pin.display()))?;

    let attached = ns.ip_keeping_mounts(&[
        "-force",
        "link",
        "set",
        "dev",
        ifname,
        "xdpdrv",
        "pinned",
        &pin.to_string_lossy(),
    ]);
    let _ = std::fs::remove_file(pin);
    attached.with_context(|| format!("attaching an XDP program to {ifname}"))
}
