//! Per-Service and per-backend counters, and the monitor's events, recorded by the entry points
//! with the node-wide counters (see `outcome`). Only Service traffic reaches here: a translated
//! packet (its conntrack entry names the frontend and the backend) or a new flow refused.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, maps::PerCpuHashMap};
use lb_common::{
    conntrack::{CT_F_SNAT, CT_KIND_FORWARD, CtEntry, FlowKey},
    counters::Counter,
    stats::{BackendStats, EVENT_DROP, EVENT_NEW_FLOW, MonitorEvent, ServiceStats},
};

use crate::{
    family::Family,
    maps::{LB_BACKEND_STATS, LB_EVENTS, LB_MONITOR, LB_MONITOR_BUDGET, LB_SERVICE_STATS},
};

/// The Service traffic a packet was: what the counters and the monitor need of it.
///
/// Copied, not borrowed: references made the compiler keep the flow and the decision in stack
/// memory instead of registers, which cost 10-20% on every packet. And every byte is written
/// (no `Option` payloads): the verifier refuses to copy stack bytes never written.
#[derive(Clone, Copy)]
pub struct Attributed<A> {
    /// The packet's flow as it arrived.
    pub flow: FlowKey<A>,
    /// The conntrack entry it was translated by; for a refused new flow, only `service_id` is
    /// set.
    pub ct: CtEntry<A>,
    /// The flow started with this packet.
    pub new_flow: bool,
    /// `stats::ORIGIN_*`.
    pub origin: u8,
}

/// Adds the packet (`bytes` long) to its frontend's and backend's counters; a new or refused
/// flow also goes to the monitor. `counter` is `None` when XDP hands the packet on to tc, which
/// counts it: only a flow XDP started is recorded then (tc sees it as known).
#[inline(always)]
pub fn record<A: Family>(a: &Attributed<A>, counter: Option<Counter>, bytes: u64) {
    if counter.is_none() && !a.new_flow {
        return;
    }
    let Some(service) = service_stats(a.ct.service_id) else {
        return;
    };
    match counter {
        None => {
            // SAFETY: pointers from successful per-CPU lookups, valid for this run; only this
            // CPU writes its copy.
            unsafe {
                (*service).new_flows += 1;
                if let Some(backend) = backend_stats(a.ct.backend_id) {
                    (*backend).new_flows += 1;
                }
            }
            monitor(a, EVENT_NEW_FLOW, Counter::Translated);
        }
        Some(counter @ (Counter::Translated | Counter::ReverseTranslated)) => {
            let forward = a.ct.kind == CT_KIND_FORWARD;
            // SAFETY: pointers from successful per-CPU lookups, valid for this run; only this
            // CPU writes its copy.
            unsafe {
                if forward {
                    (*service).forward_packets += 1;
                    (*service).forward_bytes += bytes;
                } else {
                    (*service).reply_packets += 1;
                    (*service).reply_bytes += bytes;
                }
                if a.new_flow {
                    (*service).new_flows += 1;
                }
                if let Some(backend) = backend_stats(a.ct.backend_id) {
                    if forward {
                        (*backend).forward_packets += 1;
                        (*backend).forward_bytes += bytes;
                    } else {
                        (*backend).reply_packets += 1;
                        (*backend).reply_bytes += bytes;
                    }
                    if a.new_flow {
                        (*backend).new_flows += 1;
                    }
                }
            }
            if a.new_flow {
                monitor(a, EVENT_NEW_FLOW, counter);
            }
        }
        Some(counter @ (Counter::DroppedNoBackend | Counter::Rejected)) => {
            // SAFETY: as above.
            unsafe { (*service).no_backend += 1 };
            monitor(a, EVENT_DROP, counter);
        }
        Some(counter @ Counter::DroppedSourceRange) => {
            // SAFETY: as above.
            unsafe { (*service).denied_source_range += 1 };
            monitor(a, EVENT_DROP, counter);
        }
        Some(counter @ Counter::SnatFailed) => {
            // SAFETY: as above.
            unsafe { (*service).snat_failed += 1 };
            monitor(a, EVENT_DROP, counter);
        }
        _ => {}
    }
}

/// This CPU's counters of frontend or backend `id` in `map`, created on its first packet.
#[inline(always)]
fn counters<V: Default>(map: &PerCpuHashMap<u32, V>, id: u32) -> Option<*mut V> {
    if let Some(found) = map.get_ptr_mut(id) {
        return Some(found);
    }
    // Full (more ids than the map holds cannot happen: it is sized like the map of what it
    // counts) or raced by another CPU: the lookup after it tells.
    let _ = map.insert(id, V::default(), BPF_NOEXIST as u64);
    map.get_ptr_mut(id)
}

#[inline(always)]
fn service_stats(id: u32) -> Option<*mut ServiceStats> {
    counters(&LB_SERVICE_STATS, id)
}

#[inline(always)]
fn backend_stats(id: u32) -> Option<*mut BackendStats> {
    counters(&LB_BACKEND_STATS, id)
}

/// Writes an event for `lb monitor` if one listens and this CPU's budget for the second allows.
#[inline(always)]
fn monitor<A: Family>(a: &Attributed<A>, kind: u8, reason: Counter) {
    let Some(config) = LB_MONITOR.get(0) else {
        return;
    };
    if config.enabled_until_ns == 0 {
        return;
    }
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= config.enabled_until_ns {
        return;
    }
    let Some(budget) = LB_MONITOR_BUDGET.get_ptr_mut(0) else {
        return;
    };
    let second = now / 1_000_000_000;
    // SAFETY: a per-CPU element from a successful lookup; only this CPU touches it.
    unsafe {
        if (*budget).second != second {
            (*budget).second = second;
            (*budget).sent = 0;
        }
        if (*budget).sent >= config.events_per_s {
            (*budget).lost = (*budget).lost.wrapping_add(1);
            return;
        }
        (*budget).sent += 1;
    }
    let Some(mut entry) = LB_EVENTS.reserve::<MonitorEvent>(0) else {
        // SAFETY: as above.
        unsafe { (*budget).lost = (*budget).lost.wrapping_add(1) };
        return;
    };
    // Only a new flow names its backend and where it goes.
    let new_flow = kind == EVENT_NEW_FLOW;
    let (f, ct) = (&a.flow, &a.ct);
    // Written in place in the ring (not built on the stack and copied): the event is 80 bytes.
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to the reserved, exclusively ours, `MonitorEvent`-sized record;
    // every field is written before it is submitted.
    unsafe {
        (*event).time_ns = now;
        (*event).flow = FlowKey::new(
            f.saddr_be.to_wide(),
            f.daddr_be.to_wide(),
            f.sport_be,
            f.dport_be,
            f.proto,
        );
        (*event).service_id = ct.service_id;
        (*event).backend_id = if new_flow { ct.backend_id } else { 0 };
        (*event).new_daddr_be = if new_flow {
            ct.new_daddr_be.to_wide()
        } else {
            [0; 4]
        };
        (*event).new_dport_be = if new_flow { ct.new_dport_be } else { 0 };
        (*event).kind = kind;
        (*event).reason = reason as u8;
        (*event).origin = a.origin;
        (*event).snat = u8::from(new_flow && ct.flags & CT_F_SNAT != 0);
        (*event)._pad = [0; 2];
    }
    entry.submit(0);
}
