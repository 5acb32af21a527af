//! A do-nothing XDP program (`return XDP_PASS`) for the testbed's switch ports.
//!
//! A veth hands frames its peer sent with XDP_TX/XDP_REDIRECT to its NAPI ring, but only kicks
//! that ring promptly when it runs an XDP program itself (with GRO alone a frame can sit there
//! until unrelated traffic arrives). A physical switch has no such quirk; this program makes the
//! testbed's veth switch ports behave like one for the nodes' XDP fast path.

use std::{ffi::CString, path::Path};

use anyhow::Context as _;

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_PASS: u64 = 2;
/// `r0 = XDP_PASS; exit` as `struct bpf_insn`s: code, registers, offset, immediate (LE).
const PROGRAM: [u64; 2] = [0xb7 | XDP_PASS << 32, 0x95];

/// `bpf(cmd, attr)`; `attr` is the zero-padded `union bpf_attr` for `cmd`.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed, laid out as the kernel's
    // `union bpf_attr` for `cmd`; any pointers in it point at live values of the caller.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Attaches the XDP_PASS program to `ifname` in `ns` (native mode), pinning it at `pin` only
/// while `ip` attaches it.
pub fn attach(ns: &Netns, ifname: &str, pin: &Path) -> anyhow::Result<()> {
    let license = CString::new("GPL").expect("no NUL");
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&(PROGRAM.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(PROGRAM.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the XDP_PASS program")? as u32;

    let path = CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&fd.to_ne_bytes());
    let pinned = bpf(BPF_OBJ_PIN, &mut attr);
    // SAFETY: closing the program descriptor this function opened; the pin keeps it alive.
    unsafe { libc::close(fd as i32) };
    pinned.with_context(|| format!("pinning the XDP_PASS program at {}", pin.display()))?;

    let attached = ns.ip_keeping_mounts(&[
        "link",
        "set",
        "dev",
        ifname,
        "xdpdrv",
        "pinned",
        &pin.to_string_lossy(),
    ]);
    let _ = std::fs::remove_file(pin);
    attached.with_context(|| format!("attaching XDP_PASS to {ifname}"))
}
