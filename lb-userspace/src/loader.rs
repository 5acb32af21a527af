//! Loads the embedded eBPF object, pins its maps (adopting maps a previous run pinned), and
//! attaches the pod-ingress program to interfaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, MapError, MapInfo, MapType, ProgramArray},
    programs::{
        ProgramError, ProgramFd, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::{
    Ip6,
    conntrack::{CtEntry, FlowKey},
    counters::COUNTER_SLOTS,
    maps::{
        AFFINITY_MAP, AFFINITY6_MAP, BACKEND_STATS_MAP, BACKENDS_MAP, BACKENDS6_MAP, CONNTRACK_MAP,
        CONNTRACK6_MAP, COUNTERS_MAP, Capacities, EVENTS_MAP, EVENTS_RING_BYTES,
        EXTERNAL_INGRESS_PROGRAM, EXTERNAL_XDP_PROGRAM, HOST_EGRESS_PROGRAM, LINKS_DIR,
        MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_CONNTRACK6, MAX_SERVICES, MAX_SLOTS,
        MAX_SOURCE_RANGES, MONITOR_BUDGET_MAP, MONITOR_MAP, NODE_MAP, NODE6_MAP,
        PIN_LAYOUT_VERSION, POD_INGRESS_PROGRAM, SERVICE_STATS_MAP, SERVICES_MAP, SERVICES6_MAP,
        SLOTS_MAP, SLOTS_PER_ELEMENT, SOURCE_RANGES_MAP, SOURCE_RANGES6_MAP, STAGE_SLOTS,
        TC_STAGE_PROGRAMS, TC_STAGES_MAP, XDP_STAGE_PROGRAMS, XDP_STAGES_MAP,
    },
    service::{
        AffinityKey, AffinityValue, Backend, BackendId, NodeConfig, NodeConfig6, ServiceEntry,
        ServiceKey, SourceRange, SourceRangeValue,
    },
    stats::{BackendStats, MonitorBudget, MonitorConfig, ServiceStats},
};

use crate::dataplane::{BpfMaps, BpfMaps6, MappedSlots};

/// The packet path, built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },
    #[error("cannot use pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the map pinned at {path} has an incompatible layout ({detail}); it was left by a different \
         version of lb: remove {dir} (this drops its conntrack state) and start again"
    )]
    IncompatiblePin {
        path: PathBuf,
        dir: PathBuf,
        detail: String,
    },
    #[error("failed to read the map pinned at {path}")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("failed to load the eBPF object (are you root, with CAP_BPF and CAP_NET_ADMIN?)")]
    Load(#[source] aya::EbpfError),
    #[error("map {name} is missing from the eBPF object or has the wrong type")]
    MissingMap {
        name: &'static str,
        #[source]
        source: Option<MapError>,
    },
    #[error("cannot map {name} into memory (it must be created BPF_F_MMAPABLE)")]
    MapSlots {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("program {name}: cannot pin its link at {path}: {detail}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("stage program {name}: cannot put it in its program array")]
    Stage {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot give the pinned maps the capacities asked for: {detail}")]
    Resize { detail: String },
    #[error("program {name}: {action} failed")]
    Program {
        name: &'static str,
        action: String,
        #[source]
        source: ProgramError,
    },
}

/// What a map pinned under the layout version must look like to be adopted.
struct ExpectedMap {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

const fn expected<K, V>(name: &'static str, map_type: MapType, max_entries: u32) -> ExpectedMap {
    ExpectedMap {
        name,
        map_type,
        key_size: size_of::<K>(),
        value_size: size_of::<V>(),
        max_entries,
    }
}

const EXPECTED_MAPS: [ExpectedMap; 21] = [
    expected::<ServiceKey, ServiceEntry>(SERVICES_MAP, MapType::Hash, MAX_SERVICES),
    expected::<u32, [BackendId; SLOTS_PER_ELEMENT as usize]>(
        SLOTS_MAP,
        MapType::Array,
        MAX_SLOTS / SLOTS_PER_ELEMENT,
    ),
    expected::<BackendId, Backend>(BACKENDS_MAP, MapType::Hash, MAX_BACKENDS),
    expected::<FlowKey, CtEntry>(CONNTRACK_MAP, MapType::LruHash, MAX_CONNTRACK),
    expected::<AffinityKey, AffinityValue>(AFFINITY_MAP, MapType::LruHash, MAX_AFFINITY),
    expected::<u32, NodeConfig>(NODE_MAP, MapType::Array, 1),
    expected::<u32, u64>(COUNTERS_MAP, MapType::PerCpuArray, COUNTER_SLOTS),
    expected::<aya::maps::lpm_trie::Key<SourceRange>, SourceRangeValue>(
        SOURCE_RANGES_MAP,
        MapType::LpmTrie,
        MAX_SOURCE_RANGES,
    ),
    expected::<u32, ServiceStats>(SERVICE_STATS_MAP, MapType::PerCpuHash, MAX_SERVICES),
    expected::<BackendId, BackendStats>(BACKEND_STATS_MAP, MapType::PerCpuHash, MAX_BACKENDS),
    expected::<u32, MonitorConfig>(MONITOR_MAP, MapType::Array, 1),
    expected::<u32, MonitorBudget>(MONITOR_BUDGET_MAP, MapType::PerCpuArray, 1),
    expected::<(), ()>(EVENTS_MAP, MapType::RingBuf, EVENTS_RING_BYTES),
    expected::<ServiceKey<Ip6>, ServiceEntry>(SERVICES6_MAP, MapType::Hash, MAX_SERVICES),
    expected::<BackendId, Backend<Ip6>>(BACKENDS6_MAP, MapType::Hash, MAX_BACKENDS),
    expected::<FlowKey<Ip6>, CtEntry<Ip6>>(CONNTRACK6_MAP, MapType::LruHash, MAX_CONNTRACK6),
    expected::<AffinityKey<Ip6>, AffinityValue>(AFFINITY6_MAP, MapType::LruHash, MAX_AFFINITY),
    expected::<u32, NodeConfig6>(NODE6_MAP, MapType::Array, 1),
    expected::<aya::maps::lpm_trie::Key<SourceRange<Ip6>>, SourceRangeValue>(
        SOURCE_RANGES6_MAP,
        MapType::LpmTrie,
        MAX_SOURCE_RANGES,
    ),
    expected::<u32, u32>(TC_STAGES_MAP, MapType::ProgramArray, STAGE_SLOTS),
    expected::<u32, u32>(XDP_STAGES_MAP, MapType::ProgramArray, STAGE_SLOTS),
];

/// Pinned maps from another layout must never be reused silently: check before loading.
fn check_pinned(pin_dir: &Path) -> Result<(), LoadError> {
    for want in &EXPECTED_MAPS {
        let path = pin_dir.join(want.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| LoadError::PinnedMap {
            path: path.clone(),
            source,
        })?;
        let map_type = info.map_type().map_err(|source| LoadError::PinnedMap {
            path: path.clone(),
            source,
        })?;
        // Sized maps may differ in capacity: `resize::prepare` decides about those (and
        // replaces a counters map with fewer slots than this lb counts).
        let sized = want.name == COUNTERS_MAP
            || (Capacities::DEFAULT.max_entries().iter())
                .chain(&Capacities::DEFAULT.stats_max_entries())
                .any(|(name, _)| *name == want.name);
        let found = (
            map_type,
            info.key_size() as usize,
            info.value_size() as usize,
            if sized { 0 } else { info.max_entries() },
        );
        let wanted = (
            want.map_type,
            want.key_size,
            want.value_size,
            if sized { 0 } else { want.max_entries },
        );
        if found != wanted {
            return Err(LoadError::IncompatiblePin {
                path,
                dir: pin_dir.to_owned(),
                detail: format!("found type/key/value/max {found:?}, this lb needs {wanted:?}"),
            });
        }
    }
    Ok(())
}

/// The pin directory for this layout under `bpffs_dir`, created if needed.
pub fn pin_dir(bpffs_dir: &Path) -> Result<PathBuf, LoadError> {
    let dir = bpffs_dir.join(PIN_LAYOUT_VERSION);
    std::fs::create_dir_all(&dir).map_err(|source| LoadError::PinDir {
        path: dir.clone(),
        source,
    })?;
    let stat = nix::sys::statfs::statfs(&dir).map_err(|errno| LoadError::PinDir {
        path: dir.clone(),
        source: errno.into(),
    })?;
    if stat.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        return Err(LoadError::NotBpffs { path: dir });
    }
    // Root only: whoever can open a pinned map can rewrite where Services go.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        LoadError::PinDir {
            path: dir.clone(),
            source,
        }
    })?;
    Ok(dir)
}

