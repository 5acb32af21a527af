//! ICMP errors about translated flows (destination unreachable, including "fragmentation
//! needed", and time exceeded). An error travels against the packet it quotes, so it is looked up
//! as a packet of the other direction, and rewritten as that direction's packets are: its quote
//! becomes the packet its receiver really sent, its destination the receiver, and its source the
//! Service (or client) address when the flow's far end itself sent the error. Without this, path
//! MTU discovery through a Service black-holes and port unreachables never reach the socket.
//!
//! The same for ICMPv6 (destination unreachable, packet too big, time exceeded).
//!
//! Checksums, fixed incrementally: IPv4's outer and quoted header checksums and the ICMP checksum
//! (which covers the quote); ICMPv6 has no header checksums but its checksum also covers the
//! outer addresses (a pseudo-header). The quoted TCP/UDP checksum is left as it was: receivers
//! do not check it, and the quote is often cut before it.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use lb_common::{
    conntrack::{CT_F_REDIRECT, FlowKey},
    counters::Counter,
};

use crate::{
    checksum, conntrack,
    family::Family,
    headers::{ETH_LEN, IcmpError},
    lb::Origin,
    redirect,
};

const ICMP_CSUM_OFF: usize = 2;

pub enum IcmpOutcome {
    /// Not about a flow lb translated.
    NotOurs,
    /// The rewrite failed half-way (a helper refused): the packet is dropped.
    Broken,
    /// Rewritten; the verdict sends it on, redirected (`sent` says how) or through the stack.
    Translated { verdict: i32, sent: Option<Counter> },
}

#[inline(always)]
pub fn translate<A: Family>(ctx: &TcContext, err: &IcmpError<A>, origin: Origin) -> IcmpOutcome {
    // The quoted packet went one way; the error, and the entry that rewrites it, go the other.
    let quoted = FlowKey::new(
        err.inner_saddr_be,
        err.inner_daddr_be,
        err.inner_sport_be,
        err.inner_dport_be,
        err.inner_proto,
    );
    let key = quoted.reversed();
    let Some(ct) = conntrack::lookup(&key) else {
        return IcmpOutcome::NotOurs;
    };
    // What the receiver sent is the reverse of what this direction's packets become.
    let new_inner_saddr = ct.new_daddr_be;
    let new_inner_daddr = ct.new_saddr_be;
    let new_inner_sport = ct.new_dport_be;
    let new_inner_dport = ct.new_sport_be;
    let new_outer_daddr = if err.outer_daddr_be == key.daddr_be {
        ct.new_daddr_be
    } else {
        err.outer_daddr_be
    };
    // Sent by the flow's far end itself: it must appear to come from the address the receiver
    // talks to. A router on the way keeps its own address.
    let new_outer_saddr = if err.outer_saddr_be == key.saddr_be {
        ct.new_saddr_be
    } else {
        err.outer_saddr_be
    };
    if rewrite(
        ctx,
        err,
        [new_inner_saddr, new_inner_daddr],
        [new_inner_sport, new_inner_dport],
        [new_outer_saddr, new_outer_daddr],
    )
    .is_err()
    {
        return IcmpOutcome::Broken;
    }
    if ct.flags & CT_F_REDIRECT != 0 || origin == Origin::Host {
        let (verdict, sent) =
            redirect::by_fib(ctx, new_outer_saddr, new_outer_daddr, A::ICMP_PROTO);
        IcmpOutcome::Translated {
            verdict,
            sent: Some(sent),
        }
    } else {
        IcmpOutcome::Translated {
            verdict: aya_ebpf::bindings::TC_ACT_OK as i32,
            sent: None,
        }
    }
}

struct Failed;

#[inline(always)]
fn rewrite<A: Family>(
    ctx: &TcContext,
    err: &IcmpError<A>,
    inner_addrs: [A; 2],
    inner_ports: [u16; 2],
    outer_addrs: [A; 2],
) -> Result<(), Failed> {
    let icmp_csum = err.icmp_off + ICMP_CSUM_OFF;
    let icmp_fix = |o: u32, n: u32, flags: u64| {
        ctx.l4_csum_replace(icmp_csum, o as u64, n as u64, flags | 4)
            .map_err(|_| Failed)
    };
    // The quoted header: each address changes the ICMP checksum, and IPv4's quoted header
    // checksum, whose own change the ICMP checksum then takes in too.
    let inner_csum = A::L3_CSUM_OFF.map(|off| err.inner_ip_off + off);
    let old_inner_csum: u16 = match inner_csum {
        Some(at) => ctx.load(at).map_err(|_| Failed)?,
        None => 0,
    };
    let quoted_addrs = [
        (
            err.inner_ip_off + A::SRC_OFF,
            err.inner_saddr_be,
            inner_addrs[0],
        ),
        (
            err.inner_ip_off + A::DST_OFF,
            err.inner_daddr_be,
            inner_addrs[1],
        ),
    ];
    for (offset, old, new) in quoted_addrs {
        if old != new {
            checksum::changed_words(old, new, |o, n| {
                if let Some(at) = inner_csum {
                    ctx.l3_csum_replace(at, o as u64, n as u64, 4)
                        .map_err(|_| Failed)?;
                }
                icmp_fix(o, n, 0)
            })?;
            ctx.store(offset, &new, 0).map_err(|_| Failed)?;
        }
    }
    if let Some(at) = inner_csum {
        let new_inner_csum: u16 = ctx.load(at).map_err(|_| Failed)?;
        if new_inner_csum != old_inner_csum {
            ctx.l4_csum_replace(icmp_csum, old_inner_csum as u64, new_inner_csum as u64, 2)
                .map_err(|_| Failed)?;
        }
    }
    let quoted_ports = [
        (err.inner_l4_off(), err.inner_sport_be, inner_ports[0]),
        (err.inner_l4_off() + 2, err.inner_dport_be, inner_ports[1]),
    ];
    for (offset, old, new) in quoted_ports {
        if old != new {
            ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 2)
                .map_err(|_| Failed)?;
            ctx.store(offset, &new, 0).map_err(|_| Failed)?;
        }
    }
    // The outer header: covered by IPv4's header checksum, or by ICMPv6's pseudo-header.
    let outer = [
        (ETH_LEN + A::SRC_OFF, err.outer_saddr_be, outer_addrs[0]),
        (ETH_LEN + A::DST_OFF, err.outer_daddr_be, outer_addrs[1]),
    ];
    for (offset, old, new) in outer {
        if old != new {
            checksum::changed_words(old, new, |o, n| match A::L3_CSUM_OFF {
                Some(csum_off) => ctx
                    .l3_csum_replace(ETH_LEN + csum_off, o as u64, n as u64, 4)
                    .map_err(|_| Failed),
                None => icmp_fix(o, n, BPF_F_PSEUDO_HDR as u64),
            })?;
            ctx.store(offset, &new, 0).map_err(|_| Failed)?;
        }
    }
    Ok(())
}
