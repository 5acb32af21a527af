//! What the pod-ingress (tc) and external XDP programs cost per packet on their main paths, this
//! build beside a baseline measured in the same run: by default the v2 release (the last before
//! the conntrack lifecycle), or any `lb` binary or BPF object given in LB_PACKET_COST_BASELINE.
//!
//!     cargo bench -p lb-userspace --bench packet_cost                 (as root)
//!     cargo bench -p lb-userspace --bench packet_cost -- 5 1000000     (rounds, repeat)
//!     LB_PACKET_COST_BASELINE=/tmp/lb-old cargo bench -p lb-userspace --bench packet_cost
//!
//! Each object is loaded with maps of its own (pinned in a scratch bpffs directory), one
//! ClusterIP with two backends is written straight into its maps (the service, backend and slot
//! layouts are the same in v2 and v3), and BPF_PROG_TEST_RUN times each path with `repeat`
//! runs of one packet: the kernel reports the mean time a run. A new flow cannot repeat (the
//! first run creates it), so it is timed as the mean of single runs over distinct source ports.
//! The v2 object is taken out of the v2 release's `lb` binary (tests/fixtures/). Medians of the
//! rounds with min-max; objects alternate within a round, as this machine is shared.
//! The XDP program sees no route in a test run, so its timed paths are the ones that hand the
//! packet to tc: not a Service, and a known DNAT-only flow.

mod per_packet;

use per_packet::{median_min_max, rounds_and_repeat};

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use lb_common::{
    IPPROTO_TCP, addr_be,
    maps::{BACKENDS_MAP, EXTERNAL_XDP_PROGRAM, POD_INGRESS_PROGRAM, SERVICES_MAP, SLOTS_MAP},
    port_be,
    service::{Backend, BackendId, ServiceEntry, ServiceKey},
};

const CLIENT: [u8; 4] = [10, 244, 1, 2];
const VIP: [u8; 4] = [10, 96, 0, 10];
const PODS: [[u8; 4]; 2] = [[10, 244, 1, 11], [10, 244, 1, 12]];
const TABLE: u32 = 251;

struct Loaded {
    name: &'static str,
    ebpf: aya::Ebpf,
    _pins: PinDir,
}

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load(name: &'static str, object: &[u8]) -> Loaded {
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/lb-packet-cost-{}-{name}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pins.0).expect("a scratch pin directory on bpffs");
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pins.0)
        .load(object)
        .unwrap_or_else(|e| panic!("load the {name} object: {e}"));
    let program: &mut SchedClassifier = ebpf
        .program_mut(POD_INGRESS_PROGRAM)
        .expect("pod ingress program")
        .try_into()
        .unwrap();
    program.load().expect("verifier");
    let xdp: &mut Xdp = ebpf
        .program_mut(EXTERNAL_XDP_PROGRAM)
        .expect("XDP program")
        .try_into()
        .unwrap();
    xdp.load().expect("verifier (XDP)");
    let mut services: HashMap<_, ServiceKey, ServiceEntry> =
        HashMap::try_from(ebpf.map_mut(SERVICES_MAP).unwrap()).unwrap();
    services
        .insert(
            ServiceKey::new(addr_be(VIP), port_be(80), IPPROTO_TCP),
            ServiceEntry {
                service_id: 1,
                table_offset: 0,
                table_size: TABLE,
                affinity_timeout_s: 0,
                flags: 0,
                _pad: 0,
                source_ranges_id: 0,
            },
            0,
        )
        .unwrap();
    let mut backends: HashMap<_, BackendId, Backend> =
        HashMap::try_from(ebpf.map_mut(BACKENDS_MAP).unwrap()).unwrap();
    for (i, pod) in PODS.iter().enumerate() {
        backends
            .insert(
                i as u32 + 1,
                Backend::new(addr_be(*pod), port_be(8080), 0),
                0,
            )
            .unwrap();
    }
    let mut slots: Array<_, [BackendId; 2]> =
        Array::try_from(ebpf.map_mut(SLOTS_MAP).unwrap()).unwrap();
    for element in 0..TABLE.div_ceil(2) {
        slots.set(element, [1, 2], 0).unwrap();
    }
    Loaded {
        name,
        ebpf,
        _pins: pins,
    }
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut out = Vec::new();
    builder.write(&mut out, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    out
}