/// Reads the outcome counters a running (or stopped) agent left pinned under `bpffs_dir`,
/// summed over CPUs. Needs no loaded program.
pub fn pinned_counters(
    bpffs_dir: &Path,
) -> Result<BTreeMap<lb_common::counters::Counter, u64>, LoadError> {
    let path = bpffs_dir.join(PIN_LAYOUT_VERSION).join(COUNTERS_MAP);
    let pinned = |source| LoadError::PinnedMap {
        path: path.clone(),
        source,
    };
    let data = aya::maps::MapData::from_pin(&path).map_err(pinned)?;
    let counters: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(pinned)?;
    lb_common::counters::Counter::ALL
        .iter()
        .map(|c| match counters.get(&(*c as u32), 0) {
            Ok(per_cpu) => Ok((*c, per_cpu.iter().sum())),
            // Pinned by an older agent that did not count this yet.
            Err(MapError::OutOfBounds { .. }) => Ok((*c, 0)),
            Err(source) => Err(pinned(source)),
        })
        .collect()
}

/// What an interface is to the node, which decides the programs it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterfaceRole {
    /// Host side of a pod's veth: pod traffic to Services, replies from local backends.
    Pod,
    /// Towards the network: NodePort/LoadBalancer/externalIP traffic in, replies from other
    /// nodes in, and the node's own processes reaching Services out.
    External,
}

