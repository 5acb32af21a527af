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
