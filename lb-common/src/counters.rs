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
    /// Sent to a service that has no backends: answered with a TCP RST or ICMP unreachable.
    Rejected = 5,
    /// Needed SNAT but no node address is configured or no source port was free: dropped.
    SnatFailed = 6,
    /// A translated packet sent on by FIB lookup and redirect (SNAT, NodePort replies).
    Redirected = 7,
    /// A packet that needed a redirect but the FIB had no route: handed to the stack.
    RedirectFailed = 8,
    /// Rewritten and sent back out by the XDP fast path (also counted as translated or reverse
    /// translated).
    XdpTransmitted = 9,
    /// A packet of a known flow whose backend left (or, for UDP, drains): balanced afresh as a
    /// new flow instead of being sent to a dead address.
    Rebalanced = 10,
    /// An ICMP error about a translated flow, rewritten (outer and quoted headers) to match
    /// what its receiver sent or expects.
    IcmpTranslated = 11,
    /// A new flow whose reply tuple another live flow already had (one client port to two
    /// Services with a common backend): its source port was remapped, as netfilter does.
    PortRemapped = 12,
    /// A new flow to a frontend with `loadBalancerSourceRanges` from a client outside them:
    /// dropped (as kube-proxy and Cilium do).
    DroppedSourceRange = 13,
    /// An IPv6 packet whose next stage (a program the agent puts in the stage arrays) could not
    /// run: passed untouched at the entry point (traffic that is no Service's must not be
    /// lost), dropped past it; or a new flow whose entry was gone before it was applied.
    StageFailed = 14,
}

impl Counter {
    pub const ALL: [Counter; 15] = [
        Counter::Translated,
        Counter::ReverseTranslated,
        Counter::Passed,
        Counter::DroppedNoBackend,
        Counter::Malformed,
        Counter::Rejected,
        Counter::SnatFailed,
        Counter::Redirected,
        Counter::RedirectFailed,
        Counter::XdpTransmitted,
        Counter::Rebalanced,
        Counter::IcmpTranslated,
        Counter::PortRemapped,
        Counter::DroppedSourceRange,
        Counter::StageFailed,
    ];

    /// Stable, metric-friendly name.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Translated => "translated",
            Counter::ReverseTranslated => "reverse_translated",
            Counter::Passed => "passed",
            Counter::DroppedNoBackend => "dropped_no_backend",
            Counter::Malformed => "malformed",
            Counter::Rejected => "rejected",
            Counter::SnatFailed => "snat_failed",
            Counter::Redirected => "redirected",
            Counter::RedirectFailed => "redirect_failed",
            Counter::XdpTransmitted => "xdp_transmitted",
            Counter::Rebalanced => "rebalanced",
            Counter::IcmpTranslated => "icmp_translated",
            Counter::PortRemapped => "port_remapped",
            Counter::DroppedSourceRange => "dropped_source_range",
            Counter::StageFailed => "stage_failed",
        }
    }
}

/// Number of slots in the counters map: room for counters to come, so adding one does not
/// change the pinned map (an agent that finds a smaller pinned map resizes it, keeping counts).
pub const COUNTER_SLOTS: u32 = 64;
const _: () = assert!(Counter::ALL.len() as u32 <= COUNTER_SLOTS);