/// Every tc program and where it attaches.
const PROGRAMS: [(&str, TcAttachType, InterfaceRole); 3] = [
    (
        POD_INGRESS_PROGRAM,
        TcAttachType::Ingress,
        InterfaceRole::Pod,
    ),
    (
        EXTERNAL_INGRESS_PROGRAM,
        TcAttachType::Ingress,
        InterfaceRole::External,
    ),
    (
        HOST_EGRESS_PROGRAM,
        TcAttachType::Egress,
        InterfaceRole::External,
    ),
];

/// One attached program: its bpf_link, pinned at `pin` so it outlives this process.
struct Link {
    pin: PathBuf,
    /// Held so the link can be unpinned and closed (detached) on purpose; dropping it alone
    /// leaves the program attached through the pin.
    _fd: FdLink,
}

struct Attachment {
    ifindex: u32,
    role: InterfaceRole,
    links: Vec<Link>,
}

/// Where the link of `program` on `ifname` (device `ifindex`) is pinned: the index is part of
/// the name so a link of a device that went away (and whose name came back) is never mistaken
/// for the new device's.
fn link_pin(links_dir: &Path, ifname: &str, ifindex: u32, program: &str) -> PathBuf {
    links_dir.join(format!("{ifname}@{ifindex}@{program}"))
}

/// Splits a link pin's file name into interface name, index and program.
fn parse_link_pin(name: &str) -> Option<(&str, u32, &str)> {
    let (rest, program) = name.rsplit_once('@')?;
    let (ifname, ifindex) = rest.rsplit_once('@')?;
    Some((ifname, ifindex.parse().ok()?, program))
}

