//! Per-Service and per-backend traffic counters, and the monitor's event stream.
//!
//! Counters are per-CPU hash maps keyed by a frontend's `service_id` and by a `BackendId`, so a
//! packet adds to its own CPU's copy without atomics; user space sums the CPUs and names the
//! ids (the agent's state file). The packet path creates a counter on a frontend's or backend's
//! first packet; user space deletes those whose frontend or backend is no longer programmed.
//!
//! The monitor: while `lb monitor` runs it keeps [`MonitorConfig::enabled_until_ns`] a few
//! seconds ahead; the packet path then writes a [`MonitorEvent`] for each new flow and each
//! dropped one into a ring buffer, at most `events_per_s` a second per CPU. With nobody
//! listening the cost is one array lookup and a compare on new and dropped flows only.

use crate::{Ip6, conntrack::FlowKey, user_pod};

/// One frontend's traffic (a ClusterIP port, a NodePort on one node address...). "Forward" is
/// client to Service, "reply" is backend to client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceStats {
    pub forward_packets: u64,
    /// Bytes as the packet path saw them (the L2 frame).
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows this frontend started (a backend was chosen).
    pub new_flows: u64,
    /// New flows dropped or rejected because the frontend had no usable backend.
    pub no_backend: u64,
    /// New flows dropped by `loadBalancerSourceRanges`.
    pub denied_source_range: u64,
    /// New flows dropped because SNAT found no address or port.
    pub snat_failed: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 64);

/// One backend's traffic, over every frontend that sends it flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct BackendStats {
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
    #[cfg_attr(feature = "user", serde(skip))]
    pub _reserved: u64,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 48);

impl ServiceStats {
    /// The sum of two CPUs' (or two snapshots') counts.
    pub fn add(&mut self, o: &Self) {
        self.forward_packets = self.forward_packets.wrapping_add(o.forward_packets);
        self.forward_bytes = self.forward_bytes.wrapping_add(o.forward_bytes);
        self.reply_packets = self.reply_packets.wrapping_add(o.reply_packets);
        self.reply_bytes = self.reply_bytes.wrapping_add(o.reply_bytes);
        self.new_flows = self.new_flows.wrapping_add(o.new_flows);
        self.no_backend = self.no_backend.wrapping_add(o.no_backend);
        self.denied_source_range = self.denied_source_range.wrapping_add(o.denied_source_range);
        self.snat_failed = self.snat_failed.wrapping_add(o.snat_failed);
    }

    /// New flows dropped (or rejected), for any reason.
    pub const fn drops(&self) -> u64 {
        self.no_backend + self.denied_source_range + self.snat_failed
    }
}

impl BackendStats {
    pub fn add(&mut self, o: &Self) {
        self.forward_packets = self.forward_packets.wrapping_add(o.forward_packets);
        self.forward_bytes = self.forward_bytes.wrapping_add(o.forward_bytes);
        self.reply_packets = self.reply_packets.wrapping_add(o.reply_packets);
        self.reply_bytes = self.reply_bytes.wrapping_add(o.reply_bytes);
        self.new_flows = self.new_flows.wrapping_add(o.new_flows);
    }
}

/// The monitor's switch (the single entry of the monitor map), written by `lb monitor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MonitorConfig {
    /// Events are written while `bpf_ktime_get_ns()` is below this (CLOCK_MONOTONIC ns); a
    /// monitor that dies stops costing anything within seconds.
    pub enabled_until_ns: u64,
    /// Events a second per CPU at most; the rest are counted as lost in the budget.
    pub events_per_s: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<MonitorConfig>() == 16);

/// Each CPU's event budget for the current second (a per-CPU array of one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MonitorBudget {
    /// The second (`bpf_ktime_get_ns() / 1e9`) the count is for.
    pub second: u64,
    pub sent: u32,
    /// Events this CPU could not write since it started (over budget, or the ring was full).
    pub lost: u32,
}
const _: () = assert!(core::mem::size_of::<MonitorBudget>() == 16);

/// A new flow: `backend_id` got it.
pub const EVENT_NEW_FLOW: u8 = 1;
/// A new flow was dropped (or rejected); `reason` says why.
pub const EVENT_DROP: u8 = 2;

/// One monitor event, as the ring buffer carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns()` when it happened.
    pub time_ns: u64,
    /// The packet's flow as it arrived; either family in IPv6 form (IPv4 as `::ffff:a.b.c.d`),
    /// so one ring and one reader serve both.
    pub flow: FlowKey<Ip6>,
    pub service_id: u32,
    /// The chosen backend (new flows), else 0.
    pub backend_id: u32,
    /// Where the flow goes after translation (new flows), else unspecified.
    pub new_daddr_be: Ip6,
    pub new_dport_be: u16,
    /// `EVENT_*`.
    pub kind: u8,
    /// The [`crate::counters::Counter`] that counted the packet.
    pub reason: u8,
    /// Where the packet entered: [`ORIGIN_POD`], [`ORIGIN_EXTERNAL`] or [`ORIGIN_HOST`].
    pub origin: u8,
    /// The flow was SNATed (or its source port remapped).
    pub snat: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<MonitorEvent>() == 80);

pub const ORIGIN_POD: u8 = 1;
pub const ORIGIN_EXTERNAL: u8 = 2;
pub const ORIGIN_HOST: u8 = 3;

user_pod!(
    ServiceStats,
    BackendStats,
    MonitorConfig,
    MonitorBudget,
    MonitorEvent
);
