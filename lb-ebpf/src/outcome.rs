//! What a program run did, as the entry points record it: the verdict for the kernel and the
//! counters that say why. Nothing below the entry points counts; they return an [`Outcome`].

use lb_common::counters::Counter;

use crate::{
    family::Family,
    lb::FlowEvents,
    maps::count,
    stats::{self, Attributed},
};

/// `A`: the family of the packet's flow (IPv4 for packets of no flow).
pub struct Outcome<V, A = u32> {
    pub verdict: V,
    /// What became of the packet; `None` when XDP hands it on to tc, which counts it.
    pub counter: Option<Counter>,
    /// How a translated packet was sent on (redirected, redirect failed, XDP transmitted).
    pub sent: Option<Counter>,
    /// What happened to its flow on the way (rebalanced, port remapped).
    pub events: FlowEvents,
    /// The Service traffic it was (for the per-Service counters and the monitor); `None` for
    /// anything else.
    pub attributed: Option<Attributed<A>>,
}

impl<V, A: Family> Outcome<V, A> {
    #[inline(always)]
    pub const fn new(verdict: V, counter: Counter) -> Self {
        Self {
            verdict,
            counter: Some(counter),
            sent: None,
            events: FlowEvents::NONE,
            attributed: None,
        }
    }

    /// Handed on uncounted (the next program counts it).
    #[inline(always)]
    pub const fn uncounted(verdict: V) -> Self {
        Self {
            verdict,
            counter: None,
            sent: None,
            events: FlowEvents::NONE,
            attributed: None,
        }
    }

    #[inline(always)]
    pub const fn with_events(mut self, events: FlowEvents) -> Self {
        self.events = events;
        self
    }

    #[inline(always)]
    pub const fn attributed(mut self, attributed: Option<Attributed<A>>) -> Self {
        self.attributed = attributed;
        self
    }

    #[inline(always)]
    pub const fn sent(mut self, how: Option<Counter>) -> Self {
        self.sent = how;
        self
    }

    /// Counts the outcome of a packet of `bytes` and returns its verdict.
    #[inline(always)]
    pub fn record(self, bytes: u64) -> V {
        if let Some(counter) = self.counter {
            count(counter);
        }
        if let Some(attributed) = &self.attributed {
            stats::record(attributed, self.counter, bytes);
        }
        if let Some(counter) = self.sent {
            count(counter);
        }
        if self.events.rebalanced {
            count(Counter::Rebalanced);
        }
        if self.events.port_remapped {
            count(Counter::PortRemapped);
        }
        self.verdict
    }
}