/// The loaded packet path: programs, maps, and the interfaces they are attached to.
/// Attachments are pinned bpf_links: dropping this (or the process dying) leaves every program
/// attached and the maps pinned, so the packet path keeps serving until an agent takes over
/// (replacing each program in place) or `lb cleanup` removes it.
pub struct Dataplane {
    ebpf: Ebpf,
    pub maps: BpfMaps,
    /// The sized maps' capacities as loaded.
    pub capacities: Capacities,
    /// Where a pinned map keeps a capacity other than the one asked for, and why.
    pub capacity_notes: Vec<String>,
    /// Pinned maps created anew at the capacity asked for, (name, old, new capacity): their
    /// content is carried over by [`crate::resize::carry_over`].
    pub resized: Vec<(&'static str, u32, u32)>,
    /// Counter maps replaced to follow new capacities (their counts restart).
    pub counters_reset: Vec<(&'static str, u32, u32)>,
    pin_dir: PathBuf,
    links_dir: PathBuf,
    attached: BTreeMap<String, Attachment>,
    /// Links pinned by an earlier agent and not taken over yet, by pin path.
    adoptable: BTreeSet<PathBuf>,
    /// Also attach the XDP fast path (native mode) to external interfaces.
    xdp: bool,
    stages: Stages,
}

fn take_map<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, LoadError> {
    let map = ebpf
        .take_map(name)
        .ok_or(LoadError::MissingMap { name, source: None })?;
    T::try_from(map).map_err(|source| LoadError::MissingMap {
        name,
        source: Some(source),
    })
}

/// The IPv6 stage programs, loaded, and the (pinned) program arrays they go into.
struct Stages {
    tc: ProgramArray<MapData>,
    xdp: ProgramArray<MapData>,
    /// (program, index, which array: XDP's or tc's, its fd)
    programs: Vec<(&'static str, u32, bool, ProgramFd)>,
}

/// Loads the IPv6 stage programs (the verifier runs now); [`Dataplane::install_stages`] puts
/// them in their arrays.
fn load_stages(ebpf: &mut Ebpf) -> Result<Stages, LoadError> {
    fn program_error(
        name: &'static str,
        action: &'static str,
    ) -> impl Fn(ProgramError) -> LoadError {
        move |source| LoadError::Program {
            name,
            action: action.to_owned(),
            source,
        }
    }
    let loaded = |name, loaded: Result<(), ProgramError>, fd: Result<&ProgramFd, _>| {
        loaded.map_err(program_error(name, "load (verifier)"))?;
        let fd: &ProgramFd = fd.map_err(program_error(name, "take its fd"))?;
        fd.try_clone()
            .map_err(|e| program_error(name, "take its fd")(e.into()))
    };
    let mut programs = Vec::new();
    for (name, index) in TC_STAGE_PROGRAMS {
        let program = Dataplane::program_of(ebpf, name)?;
        programs.push((
            name,
            index,
            false,
            loaded(name, program.load(), program.fd())?,
        ));
    }
    for (name, index) in XDP_STAGE_PROGRAMS {
        let program = Dataplane::xdp_of(ebpf, name)?;
        programs.push((
            name,
            index,
            true,
            loaded(name, program.load(), program.fd())?,
        ));
    }
    Ok(Stages {
        tc: take_map(ebpf, TC_STAGES_MAP)?,
        xdp: take_map(ebpf, XDP_STAGES_MAP)?,
        programs,
    })
}

fn take_slots(ebpf: &mut Ebpf, slots: u32) -> Result<MappedSlots, LoadError> {
    let missing = LoadError::MissingMap {
        name: SLOTS_MAP,
        source: None,
    };
    match ebpf.take_map(SLOTS_MAP) {
        Some(Map::Array(data)) => {
            MappedSlots::new(data, slots).map_err(|source| LoadError::MapSlots {
                name: SLOTS_MAP,
                source,
            })
        }
        _ => Err(missing),
    }
}

impl Dataplane {
    /// Loads the packet path with its maps pinned under `<bpffs_dir>/<layout version>/`, with
    /// the default capacities. With `xdp`, external interfaces also get the XDP fast path.
    /// The IPv6 stages are installed at once (see [`Dataplane::install_stages`]).
    pub fn load(bpffs_dir: &Path, xdp: bool) -> Result<Self, LoadError> {
        let mut dataplane = Self::load_sized(bpffs_dir, xdp, Capacities::DEFAULT)?;
        dataplane.install_stages()?;
        Ok(dataplane)
    }

    /// [`Dataplane::load`] with the sized maps created at `wanted` capacities. A map already
    /// pinned with another capacity is created anew at the new one when all it holds fits
    /// ([`Dataplane::resized`]; the agent carries its content over with
    /// [`crate::resize::carry_over`]), and kept as it is otherwise
    /// ([`Dataplane::capacity_notes`] says why): a restart never loses flows.
    pub fn load_sized(bpffs_dir: &Path, xdp: bool, wanted: Capacities) -> Result<Self, LoadError> {
        let pin_dir = pin_dir(bpffs_dir)?;
        check_pinned(&pin_dir)?;
        let resize = crate::resize::prepare(&pin_dir, wanted).map_err(|err| LoadError::Resize {
            detail: format!("{err:#}"),
        })?;
        let capacities = resize.capacities;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&pin_dir);
        for (name, entries) in capacities
            .max_entries()
            .into_iter()
            .chain(capacities.stats_max_entries())
        {
            loader.map_max_entries(name, entries);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Load)?;
        for (name, _, _) in PROGRAMS {
            Self::program_of(&mut ebpf, name)?
                .load()
                .map_err(|source| LoadError::Program {
                    name,
                    action: "load (verifier)".to_owned(),
                    source,
                })?;
        }
        Self::xdp_of(&mut ebpf, EXTERNAL_XDP_PROGRAM)?
            .load()
            .map_err(|source| LoadError::Program {
                name: EXTERNAL_XDP_PROGRAM,
                action: "load (verifier)".to_owned(),
                source,
            })?;
        let stages = load_stages(&mut ebpf)?;
        let maps = BpfMaps {
            services: take_map(&mut ebpf, SERVICES_MAP)?,
            slots: take_slots(&mut ebpf, capacities.slots)?,
            backends: take_map(&mut ebpf, BACKENDS_MAP)?,
            affinity: take_map(&mut ebpf, AFFINITY_MAP)?,
            conntrack: take_map(&mut ebpf, CONNTRACK_MAP)?,
            node: take_map(&mut ebpf, NODE_MAP)?,
            counters: take_map(&mut ebpf, COUNTERS_MAP)?,
            source_ranges: take_map(&mut ebpf, SOURCE_RANGES_MAP)?,
            service_stats: take_map(&mut ebpf, SERVICE_STATS_MAP)?,
            backend_stats: take_map(&mut ebpf, BACKEND_STATS_MAP)?,
            v6: BpfMaps6 {
                services: take_map(&mut ebpf, SERVICES6_MAP)?,
                backends: take_map(&mut ebpf, BACKENDS6_MAP)?,
                affinity: take_map(&mut ebpf, AFFINITY6_MAP)?,
                conntrack: take_map(&mut ebpf, CONNTRACK6_MAP)?,
                node: take_map(&mut ebpf, NODE6_MAP)?,
                source_ranges: take_map(&mut ebpf, SOURCE_RANGES6_MAP)?,
            },
        };
        let links_dir = pin_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&links_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| LoadError::PinDir {
                path: links_dir.clone(),
                source,
            })?;
        let adoptable = std::fs::read_dir(&links_dir)
            .map_err(|source| LoadError::PinDir {
                path: links_dir.clone(),
                source,
            })?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|path| {
                let ours = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(parse_link_pin)
                    .is_some();
                if !ours {
                    // Not a name lb writes: nothing to take over.
                    let _ = std::fs::remove_file(path);
                }
                ours
            })
            .collect();
        Ok(Self {
            ebpf,
            maps,
            capacities,
            capacity_notes: resize.kept,
            resized: resize.resized,
            counters_reset: resize.counters_reset,
            pin_dir,
            links_dir,
            attached: BTreeMap::new(),
            adoptable,
            xdp,
            stages,
        })
    }

