//! A packet generator that outruns the paths the benchmark measures, in the manner of
//! xdp-trafficgen: the kernel runs a small XDP program over live frames (`BPF_PROG_TEST_RUN`
//! with `BPF_F_TEST_XDP_LIVE_FRAMES`), and each run sends a frame out of the interface through
//! its `ndo_xdp_xmit`. No socket, no skb and no qdisc on the sending side, so one core makes
//! millions of frames a second. The program writes the whole frame on every run (a few stores of
//! constants): the kernel recycles the pages of frames the receivers freed without resetting
//! them, and a router on the way has rewritten their MAC addresses and TTL by then.
//! (Debian's xdp-trafficgen itself sends IPv6 with hop limit 1 only, which cannot be routed
//! through a node; this sends any frame.)
//!
//! On a veth the frames land in the peer's NAPI ring, which needs an XDP program on the peer
//! ([`crate::xdp_pass`]); frames that find the ring full are dropped there, as a NIC drops what
//! its ring cannot hold when the host cannot keep up.

use std::{
    net::SocketAddrV4,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use etherparse::PacketBuilder;

use crate::{
    bpf_syscall::{EXIT, TestRun, call, insn, load_xdp, mov64_imm, xdp_context},
    netns::Netns,
};

const BPF_FUNC_REDIRECT: i32 = 23;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
/// Frames per `ndo_xdp_xmit` call (the kernel's default batch).
const BATCH: u32 = 64;
/// Each system call sets the run up and tears it down again (tens of milliseconds here, with
/// RCU grace periods), so calls send about this long.
const CALL_LENGTH: Duration = Duration::from_millis(250);

/// The veth peer that takes the generator's frames, made ready for them until dropped:
/// - an XDP program ([`crate::xdp_pass`]) unless it has one (say, lb's): a veth takes
///   redirected frames into a NAPI ring only when it runs one;
/// - threaded NAPI: that ring is drained by a kernel thread, which the scheduler runs on the
///   other core, rather than in the generator's own softirq. The generator and the path under
///   test then have a core each, and the generator can outrun the path.
pub struct ReceivingPeer<'a> {
    ns: &'a Netns,
    ifname: String,
    added_program: bool,
}

impl<'a> ReceivingPeer<'a> {
    /// `pin` is a free bpffs path, used while the program is attached.
    pub fn prepare(ns: &'a Netns, ifname: &str, pin: &std::path::Path) -> anyhow::Result<Self> {
        let added_program = !has_xdp_program(ns, ifname)?;
        if added_program {
            crate::xdp_pass::attach(ns, ifname, pin)?;
        }
        let peer = Self {
            ns,
            ifname: ifname.to_owned(),
            added_program,
        };
        ns.set_device_attribute(ifname, "threaded", "1")?;
        Ok(peer)
    }
}

impl Drop for ReceivingPeer<'_> {
    fn drop(&mut self) {
        let _ = self.ns.set_device_attribute(&self.ifname, "threaded", "0");
        // XDP on a veth takes GRO and GSO away from it: the other workloads need it gone, but
        // a program that was there before (lb's) stays.
        if self.added_program {
            let _ = self
                .ns
                .ip(&["link", "set", "dev", &self.ifname, "xdp", "off"]);
        }
    }
}

/// A sink standing in for the rest of the network: an XDP program on a switch port that drops
/// the benchmark's UDP frames (IPv4, to `port`) and passes everything else, so what a node
/// forwards is counted (the port's receive counter) but costs nothing further down. Then the
/// node is the only thing measured, as a load balancer in front of a fast network is. Until
/// dropped; then the port gets back an XDP_PASS program if it had one, or none.
pub struct UdpSink<'a> {
    ns: &'a Netns,
    ifname: String,
    pin: std::path::PathBuf,
    had_program: bool,
}

impl<'a> UdpSink<'a> {
    pub fn attach(
        ns: &'a Netns,
        ifname: &str,
        port: u16,
        pin: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let had_program = has_xdp_program(ns, ifname)?;
        let program = load_xdp(&sink_program(port)).context("the sink's program")?;
        crate::xdp_pass::attach_program(ns, ifname, &program, pin)?;
        Ok(Self {
            ns,
            ifname: ifname.to_owned(),
            pin: pin.to_owned(),
            had_program,
        })
    }
}

impl Drop for UdpSink<'_> {
    fn drop(&mut self) {
        if self.had_program {
            let _ = crate::xdp_pass::attach(self.ns, &self.ifname, &self.pin);
        } else {
            let _ = self
                .ns
                .ip(&["link", "set", "dev", &self.ifname, "xdp", "off"]);
        }
    }
}

