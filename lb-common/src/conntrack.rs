//! The BPF conntrack: one LRU hash holding both directions of every translated flow.
//!
//! A new flow to a service writes two entries: the client's tuple (`CT_KIND_FORWARD`) and the
//! backend's reply tuple (`CT_KIND_REPLY`), each saying what the packet must become. A DNAT-only
//! flow rewrites the destination one way and the source back; a SNATed flow rewrites both ends
//! both ways. Each entry names the other ([`partner_key`]), so the rare events that concern the
//! whole flow (its first reply, a FIN, a RST) are written to both.
//!
//! Lifecycle (modelled on the kernel's nf_conntrack and Cilium's CT): every entry carries an
//! expiry in monotonic seconds, pushed forward by each packet of its direction by the timeout of
//! the flow's state ([`timeout_s`]). A flow is alive while either of its entries is unexpired;
//! the packet path ignores a dead flow's entries and user space's sweep deletes them.

use crate::{Address, IPPROTO_TCP, Ip6, user_pod};

/// A flow's 5-tuple as seen on the wire, in the direction the packet travels. `A` is the
/// family's address field (`u32` IPv4, [`Ip6`] IPv6); each family has its own conntrack map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey<A = u32> {
    pub saddr_be: A,
    pub daddr_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey<Ip6>>() == 40);

impl<A: Copy> FlowKey<A> {
    pub const fn new(saddr_be: A, daddr_be: A, sport_be: u16, dport_be: u16, proto: u8) -> Self {
        Self {
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto,
            _pad: [0; 3],
        }
    }

    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.daddr_be,
            self.saddr_be,
            self.dport_be,
            self.sport_be,
            self.proto,
        )
    }
}

/// A client -> service packet (the first direction of a flow).
pub const CT_KIND_FORWARD: u8 = 1;
/// A backend -> client reply.
pub const CT_KIND_REPLY: u8 = 2;

/// After rewriting, the packet's source is a node address (SNAT, or a reply from a NodePort):
/// it is sent on with a FIB lookup and redirect instead of through the stack, which would drop a
/// packet arriving with a local source address as spoofed.
pub const CT_F_REDIRECT: u8 = 1 << 0;
/// The flow was SNATed: the reply entry holds the SNAT port, freed with the flow.
pub const CT_F_SNAT: u8 = 1 << 1;

/// Flow state bits, the same in both entries of a flow (written to both when they change).
/// The backend has answered (TCP: past the handshake; UDP: a "stream" in the kernel's words).
pub const CT_S_REPLIED: u8 = 1 << 0;
/// TCP: the client sent a FIN.
pub const CT_S_FIN_FORWARD: u8 = 1 << 1;
/// TCP: the backend sent a FIN.
pub const CT_S_FIN_REPLY: u8 = 1 << 2;
/// TCP: either end sent a RST.
pub const CT_S_RST: u8 = 1 << 3;
/// Bits that mean the TCP connection is closing or closed.
pub const CT_S_CLOSING: u8 = CT_S_FIN_FORWARD | CT_S_FIN_REPLY | CT_S_RST;

/// How to rewrite every packet matching a [`FlowKey`]: its addresses and ports become these
/// (unchanged ones are simply equal to the packet's), plus the flow's state and lifetime.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry<A = u32> {
    pub new_saddr_be: A,
    pub new_daddr_be: A,
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    /// `CT_KIND_FORWARD` or `CT_KIND_REPLY`.
    pub kind: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// `CT_S_*` bits.
    pub state: u8,
    pub _pad: u8,
    /// The frontend the flow was translated for.
    pub service_id: u32,
    /// The backend chosen when the flow started.
    pub backend_id: u32,
    /// When the flow started, in monotonic seconds (`bpf_ktime_get_ns() / 1e9`).
    pub created_s: u32,
    /// This entry is dead after this monotonic second unless a packet pushes it on.
    pub expires_s: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);
const _: () = assert!(core::mem::size_of::<CtEntry<Ip6>>() == 56);

impl<A: Address> CtEntry<A> {
    /// Every field zero: a buffer to read entries into, or a base for building one.
    pub const ZERO: Self = Self {
        new_saddr_be: A::UNSPECIFIED,
        new_daddr_be: A::UNSPECIFIED,
        new_sport_be: 0,
        new_dport_be: 0,
        kind: 0,
        flags: 0,
        state: 0,
        _pad: 0,
        service_id: 0,
        backend_id: 0,
        created_s: 0,
        expires_s: 0,
    };
}

impl<A> CtEntry<A> {
    pub const fn expired(&self, now_s: u32) -> bool {
        self.expires_s < now_s
    }
}

/// The key of the flow's other entry: the packet this entry produces, seen from the other end.
#[inline(always)]
pub const fn partner_key<A: Copy>(key: &FlowKey<A>, entry: &CtEntry<A>) -> FlowKey<A> {
    FlowKey::new(
        entry.new_daddr_be,
        entry.new_saddr_be,
        entry.new_dport_be,
        entry.new_sport_be,
        key.proto,
    )
}

impl<A: crate::Address> FlowKey<A> {
    /// The key in the wide form (IPv4 as `::ffff:a.b.c.d`), for views of both families.
    pub fn to_wide(&self) -> FlowKey<crate::Ip6> {
        FlowKey::new(
            self.saddr_be.to_wide(),
            self.daddr_be.to_wide(),
            self.sport_be,
            self.dport_be,
            self.proto,
        )
    }
}