    /// Puts this agent's IPv6 stages in the pinned program arrays: from now on every entry
    /// point, this agent's or an earlier one's still attached, runs IPv6 in these programs and
    /// their maps. The agent calls it once the resized maps' content is carried over and before
    /// it attaches anything (an entry point without its stage passes IPv6 untouched); called
    /// earlier, an earlier agent's entry points would reach the new maps while they are still
    /// empty.
    pub fn install_stages(&mut self) -> Result<(), LoadError> {
        for (name, index, xdp, fd) in &self.stages.programs {
            let array = if *xdp {
                &mut self.stages.xdp
            } else {
                &mut self.stages.tc
            };
            array
                .set(*index, fd, 0)
                .map_err(|source| LoadError::Stage { name, source })?;
        }
        Ok(())
    }

    /// Links an earlier agent pinned that no interface took over (the device is gone, or no
    /// longer matches): unpinned, which detaches them. Called after the first interface scan.
    pub fn drop_unclaimed_links(&mut self) -> usize {
        let stale = std::mem::take(&mut self.adoptable);
        for path in &stale {
            let _ = std::fs::remove_file(path);
        }
        stale.len()
    }

    /// How many links an earlier agent pinned that no interface has taken over yet.
    pub fn adoptable_links(&self) -> usize {
        self.adoptable.len()
    }