/// Whether `ifname` in `ns` runs an XDP program.
fn has_xdp_program(ns: &Netns, ifname: &str) -> anyhow::Result<bool> {
    let out = ns.pipe("ip", &["-json", "link", "show", "dev", ifname], "")?;
    let links: serde_json::Value = serde_json::from_str(&out).context("ip -json output")?;
    Ok(!links[0]["xdp"].is_null())
}

/// `return (IPv4 and UDP and destination port == port) ? XDP_DROP : XDP_PASS` (IPv4 without
/// options, as the generator's frames are).
fn sink_program(port: u16) -> Vec<u64> {
    const XDP_DROP: i32 = 1;
    const XDP_PASS: i32 = 2;
    // Loads are little-endian: a big-endian field reads back byte-swapped.
    let ipv4 = i32::from(0x0800u16.swap_bytes());
    let port = i32::from(port.swap_bytes());
    vec![
        insn(0x61, 2, 1, 0, 0),    // r2 = ctx->data
        insn(0x61, 3, 1, 4, 0),    // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),    // r4 = r2
        insn(0x07, 4, 0, 0, 38),   // r4 += 38 (through the UDP destination port)
        insn(0x2d, 4, 3, 8, 0),    // if r4 > r3 goto pass
        insn(0x69, 5, 2, 12, 0),   // r5 = ethertype
        insn(0x55, 5, 0, 6, ipv4), // if r5 != IPv4 goto pass
        insn(0x71, 5, 2, 23, 0),   // r5 = IP protocol
        insn(0x55, 5, 0, 4, 17),   // if r5 != UDP goto pass
        insn(0x69, 5, 2, 36, 0),   // r5 = UDP destination port
        insn(0x55, 5, 0, 2, port), // if r5 != port goto pass
        mov64_imm(0, XDP_DROP),
        EXIT,
        mov64_imm(0, XDP_PASS), // pass:
        EXIT,
    ]
}

/// What one generator run sent.
#[derive(Clone, Copy, Debug)]
pub struct Generated {
    /// Frames handed to the interface (each program run redirects one).
    pub frames: u64,
    pub elapsed: Duration,
}

impl Generated {
    pub fn per_second(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64()
    }
}

/// An Ethernet + IPv4 + UDP frame with `payload` zero bytes and correct checksums.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: usize,
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let data = vec![0u8; payload];
    let mut frame = Vec::with_capacity(builder.size(payload));
    builder
        .write(&mut frame, &data)
        .expect("writing into a Vec cannot fail");
    frame
}

/// The MAC address of `ifname` in `ns`.
pub fn mac_address(ns: &Netns, ifname: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns.pipe("ip", &["-json", "link", "show", "dev", ifname], "")?;
    let links: serde_json::Value = serde_json::from_str(&out).context("ip -json output")?;
    let text = links[0]["address"]
        .as_str()
        .with_context(|| format!("no address for {ifname} in {out}"))?;
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().with_context(|| format!("short MAC {text}"))?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC {text}"))?;
    }
    Ok(mac)
}

/// Sends `frame` out of `ifname` in `ns` for `duration` from one thread pinned to `cpu`, as fast
/// as the kernel runs the program; with `ports` > 1 (a power of two), each frame's UDP source
/// port is random in `[its port, its port + ports)`, so the frames are that many flows.
pub fn run(
    ns: &Netns,
    ifname: &str,
    frame: Vec<u8>,
    ports: u16,
    cpu: usize,
    duration: Duration,
) -> anyhow::Result<Generated> {
    let ifname = ifname.to_owned();
    ns.run(move || -> anyhow::Result<Generated> {
        pin_to_cpu(cpu)?;
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())
            .with_context(|| format!("no interface {ifname}"))?;
        let program =
            load_xdp(&program(&frame, ports, ifindex)).context("the generator's program")?;
        let started = Instant::now();
        let mut frames = 0u64;
        let mut runs = 100_000u32;
        while started.elapsed() < duration {
            let call = Instant::now();
            send(&program, ifindex, &frame, runs)
                .with_context(|| format!("generating frames out of {ifname}"))?;
            frames += u64::from(runs);
            let per_second = f64::from(runs) / call.elapsed().as_secs_f64();
            let left = duration.saturating_sub(started.elapsed()).min(CALL_LENGTH);
            runs = (per_second * left.as_secs_f64()).clamp(1_000.0, 1e8) as u32;
        }
        Ok(Generated {
            frames,
            elapsed: started.elapsed(),
        })
    })?
}