/// A frame that is not IPv4: the cheapest way through the program (the floor).
fn not_ipv4() -> Vec<u8> {
    let mut frame = tcp(CLIENT, 1, VIP, 80, false);
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frame
}

#[derive(Clone, Copy)]
enum Program {
    PodIngress,
    ExternalXdp,
}

/// Mean kernel time a run of `packet` through `program`, over `repeat` runs; and the output of
/// the last.
fn run(loaded: &mut Loaded, program: Program, packet: &[u8], repeat: u32) -> (Duration, Vec<u8>) {
    let mut out = vec![0u8; packet.len() + 64];
    let options = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    let result = match program {
        Program::PodIngress => {
            let tc: &mut SchedClassifier = loaded
                .ebpf
                .program_mut(POD_INGRESS_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            tc.test_run(options)
        }
        Program::ExternalXdp => {
            let xdp: &mut Xdp = loaded
                .ebpf
                .program_mut(EXTERNAL_XDP_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            xdp.test_run(options)
        }
    }
    .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN: {e}", loaded.name));
    out.truncate(result.data_size_out as usize);
    (result.duration, out)
}

/// The object inside a `lb` binary: the embedded ELF whose machine is BPF (247).
fn embedded_bpf_object(binary: &[u8]) -> Option<Vec<u8>> {
    let magic = b"\x7fELF\x02\x01\x01";
    (1..binary.len().saturating_sub(64)).find_map(|at| {
        let elf = &binary[at..];
        if !elf.starts_with(magic) || u16::from_le_bytes([elf[18], elf[19]]) != 247 {
            return None;
        }
        let shoff = u64::from_le_bytes(elf[40..48].try_into().ok()?) as usize;
        let shentsize = u16::from_le_bytes([elf[58], elf[59]]) as usize;
        let shnum = u16::from_le_bytes([elf[60], elf[61]]) as usize;
        let len = shoff + shentsize * shnum;
        (len <= elf.len()).then(|| elf[..len].to_vec())
    })
}

/// The baseline object: LB_PACKET_COST_BASELINE (an `lb` binary or a BPF object), else v2's.
fn baseline_object() -> (&'static str, Vec<u8>) {
    let Some(path) = std::env::var_os("LB_PACKET_COST_BASELINE") else {
        let v2 = v2_object().expect("the v2 object inside tests/fixtures/lb-v2-80bf481.xz");
        return ("v2 (80bf481)", v2);
    };
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("LB_PACKET_COST_BASELINE {}: {e}", path.to_string_lossy()));
    let object = if u16::from_le_bytes([bytes[18], bytes[19]]) == 247 {
        bytes
    } else {
        embedded_bpf_object(&bytes).expect("a BPF object inside LB_PACKET_COST_BASELINE")
    };
    let name = Path::new(&path)
        .file_name()
        .map_or("baseline".into(), |n| n.to_string_lossy().into_owned());
    (Box::leak(name.into_boxed_str()), object)
}

fn v2_object() -> Option<Vec<u8>> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lb-v2-80bf481.xz");
    let out = std::process::Command::new("xz")
        .arg("-dc")
        .arg(&fixture)
        .output()
        .ok()?;
    embedded_bpf_object(&out.stdout)
}

/// (translated instructions, instructions the verifier processed) of `program`: deterministic,
/// unlike timings, so a change in code size shows whatever the machine's noise.
fn sizes(loaded: &Loaded, program: &str) -> (u32, u32) {
    let info = loaded
        .ebpf
        .program(program)
        .expect("program")
        .info()
        .expect("program info");
    (
        info.size_translated().unwrap_or(0) / 8,
        info.verified_instruction_count().unwrap_or(0),
    )
}

