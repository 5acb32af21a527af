//! `lb monitor`: new flows and refused ones as the packet path sees them, from its ring buffer.
//!
//! The packet path writes events only while a monitor keeps `LB_MONITOR.enabled_until_ns`
//! ahead of the clock (renewed every second, so a killed monitor stops the events within
//! [`LEASE`]), and at most `events_per_s` a second per CPU.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use lb_common::{
    counters::Counter,
    maps::{EVENTS_MAP, MONITOR_BUDGET_MAP, MONITOR_MAP},
    stats::{
        EVENT_NEW_FLOW, MonitorBudget, MonitorConfig, MonitorEvent, ORIGIN_EXTERNAL, ORIGIN_HOST,
        ORIGIN_POD,
    },
};
use serde::Serialize;

use super::{PinnedMaps, monotonic_ns, wide_endpoint_text};
use crate::model::Protocol;

/// How far ahead a monitor switches events on; renewed every second.
pub const LEASE: Duration = Duration::from_secs(3);

/// One event, named.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventView {
    /// "new-flow" or "drop".
    pub event: &'static str,
    /// Why: the packet path's counter ("translated", "dropped_no_backend", "rejected",
    /// "dropped_source_range", "snat_failed").
    pub reason: &'static str,
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// pod, external or host.
    pub origin: &'static str,
    pub snat: bool,
    /// Seconds since boot (CLOCK_MONOTONIC).
    pub time_s: f64,
}

/// Reads events until `stop` says so (given the number seen so far).
pub struct Monitor {
    config: Array<MapData, MonitorConfig>,
    budget: PerCpuArray<MapData, MonitorBudget>,
    ring: RingBuf<MapData>,
    events_per_s: u32,
    renewed: Option<Instant>,
}

impl Monitor {
    pub fn open(maps: &PinnedMaps, events_per_s: u32) -> anyhow::Result<Self> {
        Ok(Self {
            config: super::open(&maps.pin_dir, MONITOR_MAP)
                .context("this node's lb predates lb monitor: restart the agent")?,
            budget: super::open(&maps.pin_dir, MONITOR_BUDGET_MAP)?,
            ring: super::open(&maps.pin_dir, EVENTS_MAP)?,
            events_per_s,
            renewed: None,
        })
    }

    /// Keeps the packet path's events on for another [`LEASE`] (at most once a second).
    pub fn renew(&mut self) -> anyhow::Result<()> {
        if self
            .renewed
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return Ok(());
        }
        let config = MonitorConfig {
            enabled_until_ns: monotonic_ns() + LEASE.as_nanos() as u64,
            events_per_s: self.events_per_s,
            _pad: 0,
        };
        self.config
            .set(0, config, 0)
            .context("switching the monitor on")?;
        self.renewed = Some(Instant::now());
        Ok(())
    }

    /// The events waiting in the ring buffer.
    pub fn drain(&mut self) -> Vec<MonitorEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<MonitorEvent>() {
                // SAFETY: the item holds at least one MonitorEvent as the packet path wrote it
                // (a plain-integer #[repr(C)] type); read unaligned from the ring's bytes.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<MonitorEvent>()) });
            }
        }
        out
    }

    /// Events the packet path could not write (over budget, or the ring full), over all CPUs.
    pub fn lost(&self) -> u64 {
        self.budget
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().map(|b| u64::from(b.lost)).sum())
            .unwrap_or(0)
    }

    /// Switches the events off (another monitor switches them on again within a second).
    pub fn stop(&mut self) {
        let _ = self.config.set(0, MonitorConfig::default(), 0);
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn view(event: &MonitorEvent, names: &BTreeMap<u32, String>) -> EventView {
    let reason = Counter::ALL
        .iter()
        .find(|c| **c as u8 == event.reason)
        .map_or("?", |c| c.name());
    let new_flow = event.kind == EVENT_NEW_FLOW;
    EventView {
        event: if new_flow { "new-flow" } else { "drop" },
        reason,
        protocol: Protocol::from_number(event.flow.proto)
            .map_or(event.flow.proto.to_string(), |p| p.to_string()),
        client: wide_endpoint_text(event.flow.saddr_be, event.flow.sport_be),
        frontend: wide_endpoint_text(event.flow.daddr_be, event.flow.dport_be),
        service: names
            .get(&event.service_id)
            .cloned()
            .unwrap_or_else(|| format!("service id {}", event.service_id)),
        backend: new_flow.then(|| wide_endpoint_text(event.new_daddr_be, event.new_dport_be)),
        origin: match event.origin {
            ORIGIN_POD => "pod",
            ORIGIN_EXTERNAL => "external",
            ORIGIN_HOST => "host",
            _ => "?",
        },
        snat: event.snat != 0,
        time_s: event.time_ns as f64 / 1e9,
    }
}

pub fn render(e: &EventView) -> String {
    let outcome = match &e.backend {
        Some(backend) => format!("=> {backend}{}", if e.snat { " (SNAT)" } else { "" }),
        None => format!("dropped: {}", e.reason),
    };
    format!(
        "{:>12.3} {:<8} {} {} -> {} {} [{}] {outcome}",
        e.time_s, e.event, e.protocol, e.client, e.frontend, e.service, e.origin
    )
}
