//! The few `bpf(2)` commands aya 0.14 does not wrap (batch lookups and deletes), as plain
//! structs and one syscall wrapper. Layouts follow `union bpf_attr` in include/uapi/linux/bpf.h.

pub const BPF_MAP_CREATE: libc::c_int = 0;
pub const BPF_OBJ_PIN: libc::c_int = 6;
pub const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
pub const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
pub const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
pub const BPF_MAP_LOOKUP_BATCH: libc::c_int = 24;
pub const BPF_MAP_UPDATE_BATCH: libc::c_int = 26;
pub const BPF_MAP_DELETE_BATCH: libc::c_int = 27;

/// `union bpf_attr`'s map-creation member, as far as lb sets it (tests and benchmarks create
/// maps of their own; the rest of the member is zero).
#[repr(C)]
#[derive(Default)]
pub struct CreateMapAttr {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

/// `union bpf_attr`'s object-pinning member (`pathname`: a NUL-terminated path).
#[repr(C)]
pub struct PinAttr {
    pub pathname: u64,
    pub bpf_fd: u32,
    pub file_flags: u32,
}

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// `union bpf_attr`'s element-operation member (`value` is `next_key` for GET_NEXT_KEY).
#[repr(C)]
pub struct ElemAttr {
    pub map_fd: u32,
    pub _pad: u32,
    pub key: u64,
    pub value: u64,
    pub flags: u64,
}

/// `bpf(cmd, attr, sizeof attr)`; negative with errno set on failure.
///
/// # Safety
/// `attr` must be the bpf_attr member `cmd` reads, and every pointer in it must point at a live
/// buffer as large as the command will read or write (`count` entries for batches).
pub unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> libc::c_long {
    // SAFETY: the caller guarantees the attribute and its buffers; the size passed is exact.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    }
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call.
pub const BATCH: u32 = 4096;

/// Every entry of the (non-per-CPU) hash map `fd`, read `BATCH` at a time with
/// `BPF_MAP_LOOKUP_BATCH`: one syscall per 4,096 entries where aya's iterator makes two per
/// entry.
pub fn lookup_all<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<Vec<(K, V)>> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: `aya::Pod` types are plain integers and arrays of them: all zeros is a value.
    let (zero_key, zero_value): (K, V) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut out = Vec::new();
    let mut keys = vec![zero_key; BATCH as usize];
    let mut values = vec![zero_value; BATCH as usize];
    let mut in_batch = 0u64;
    let mut out_batch = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut in_batch as *mut u64 as u64
            },
            out_batch: &mut out_batch as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the batch buffers hold `BATCH` keys and values of the map's sizes (the caller
        // names the map's own key and value types); the batch cursors are u64s.
        let rc = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match err {
            None => {}
            // ENOENT: this was the last batch.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
        in_batch = out_batch;
        first = false;
    }
}