/// Where the varying source port and the UDP checksum sit in an Ethernet + IPv4 (no options)
/// + UDP frame.
const SPORT_OFFSET: i16 = 34;
const UDP_CSUM_OFFSET: i16 = 40;

/// The generator's XDP program: write `frame` over the packet; when `ports` > 1, pick the source
/// port at random in `[its port, its port + ports)` and correct the UDP checksum for it
/// (RFC 1624); `return bpf_redirect(ifindex, 0)`. XDP_ABORTED if the packet is shorter than
/// the frame (never: the kernel makes it from the frame).
fn program(frame: &[u8], ports: u16, ifindex: u32) -> Vec<u64> {
    const R0: u8 = 0;
    const R1: u8 = 1;
    const R2: u8 = 2;
    const R3: u8 = 3;
    const R4: u8 = 4;
    const R5: u8 = 5;
    const R6: u8 = 6;
    const R7: u8 = 7;
    const R8: u8 = 8;
    const R9: u8 = 9;
    const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
    let field = |at: i16| u16::from_be_bytes([frame[at as usize], frame[at as usize + 1]]);

    let mut writes = Vec::new();
    let words = frame.chunks_exact(8);
    let tail = words.remainder();
    for (i, word) in words.enumerate() {
        let value = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        // r5 = value (ld_imm64 takes two instructions); *(u64 *)(r2 + off) = r5
        writes.push(insn(0x18, R5, 0, 0, value as u32 as i32));
        writes.push(insn(0, 0, 0, 0, (value >> 32) as u32 as i32));
        writes.push(insn(0x7b, R2, R5, (i * 8) as i16, 0));
    }
    let tail_start = frame.len() - tail.len();
    for (i, byte) in tail.iter().enumerate() {
        // *(u8 *)(r2 + off) = byte
        writes.push(insn(0x72, R2, 0, (tail_start + i) as i16, i32::from(*byte)));
    }
    if ports > 1 {
        assert!(ports.is_power_of_two(), "a power-of-two port range");
        let (sport, csum) = (field(SPORT_OFFSET), field(UDP_CSUM_OFFSET));
        // New checksum = ~(~csum + ~sport + new sport), folded to 16 bits.
        let constant = i32::from(!csum) + i32::from(!sport);
        writes.extend([
            insn(0x57, R7, 0, 0, i32::from(ports - 1)), // r7 &= ports - 1 (r7: random)
            insn(0x07, R7, 0, 0, i32::from(sport)),     // r7 += sport
            insn(0xbf, R8, R7, 0, 0),                   // r8 = r7
            insn(0x07, R8, 0, 0, constant),             // r8 += constant
            insn(0xbf, R9, R8, 0, 0),                   // r9 = r8
            insn(0x77, R9, 0, 0, 16),                   // r9 >>= 16
            insn(0x57, R8, 0, 0, 0xffff),               // r8 &= 0xffff
            insn(0x0f, R8, R9, 0, 0),                   // r8 += r9
            insn(0xbf, R9, R8, 0, 0),                   // r9 = r8
            insn(0x77, R9, 0, 0, 16),                   // r9 >>= 16
            insn(0x57, R8, 0, 0, 0xffff),               // r8 &= 0xffff
            insn(0x0f, R8, R9, 0, 0),                   // r8 += r9
            insn(0xa7, R8, 0, 0, 0xffff),               // r8 ^= 0xffff
            insn(0x55, R8, 0, 1, 0),                    // if r8 != 0 skip the next
            mov64_imm(R8, 0xffff),                      // UDP sends a zero sum as 0xffff
            insn(0xdc, R7, 0, 0, 16),                   // r7 = htobe16(r7)
            insn(0xdc, R8, 0, 0, 16),                   // r8 = htobe16(r8)
            insn(0x6b, R2, R7, SPORT_OFFSET, 0),        // *(u16 *)(r2 + sport) = r7
            insn(0x6b, R2, R8, UDP_CSUM_OFFSET, 0),     // *(u16 *)(r2 + csum) = r8
        ]);
    }
    let mut program = vec![
        insn(0xbf, R6, R1, 0, 0),                 // r6 = ctx
        call(BPF_FUNC_GET_PRANDOM_U32),           // r0 = random
        insn(0xbf, R7, R0, 0, 0),                 // r7 = r0
        insn(0x61, R2, R6, 0, 0),                 // r2 = ctx->data
        insn(0x61, R3, R6, 4, 0),                 // r3 = ctx->data_end
        insn(0xbf, R4, R2, 0, 0),                 // r4 = r2
        insn(0x07, R4, 0, 0, frame.len() as i32), // r4 += len
    ];
    // if r4 > r3 goto aborted (past the writes and the redirect)
    program.push(insn(0x2d, R4, R3, (writes.len() + 4) as i16, 0));
    program.extend(writes);
    program.extend([
        mov64_imm(R1, ifindex as i32),
        mov64_imm(R2, 0),
        call(BPF_FUNC_REDIRECT),
        EXIT,
        mov64_imm(R0, 0),
        EXIT,
    ]);
    program
}

