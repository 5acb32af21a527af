//! Conntrack lookups, the writes that record a new flow, and the flow lifecycle: each packet of
//! a known flow pushes its entry's expiry on by the timeout of the flow's state; the few events
//! that change the state (the first reply, a FIN, a RST) are written to both entries.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
};
use lb_common::{
    IPPROTO_TCP,
    conntrack::{
        CT_KIND_FORWARD, CT_KIND_REPLY, CT_S_FIN_FORWARD, CT_S_FIN_REPLY, CT_S_REPLIED, CT_S_RST,
        CtEntry, CtTimeouts, FlowKey, mono_seconds, partner_key, timeout_s,
    },
};

use crate::{
    family::Family,
    headers::{TCP_FLAG_FIN, TCP_FLAG_RST},
    maps::{NewFlowScratch, lookup_lru, node_config},
};

/// Monotonic seconds, the clock of `CtEntry::created_s` / `expires_s`. The coarse clock (the
/// same CLOCK_MONOTONIC, at tick resolution) is enough for seconds and cheaper to read.
#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: a helper without arguments or side effects.
    mono_seconds(unsafe { bpf_ktime_get_coarse_ns() })
}

/// The timeouts the agent configured (defaults until it has written any).
#[inline(always)]
pub fn timeouts() -> CtTimeouts {
    let t = node_config().timeouts;
    if t.udp_s == 0 { CtTimeouts::DEFAULT } else { t }
}

#[inline(always)]
pub fn lookup<A: Family>(flow: &FlowKey<A>) -> Option<CtEntry<A>> {
    lookup_lru(A::conntrack(), flow)
}

/// Whether the flow `key`'s entry belongs to is alive: this entry or its partner unexpired.
#[inline(always)]
pub fn flow_alive<A: Family>(key: &FlowKey<A>, entry: &CtEntry<A>, now: u32) -> bool {
    !entry.expired(now) || lookup(&partner_key(key, entry)).is_some_and(|p| !p.expired(now))
}

/// `entry` (found for `flow`) and the time, if its flow is alive; a dead flow's entries count
/// as absent. The clock is read only once an entry was found.
#[inline(always)]
pub fn live<A: Family>(flow: &FlowKey<A>, entry: CtEntry<A>) -> Option<(CtEntry<A>, u32)> {
    let now = now_s();
    flow_alive(flow, &entry, now).then_some((entry, now))
}

/// Records one packet of `flow` (whose entry is `entry`): the flow's state from its TCP flags and
/// direction, and the entry's expiry. Returns the entry as updated.
#[inline(always)]
pub fn seen<A: Family>(
    flow: &FlowKey<A>,
    entry: &CtEntry<A>,
    tcp_flags: u8,
    now: u32,
) -> CtEntry<A> {
    let mut state = entry.state;
    if entry.kind == CT_KIND_REPLY {
        state |= CT_S_REPLIED;
    }
    if flow.proto == IPPROTO_TCP {
        if tcp_flags & TCP_FLAG_FIN != 0 {
            state |= if entry.kind == CT_KIND_FORWARD {
                CT_S_FIN_FORWARD
            } else {
                CT_S_FIN_REPLY
            };
        }
        if tcp_flags & TCP_FLAG_RST != 0 {
            state |= CT_S_RST;
        }
    }
    let t = timeouts();
    let expires_s = now.saturating_add(timeout_s(flow.proto, state, &t));
    let mut updated = *entry;
    updated.state = state;
    updated.expires_s = expires_s;
    if state != entry.state {
        // A once-per-flow event: both entries learn it and take the new state's timeout (which
        // shortens both on a FIN or RST).
        write(flow, state, expires_s);
        let partner = partner_key(flow, entry);
        if let Some(p) = lookup(&partner) {
            write(&partner, p.state | state, expires_s);
        }
    } else if expires_s != entry.expires_s {
        // At most one write per entry and second: the expiry moves in whole seconds.
        write(flow, state, expires_s);
    }
    updated
}

#[inline(always)]
fn write<A: Family>(key: &FlowKey<A>, state: u8, expires_s: u32) {
    if let Some(ptr) = A::conntrack().get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup and stays valid for this run (an
        // LRU element is freed only after an RCU grace period). Two CPUs writing one flow at once
        // race benignly: each writes whole fields, and the last state or expiry wins.
        unsafe {
            (*ptr).state = state;
            (*ptr).expires_s = expires_s;
        }
    }
}

/// Forgets the entry at `key`.
#[inline(always)]
pub fn remove<A: Family>(key: &FlowKey<A>) {
    let _ = A::conntrack().remove(key);
}

/// Forgets a flow's other entry (when its backend left and the flow is balanced afresh).
#[inline(always)]
pub fn remove_partner<A: Family>(flow: &FlowKey<A>, entry: &CtEntry<A>) {
    let _ = A::conntrack().remove(&partner_key(flow, entry));
}

/// Records the reply direction of the flow `owner` (`ws.reply` at `ws.reply_key`), unless
/// another live flow holds that tuple: a free tuple, one whose flow is dead, and one `owner`
/// itself held before are taken; a live entry of another flow is never overwritten (its replies
/// would be translated for the wrong flow).
#[inline(always)]
pub fn claim_reply<A: Family>(
    ws: &mut NewFlowScratch<A>,
    owner: &FlowKey<A>,
    now: u32,
) -> Result<(), i32> {
    let map = A::conntrack();
    if map
        .insert(&ws.reply_key, &ws.reply, BPF_NOEXIST as u64)
        .is_ok()
    {
        return Ok(());
    }
    let Some(old) = map.get_ptr(&ws.reply_key) else {
        // Gone meanwhile (LRU): try once more.
        return map.insert(&ws.reply_key, &ws.reply, BPF_NOEXIST as u64);
    };
    // SAFETY: from a successful lookup, valid for this run (LRU elements are freed after an RCU
    // grace period); read field by field, never kept.
    let (takeable, old_expired) = unsafe {
        ws.partner_key = partner_key(&ws.reply_key, &*old);
        (ws.partner_key == *owner, (*old).expired(now))
    };
    // A dead flow's tuple is free: this entry and its partner both expired.
    let partner_expired = || match map.get_ptr(&ws.partner_key) {
        // SAFETY: as above.
        Some(p) => unsafe { (*p).expired(now) },
        None => true,
    };
    if takeable || (old_expired && partner_expired()) {
        map.insert(&ws.reply_key, &ws.reply, BPF_ANY as u64)
    } else {
        Err(-1)
    }
}

#[inline(always)]
pub fn insert_forward<A: Family>(key: &FlowKey<A>, entry: &CtEntry<A>) -> Result<(), i32> {
    A::conntrack().insert(key, entry, BPF_ANY as u64)
}
