//! What a conntrack sweep costs at 1M entries, and why it reads in batches.
//!
//!     cargo bench -p lb-userspace --bench conntrack_sweep              (as root)
//!     cargo bench -p lb-userspace --bench conntrack_sweep -- 1048576 5 (entries, rounds)
//!
//! Creates an LRU hash of the conntrack's key and value types (not attached to anything), fills
//! it with N entries of which half belong to dead flows, and times, per round: the agent's sweep
//! (BPF_MAP_LOOKUP_BATCH, the dead-flow rule, a re-check of each dead entry and
//! BPF_MAP_DELETE_BATCH) from a full map, and for
//! comparison a plain walk with BPF_MAP_GET_NEXT_KEY + BPF_MAP_LOOKUP_ELEM (two syscalls an
//! entry, what `aya`'s map iterator does). Medians with min-max, as this machine is shared.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use lb_common::{
    IPPROTO_TCP,
    conntrack::{CT_KIND_FORWARD, CT_KIND_REPLY, CtEntry, FlowKey, partner_key},
};
use lb_userspace::{
    bpf_sys::{
        BPF_MAP_CREATE, BPF_MAP_GET_NEXT_KEY, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_BATCH, BatchAttr,
        CreateMapAttr, ElemAttr, bpf,
    },
    conntrack::{delete_unchanged, examine, now_s, read_all},
};

const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

fn create_map(entries: u32) -> OwnedFd {
    let mut attr = CreateMapAttr {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<CtEntry>() as u32,
        max_entries: entries,
        map_flags: 0,
    };
    // SAFETY: a map-creation attribute without pointers.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor the kernel just returned, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// `flows` flows (two entries each); every other flow expired 10 s ago.
fn entries(flows: u32) -> Vec<(FlowKey, CtEntry)> {
    let now = now_s();
    let mut out = Vec::with_capacity(flows as usize * 2);
    for i in 0..flows {
        let client = 0x0a_f4_00_00u32.wrapping_add(i / 60_000).to_be();
        let sport = (1024 + i % 60_000) as u16;
        let key = FlowKey::new(
            client,
            0x0a60_000a_u32.to_be(),
            sport.to_be(),
            80u16.to_be(),
            IPPROTO_TCP,
        );
        let expires_s = if i % 2 == 0 { now - 10 } else { now + 3600 };
        let forward = CtEntry {
            new_saddr_be: client,
            new_daddr_be: 0x0af4_0a0b_u32.to_be(),
            new_sport_be: sport.to_be(),
            new_dport_be: 8080u16.to_be(),
            kind: CT_KIND_FORWARD,
            flags: 0,
            state: 0,
            _pad: 0,
            service_id: 1,
            backend_id: 1,
            created_s: now - 20,
            expires_s,
        };
        let reply = CtEntry {
            new_saddr_be: key.daddr_be,
            new_daddr_be: client,
            new_sport_be: key.dport_be,
            new_dport_be: key.sport_be,
            kind: CT_KIND_REPLY,
            ..forward
        };
        out.push((partner_key(&key, &forward), reply));
        out.push((key, forward));
    }
    out
}

fn fill(fd: BorrowedFd<'_>, entries: &[(FlowKey, CtEntry)]) {
    for chunk in entries.chunks(8192) {
        let keys: Vec<FlowKey> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<CtEntry> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        assert_eq!(
            // SAFETY: `keys` and `values` hold `count` entries of the map's sizes.
            unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) },
            0,
            "BPF_MAP_UPDATE_BATCH: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The walk `aya`'s iterator does: next key, then its value, one syscall each.
fn walk_one_by_one(fd: BorrowedFd<'_>) -> usize {
    let mut key: FlowKey = FlowKey::new(0, 0, 0, 0, 0);
    let mut next = key;
    let mut value = [0u8; size_of::<CtEntry>()];
    let mut first = true;
    let mut n = 0;
    loop {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: if first {
                0
            } else {
                &key as *const FlowKey as u64
            },
            value: &mut next as *mut FlowKey as u64,
            flags: 0,
        };
        // SAFETY: `key` and `next` are keys of the map's key size.
        if unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } != 0 {
            return n;
        }
        first = false;
        key = next;
        let mut lookup = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const FlowKey as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `key` is a key and `value` a buffer of the map's value size.
        if unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut lookup) } == 0 {
            n += 1;
        }
    }
}

fn median_min_max(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "{:>8.1} ms  ({:.1}-{:.1})",
        samples[samples.len() / 2].as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3
    )
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let size: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1 << 20);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("conntrack_sweep: needs root (BPF maps); skipped");
        return;
    }
    let all = entries(size / 2);
    let (mut read, mut decide, mut remove, mut walk) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let map = create_map(size);
        fill(map.as_fd(), &all);
        let t = Instant::now();
        assert_eq!(walk_one_by_one(map.as_fd()), all.len());
        walk.push(t.elapsed());
        let t = Instant::now();
        let found = read_all::<u32>(map.as_fd()).expect("read");
        read.push(t.elapsed());
        assert_eq!(found.len(), all.len());
        let t = Instant::now();
        let (dead, _) = examine(&found, now_s());
        decide.push(t.elapsed());
        assert_eq!(dead.len(), all.len() / 2);
        let t = Instant::now();
        assert_eq!(
            delete_unchanged(map.as_fd(), &dead).expect("delete"),
            dead.len()
        );
        remove.push(t.elapsed());
    }
    let total: Vec<Duration> = (0..rounds)
        .map(|i| read[i] + decide[i] + remove[i])
        .collect();
    println!(
        "conntrack sweep of {} entries (half dead), {rounds} rounds, median (min-max):",
        all.len()
    );
    println!("  read, BPF_MAP_LOOKUP_BATCH      {}", median_min_max(read));
    println!(
        "  decide (dead-flow rule)         {}",
        median_min_max(decide)
    );
    println!(
        "  re-check, delete {:>7}      {}",
        all.len() / 2,
        median_min_max(remove)
    );
    println!(
        "  sweep total                     {}",
        median_min_max(total)
    );
    println!(
        "  for comparison: walk with GET_NEXT_KEY + LOOKUP_ELEM {}",
        median_min_max(walk)
    );
}