/// One `BPF_PROG_TEST_RUN` of `runs` live frames made from `frame`.
fn send(program: &OwnedFd, ifindex: u32, frame: &[u8], runs: u32) -> std::io::Result<()> {
    TestRun {
        data_in: frame,
        ctx_in: Some(&xdp_context(frame.len(), ifindex)),
        repeat: runs,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size: BATCH,
        ..TestRun::default()
    }
    .run(program)
    .map(drop)
}

fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).context("CPU number")?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning the generator to CPU {cpu}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the generator's program once (not live) on a copy of nothing in particular and
    /// returns the frame it wrote and its verdict.
    fn written_frame(frame: &[u8], ports: u16) -> (Vec<u8>, u32) {
        let program = load_xdp(&program(frame, ports, 1)).expect("the verifier takes it");
        let garbage = vec![0xa5u8; frame.len()];
        let mut out = vec![0u8; frame.len()];
        let (verdict, _) = TestRun {
            data_in: &garbage,
            data_out: Some(&mut out),
            ctx_in: Some(&xdp_context(frame.len(), 0)),
            repeat: 1,
            ..TestRun::default()
        }
        .run(&program)
        .expect("BPF_PROG_TEST_RUN (as root)");
        (out, verdict)
    }

    fn frame() -> Vec<u8> {
        udp_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            "172.30.0.100:40000".parse().unwrap(),
            "172.30.0.11:30901".parse().unwrap(),
            22,
        )
    }

    #[test]
    fn one_flow_sends_the_frame_as_it_is() {
        const XDP_REDIRECT: u32 = 4;
        let (out, verdict) = written_frame(&frame(), 1);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out, frame());
    }

    #[test]
    fn many_flows_vary_the_source_port_and_keep_the_checksum_right() {
        let mut ports = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let (out, _) = written_frame(&frame(), 16);
            let packet = etherparse::SlicedPacket::from_ethernet(&out).expect("a whole frame");
            let Some(etherparse::NetSlice::Ipv4(ip)) = &packet.net else {
                panic!("not IPv4");
            };
            let Some(etherparse::TransportSlice::Udp(udp)) = &packet.transport else {
                panic!("not UDP");
            };
            let expected = udp
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), udp.payload())
                .unwrap();
            assert_eq!(udp.checksum(), expected, "port {}", udp.source_port());
            assert!((40000..40016).contains(&udp.source_port()));
            ports.insert(udp.source_port());
            // Everything but the port and the checksum is the template.
            assert_eq!(out[..34], frame()[..34]);
            assert_eq!(out[36..40], frame()[36..40]);
            assert_eq!(out[42..], frame()[42..]);
        }
        assert!(ports.len() > 8, "random ports: {ports:?}");
    }

    #[test]
    fn the_sink_drops_the_benchmarks_frames_and_passes_the_rest() {
        const XDP_DROP: u32 = 1;
        const XDP_PASS: u32 = 2;
        let sink = load_xdp(&sink_program(30901)).expect("the verifier takes it");
        let verdict = |frame: &[u8]| {
            crate::bpf_syscall::test_run(&sink, frame, 1)
                .expect("BPF_PROG_TEST_RUN (as root)")
                .0
        };
        assert_eq!(verdict(&frame()), XDP_DROP, "UDP to the port");
        let other_port = udp_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            "172.30.0.100:40000".parse().unwrap(),
            "172.30.0.11:53".parse().unwrap(),
            22,
        );
        assert_eq!(verdict(&other_port), XDP_PASS, "UDP to another port");
        let mut arp = frame();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(verdict(&arp), XDP_PASS, "not IPv4");
        let mut tcp = frame();
        tcp[23] = 6;
        assert_eq!(verdict(&tcp), XDP_PASS, "not UDP");
        assert_eq!(verdict(&frame()[..30]), XDP_PASS, "too short to tell");
    }
}
