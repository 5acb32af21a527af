//! Conntrack lookups and the writes that record a new flow.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::conntrack::{CtEntry, FlowKey};

use crate::maps::{LB_CONNTRACK, lookup_lru};

#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<CtEntry> {
    lookup_lru(&LB_CONNTRACK, flow)
}

/// Records the reply direction. `exclusive` fails if the tuple is taken (claiming a SNAT port).
#[inline(always)]
pub fn insert_reply(key: &FlowKey, entry: &CtEntry, exclusive: bool) -> Result<(), i32> {
    let flags = if exclusive { BPF_NOEXIST as u64 } else { 0 };
    LB_CONNTRACK.insert(key, entry, flags)
}

#[inline(always)]
pub fn insert_forward(key: &FlowKey, entry: &CtEntry) -> Result<(), i32> {
    LB_CONNTRACK.insert(key, entry, 0)
}