impl<A: crate::Address> CtEntry<A> {
    /// The entry in the wide form (see [`FlowKey::to_wide`]).
    pub fn to_wide(&self) -> CtEntry<crate::Ip6> {
        CtEntry {
            new_saddr_be: self.new_saddr_be.to_wide(),
            new_daddr_be: self.new_daddr_be.to_wide(),
            new_sport_be: self.new_sport_be,
            new_dport_be: self.new_dport_be,
            kind: self.kind,
            flags: self.flags,
            state: self.state,
            _pad: self._pad,
            service_id: self.service_id,
            backend_id: self.backend_id,
            created_s: self.created_s,
            expires_s: self.expires_s,
        }
    }
}

/// Conntrack timeouts in seconds, per protocol and state. Names and defaults follow kube-proxy's
/// `--conntrack-*` flags where it has one (it sets them on the kernel's conntrack), else Cilium's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtTimeouts {
    /// TCP before the backend's first answer (Cilium's `tcp-syn`: 60 s).
    pub tcp_syn_s: u32,
    /// TCP established (kube-proxy's `--conntrack-tcp-timeout-established`: 24 h).
    pub tcp_established_s: u32,
    /// TCP with a FIN from one end only (kube-proxy's `--conntrack-tcp-timeout-close-wait`: 1 h).
    pub tcp_close_wait_s: u32,
    /// TCP after a RST or FINs from both ends (Cilium's `tcp-fin`: 10 s).
    pub tcp_close_s: u32,
    /// UDP never answered (kube-proxy's `--conntrack-udp-timeout`; the kernel's 30 s).
    pub udp_s: u32,
    /// UDP answered (kube-proxy's `--conntrack-udp-timeout-stream`; the kernel's 120 s).
    pub udp_stream_s: u32,
}
const _: () = assert!(core::mem::size_of::<CtTimeouts>() == 24);

impl CtTimeouts {
    pub const DEFAULT: Self = Self {
        tcp_syn_s: 60,
        tcp_established_s: 86_400,
        tcp_close_wait_s: 3_600,
        tcp_close_s: 10,
        udp_s: 30,
        udp_stream_s: 120,
    };
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How long a flow in `state` lives after its last packet.
#[inline(always)]
pub const fn timeout_s(proto: u8, state: u8, t: &CtTimeouts) -> u32 {
    if proto == IPPROTO_TCP {
        if state & CT_S_RST != 0
            || state & (CT_S_FIN_FORWARD | CT_S_FIN_REPLY) == (CT_S_FIN_FORWARD | CT_S_FIN_REPLY)
        {
            t.tcp_close_s
        } else if state & (CT_S_FIN_FORWARD | CT_S_FIN_REPLY) != 0 {
            t.tcp_close_wait_s
        } else if state & CT_S_REPLIED == 0 {
            t.tcp_syn_s
        } else {
            t.tcp_established_s
        }
    } else if state & CT_S_REPLIED != 0 {
        t.udp_stream_s
    } else {
        t.udp_s
    }
}

/// Seconds since boot on CLOCK_MONOTONIC from nanoseconds, as the packet path counts them.
#[inline(always)]
pub const fn mono_seconds(ns: u64) -> u32 {
    (ns / 1_000_000_000) as u32
}

user_pod!(FlowKey, FlowKey<Ip6>, CtEntry, CtEntry<Ip6>, CtTimeouts);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IPPROTO_UDP;

    #[test]
    fn each_entry_names_its_partner() {
        // Client 10.0.0.1:40000 -> VIP 10.96.0.1:80, DNAT to 10.244.0.5:8080.
        let (c, vip, pod) = (1u32, 2u32, 3u32);
        let forward_key = FlowKey::new(c, vip, 40000, 80, IPPROTO_TCP);
        let forward = CtEntry {
            new_saddr_be: c,
            new_daddr_be: pod,
            new_sport_be: 40000,
            new_dport_be: 8080,
            kind: CT_KIND_FORWARD,
            flags: 0,
            state: 0,
            _pad: 0,
            service_id: 1,
            backend_id: 1,
            created_s: 0,
            expires_s: 0,
        };
        let reply_key = partner_key(&forward_key, &forward);
        assert_eq!(reply_key, FlowKey::new(pod, c, 8080, 40000, IPPROTO_TCP));
        let reply = CtEntry {
            new_saddr_be: vip,
            new_daddr_be: c,
            new_sport_be: 80,
            new_dport_be: 40000,
            kind: CT_KIND_REPLY,
            ..forward
        };
        assert_eq!(partner_key(&reply_key, &reply), forward_key);
    }

    #[test]
    fn timeouts_follow_the_state() {
        let t = CtTimeouts::DEFAULT;
        assert_eq!(timeout_s(IPPROTO_TCP, 0, &t), 60);
        assert_eq!(timeout_s(IPPROTO_TCP, CT_S_REPLIED, &t), 86_400);
        assert_eq!(
            timeout_s(IPPROTO_TCP, CT_S_REPLIED | CT_S_FIN_FORWARD, &t),
            3_600
        );
        assert_eq!(
            timeout_s(
                IPPROTO_TCP,
                CT_S_REPLIED | CT_S_FIN_FORWARD | CT_S_FIN_REPLY,
                &t
            ),
            10
        );
        assert_eq!(timeout_s(IPPROTO_TCP, CT_S_REPLIED | CT_S_RST, &t), 10);
        assert_eq!(timeout_s(IPPROTO_UDP, 0, &t), 30);
        assert_eq!(timeout_s(IPPROTO_UDP, CT_S_REPLIED, &t), 120);
    }
}