    fn xdp_of<'e>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut Xdp, LoadError> {
        let program = ebpf.program_mut(name).ok_or(LoadError::Program {
            name,
            action: "lookup".to_owned(),
            source: ProgramError::NotLoaded,
        })?;
        program.try_into().map_err(|source| LoadError::Program {
            name,
            action: "type check".to_owned(),
            source,
        })
    }

    /// The XDP program, e.g. for BPF_PROG_TEST_RUN.
    pub fn external_xdp(&mut self) -> &mut Xdp {
        Self::xdp_of(&mut self.ebpf, EXTERNAL_XDP_PROGRAM).expect("checked at load")
    }

    fn program_of<'e>(
        ebpf: &'e mut Ebpf,
        name: &'static str,
    ) -> Result<&'e mut SchedClassifier, LoadError> {
        let program = ebpf.program_mut(name).ok_or(LoadError::Program {
            name,
            action: "lookup".to_owned(),
            source: ProgramError::NotLoaded,
        })?;
        program.try_into().map_err(|source| LoadError::Program {
            name,
            action: "type check".to_owned(),
            source,
        })
    }

    /// One of the tc programs by name (see lb_common::maps), e.g. for BPF_PROG_TEST_RUN.
    pub fn program(&mut self, name: &'static str) -> &mut SchedClassifier {
        Self::program_of(&mut self.ebpf, name).expect("every program is checked at load")
    }

    /// The pod-ingress program.
    pub fn pod_ingress(&mut self) -> &mut SchedClassifier {
        self.program(POD_INGRESS_PROGRAM)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Interfaces the programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Attaches the programs for `role` to `ifname` (tcx, pinned links). A link an earlier
    /// agent pinned for the same device and program is taken over: its program is replaced in
    /// place (BPF_LINK_UPDATE), so the interface is never without one. Re-attaches when the name
    /// now belongs to a new device or its role changed. Returns whether anything changed.
    pub fn attach(
        &mut self,
        ifname: &str,
        ifindex: u32,
        role: InterfaceRole,
    ) -> Result<bool, LoadError> {
        if self
            .attached
            .get(ifname)
            .is_some_and(|a| a.ifindex == ifindex && a.role == role)
        {
            return Ok(false);
        }
        self.forget(ifname);
        let mut attachment = Attachment {
            ifindex,
            role,
            links: Vec::new(),
        };
        let mut wanted: Vec<&'static str> = PROGRAMS
            .iter()
            .filter(|(_, _, for_role)| *for_role == role)
            .map(|(name, _, _)| *name)
            .collect();
        if self.xdp && role == InterfaceRole::External {
            wanted.push(EXTERNAL_XDP_PROGRAM);
        }
        for name in wanted {
            match self.attach_one(ifname, ifindex, name) {
                Ok(link) => attachment.links.push(link),
                Err(err) => {
                    Self::detach_all(attachment.links);
                    return Err(err);
                }
            }
        }
        // A pinned XDP link from a run with --xdp, on a run without it: detach.
        if !(self.xdp && role == InterfaceRole::External) {
            let stale = link_pin(&self.links_dir, ifname, ifindex, EXTERNAL_XDP_PROGRAM);
            if self.adoptable.remove(&stale) {
                let _ = std::fs::remove_file(&stale);
            }
        }
        self.attached.insert(ifname.to_owned(), attachment);
        Ok(true)
    }

    fn attach_one(
        &mut self,
        ifname: &str,
        ifindex: u32,
        name: &'static str,
    ) -> Result<Link, LoadError> {
        let pin = link_pin(&self.links_dir, ifname, ifindex, name);
        let failed = |action: String, source: ProgramError| LoadError::Program {
            name,
            action,
            source,
        };
        if self.adoptable.remove(&pin) {
            match self.take_over(&pin, name) {
                Ok(fd) => return Ok(Link { pin, _fd: fd }),
                Err(err) => {
                    // Not usable (e.g. the device went away and came back): start afresh.
                    tracing::warn!(
                        "cannot take over the link pinned at {}: {err}; attaching anew",
                        pin.display()
                    );
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let pin_failed = |detail: String| LoadError::PinLink {
            name,
            path: pin.clone(),
            detail,
        };
        let fd: FdLink = if name == EXTERNAL_XDP_PROGRAM {
            let program = self.external_xdp();
            let id = program.attach(ifname, XdpMode::Driver).map_err(|source| {
                failed(
                    format!(
                        "attach to {ifname} in native (driver) mode; the driver may not \
                         support XDP: run without --xdp"
                    ),
                    source,
                )
            })?;
            let link = program
                .take_link(id)
                .map_err(|source| failed("take its link".to_owned(), source))?;
            link.try_into()
                .map_err(|e: LinkError| pin_failed(e.to_string()))?
        } else {
            let direction = PROGRAMS
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, d, _)| *d)
                .expect("a tc program");
            let program = self.program(name);
            let id = program
                .attach(ifname, direction)
                .map_err(|source| failed(format!("attach to {ifname} {direction:?}"), source))?;
            let link = program
                .take_link(id)
                .map_err(|source| failed("take its link".to_owned(), source))?;
            link.try_into()
                .map_err(|e: LinkError| pin_failed(e.to_string()))?
        };
        let pinned = fd.pin(&pin).map_err(|e| pin_failed(e.to_string()))?;
        Ok(Link {
            pin,
            _fd: pinned.into(),
        })
    }

    /// Replaces the program of the link pinned at `pin` with this agent's `name`, atomically.
    fn take_over(&mut self, pin: &Path, name: &'static str) -> Result<FdLink, String> {
        let text = |e: &dyn std::fmt::Display| e.to_string();
        let fd: FdLink = PinnedLink::from_pin(pin).map_err(|e| text(&e))?.into();
        if name == EXTERNAL_XDP_PROGRAM {
            let link = XdpLink::try_from(fd).map_err(|e| text(&e))?;
            let program = self.external_xdp();
            let id = program.attach_to_link(link).map_err(|e| text(&e))?;
            let link = program.take_link(id).map_err(|e| text(&e))?;
            FdLink::try_from(link).map_err(|e| text(&e))
        } else {
            let link = SchedClassifierLink::try_from(fd).map_err(|e| text(&e))?;
            let program = self.program(name);
            let id = program.attach_to_link(link).map_err(|e| text(&e))?;
            let link = program.take_link(id).map_err(|e| text(&e))?;
            FdLink::try_from(link).map_err(|e| text(&e))
        }
    }

    /// Unpins and closes each link: the programs are detached.
    fn detach_all(links: Vec<Link>) {
        for link in links {
            let _ = std::fs::remove_file(&link.pin);
        }
    }

    /// Detaches from `ifname`, if attached. A device that is already gone took its links with it.
    pub fn forget(&mut self, ifname: &str) {
        if let Some(old) = self.attached.remove(ifname) {
            Self::detach_all(old.links);
        }
    }
}

/// `lb cleanup` / `lb agent --cleanup`: unpins every link (detaching lb's programs from every
/// interface) and every map lb pinned under `bpffs_dir`, of any layout version. Returns what was
/// removed. Established flows through lb lose their translation: this is the uninstall.
pub fn cleanup(bpffs_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(layouts) = std::fs::read_dir(bpffs_dir) else {
        return Ok(removed);
    };
    for layout in layouts {
        let layout = layout?.path();
        if !layout.is_dir() {
            continue;
        }
        // Links first, so no program is left attached to maps that are going away.
        let links = layout.join(LINKS_DIR);
        if let Ok(entries) = std::fs::read_dir(&links) {
            for entry in entries {
                let path = entry?.path();
                std::fs::remove_file(&path)?;
                removed.push(path);
            }
            std::fs::remove_dir(&links)?;
        }
        // Then the maps, including those a resize left aside.
        for entry in std::fs::read_dir(&layout)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            removed.push(path);
        }
        std::fs::remove_dir(&layout)?;
    }
    let _ = std::fs::remove_dir(bpffs_dir);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_name_device_and_program() {
        let pin = link_pin(Path::new("/x"), "lbp-pod@a", 12, POD_INGRESS_PROGRAM);
        let name = pin.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            parse_link_pin(name),
            Some(("lbp-pod@a", 12, POD_INGRESS_PROGRAM))
        );
        assert_eq!(parse_link_pin("garbage"), None);
    }
}