fn main() {
    let (rounds, repeat) = rounds_and_repeat();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("packet_cost: needs root (BPF_PROG_TEST_RUN); skipped");
        return;
    }
    let (baseline_name, baseline) = baseline_object();
    let mut objects = [
        load(baseline_name, &baseline),
        load("this build", lb_userspace::loader::EBPF_OBJECT),
    ];
    const PATHS: [&str; 8] = [
        "tc: not IPv4 (floor)",
        "tc: not a Service (pass)",
        "tc: established, client -> Service",
        "tc: established, reply",
        "xdp: not IPv4 (floor)",
        "xdp: not a Service (to tc)",
        "xdp: DNAT-only flow (to tc)",
        "tc: new flow (SYN)",
    ];
    // [object][path] -> ns per round
    let mut samples = vec![vec![Vec::new(); PATHS.len()]; objects.len()];
    let mut next_port = 20_000u16;
    for _ in 0..rounds {
        for (o, loaded) in objects.iter_mut().enumerate() {
            let (_, first) = run(
                loaded,
                Program::PodIngress,
                &tcp(CLIENT, 40_000, VIP, 80, true),
                1,
            );
            let backend: [u8; 4] = first[30..34].try_into().unwrap();
            let packets = [
                (Program::PodIngress, not_ipv4()),
                (
                    Program::PodIngress,
                    tcp(CLIENT, 40_001, PODS[0], 8080, false),
                ),
                (Program::PodIngress, tcp(CLIENT, 40_000, VIP, 80, false)),
                (
                    Program::PodIngress,
                    tcp(backend, 8080, CLIENT, 40_000, false),
                ),
                (Program::ExternalXdp, not_ipv4()),
                (
                    Program::ExternalXdp,
                    tcp(CLIENT, 40_001, PODS[0], 8080, false),
                ),
                (Program::ExternalXdp, tcp(CLIENT, 40_000, VIP, 80, false)),
            ];
            for (p, (program, packet)) in packets.iter().enumerate() {
                let (mean, _) = run(loaded, *program, packet, repeat);
                samples[o][p].push(mean.as_nanos() as f64);
            }
            let flows = 20_000u32;
            let mut total = Duration::ZERO;
            for _ in 0..flows {
                next_port = next_port.wrapping_add(1).max(1024);
                let syn = tcp(CLIENT, next_port, VIP, 80, true);
                total += run(loaded, Program::PodIngress, &syn, 1).0;
            }
            samples[o][PATHS.len() - 1].push(total.as_nanos() as f64 / flows as f64);
        }
    }
    println!(
        "ns per packet (BPF_PROG_TEST_RUN, {repeat} runs; new flows: 20,000 single runs), \
         median of {rounds} rounds (min-max):"
    );
    println!(
        "{:<32} {:>24} {:>24} {:>7}",
        "path", objects[0].name, objects[1].name, "ratio"
    );
    println!("{:<32} {:>24} {:>24}", "program size", "", "");
    for program in [POD_INGRESS_PROGRAM, EXTERNAL_XDP_PROGRAM] {
        let [a, b] = [&objects[0], &objects[1]].map(|o| {
            let (insns, verified) = sizes(o, program);
            format!("{insns} insns, {verified} verified")
        });
        println!("{program:<32} {a:>24} {b:>24}");
    }
    for (p, path) in PATHS.iter().enumerate() {
        let (a, a_lo, a_hi) = median_min_max(samples[0][p].clone());
        let (b, b_lo, b_hi) = median_min_max(samples[1][p].clone());
        println!(
            "{path:<32} {:>24} {:>24} {:>7.2}",
            format!("{a:.1} ({a_lo:.1}-{a_hi:.1})"),
            format!("{b:.1} ({b_lo:.1}-{b_hi:.1})"),
            b / a
        );
    }
}
