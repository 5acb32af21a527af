//! The few raw `bpf(2)` calls the testbed's own tiny XDP programs need (a do-nothing program for
//! the switch ports, the packet generator's redirect). They are a handful of instructions each,
//! so they are assembled here rather than built and linked as BPF objects.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::Context as _;

pub const BPF_PROG_LOAD: libc::c_long = 5;
pub const BPF_OBJ_PIN: libc::c_long = 6;
pub const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_XDP: u32 = 6;

/// One `struct bpf_insn` (code, dst and src registers, offset, immediate) as the kernel reads
/// it on a little-endian machine.
pub const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst as u64 | (src as u64) << 4) << 8)
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

/// `dst = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
pub const fn mov64_imm(dst: u8, imm: i32) -> u64 {
    insn(0xb7, dst, 0, 0, imm)
}

/// `call helper` (BPF_JMP | BPF_CALL).
pub const fn call(helper: i32) -> u64 {
    insn(0x85, 0, 0, 0, helper)
}

/// `exit` (BPF_JMP | BPF_EXIT).
pub const EXIT: u64 = insn(0x95, 0, 0, 0, 0);

/// `bpf(cmd, attr)`; `attr` is the zero-padded `union bpf_attr` for `cmd`.
pub fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed, laid out as the kernel's
    // `union bpf_attr` for `cmd`; any pointers in it point at live values of the caller.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Loads `program` as an XDP program (GPL, so it may call any helper).
pub fn load_xdp(program: &[u64]) -> anyhow::Result<OwnedFd> {
    load_program(BPF_PROG_TYPE_XDP, program)
}

/// Loads `program` as a program of type `kind` (`BPF_PROG_TYPE_*`), GPL.
pub fn load_program(kind: u32, program: &[u64]) -> anyhow::Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&kind.to_ne_bytes());
    attr[4..8].copy_from_slice(&(program.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(program.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading a BPF program")?;
    // SAFETY: BPF_PROG_LOAD returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One `BPF_PROG_TEST_RUN`: the fields of `union bpf_attr`'s `test` member the testbed sets.
#[derive(Default)]
pub struct TestRun<'a> {
    pub data_in: &'a [u8],
    /// Where the kernel writes the packet as the program left it.
    pub data_out: Option<&'a mut [u8]>,
    /// The program's context (`struct xdp_md`, `struct __sk_buff`), as bytes.
    pub ctx_in: Option<&'a [u8]>,
    pub repeat: u32,
    pub flags: u32,
    /// Frames per batch in live-frames mode.
    pub batch_size: u32,
}

impl TestRun<'_> {
    /// Runs `program`: (its last verdict, the mean kernel time of a run in nanoseconds).
    pub fn run(self, program: &OwnedFd) -> std::io::Result<(u32, u32)> {
        let mut attr = [0u8; 128];
        let mut put = |at: usize, bytes: &[u8]| attr[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(program.as_raw_fd() as u32).to_ne_bytes());
        put(8, &(self.data_in.len() as u32).to_ne_bytes());
        put(16, &(self.data_in.as_ptr() as u64).to_ne_bytes());
        if let Some(out) = self.data_out {
            put(12, &(out.len() as u32).to_ne_bytes());
            put(24, &(out.as_mut_ptr() as u64).to_ne_bytes());
        }
        put(32, &self.repeat.to_ne_bytes());
        if let Some(ctx) = self.ctx_in {
            put(40, &(ctx.len() as u32).to_ne_bytes());
            put(48, &(ctx.as_ptr() as u64).to_ne_bytes());
        }
        put(64, &self.flags.to_ne_bytes());
        put(72, &self.batch_size.to_ne_bytes());
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        let field = |at: usize| u32::from_ne_bytes(attr[at..at + 4].try_into().expect("4 bytes"));
        Ok((field(4), field(36)))
    }
}

/// `BPF_PROG_TEST_RUN` of `program` over `packet`, `repeat` times: (the last verdict, the mean
/// kernel time of a run in nanoseconds).
pub fn test_run(program: &OwnedFd, packet: &[u8], repeat: u32) -> std::io::Result<(u32, u32)> {
    TestRun {
        data_in: packet,
        repeat,
        ..TestRun::default()
    }
    .run(program)
}

/// A `struct xdp_md` for a `len`-byte packet arriving on `ifindex` (0: none), as bytes.
pub fn xdp_context(len: usize, ifindex: u32) -> Vec<u8> {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    [0, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|field| field.to_ne_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // From `llvm-objdump -d` of `r1 = 7; call 23; exit`.
        assert_eq!(
            mov64_imm(1, 7).to_le_bytes(),
            [0xb7, 0x01, 0, 0, 7, 0, 0, 0]
        );
        assert_eq!(call(23).to_le_bytes(), [0x85, 0, 0, 0, 23, 0, 0, 0]);
        assert_eq!(EXIT.to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            insn(0x69, 2, 1, -2, 0).to_le_bytes(),
            [0x69, 0x12, 0xfe, 0xff, 0, 0, 0, 0]
        );
    }
}
