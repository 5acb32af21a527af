//! Per-CPU outcome counters, one slot per [`Counter`]; user space sums the CPUs.

/// What the packet path did with a packet. The discriminant is the index in the counters map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// A client -> service packet rewritten to a backend.
    Translated = 0,
    /// A backend -> client reply rewritten back to the service address.
    ReverseTranslated = 1,
    /// Not service traffic (or not IPv4, or a non-first fragment): left unchanged.
    Passed = 2,
    /// Sent to a service that has no backends: dropped.
    DroppedNoBackend = 3,
    /// Headers cut short or inconsistent: left unchanged.
    Malformed = 4,
}

impl Counter {
    pub const ALL: [Counter; 5] = [
        Counter::Translated,
        Counter::ReverseTranslated,
        Counter::Passed,
        Counter::DroppedNoBackend,
        Counter::Malformed,
    ];

    /// Stable, metric-friendly name.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Translated => "translated",
            Counter::ReverseTranslated => "reverse_translated",
            Counter::Passed => "passed",
            Counter::DroppedNoBackend => "dropped_no_backend",
            Counter::Malformed => "malformed",
        }
    }
}

/// Number of slots in the counters map.
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;
