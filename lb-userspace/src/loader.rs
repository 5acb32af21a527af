//! Loads the embedded eBPF object, pins its maps (adopting maps a previous run pinned), and
//! attaches the pod-ingress program to interfaces.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapError, MapInfo, MapType},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
};
use lb_common::{
    conntrack::{CtEntry, FlowKey},
    counters::COUNTER_SLOTS,
    maps::{
        AFFINITY_MAP, BACKENDS_MAP, CONNTRACK_MAP, COUNTERS_MAP, EXTERNAL_INGRESS_PROGRAM,
        EXTERNAL_XDP_PROGRAM, HOST_EGRESS_PROGRAM, MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK,
        MAX_SERVICES, MAX_SLOTS, NODE_MAP, PIN_LAYOUT_VERSION, POD_INGRESS_PROGRAM, SERVICES_MAP,
        SLOTS_MAP, SLOTS_PER_ELEMENT,
    },
    service::{
        AffinityKey, AffinityValue, Backend, BackendId, NodeConfig, ServiceEntry, ServiceKey,
    },
};

use crate::dataplane::{BpfMaps, MappedSlots};

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

const EXPECTED_MAPS: [ExpectedMap; 7] = [
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
        let found = (
            map_type,
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        let wanted = (
            want.map_type,
            want.key_size,
            want.value_size,
            want.max_entries,
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
        .map(|c| {
            let per_cpu = counters.get(&(*c as u32), 0).map_err(pinned)?;
            Ok((*c, per_cpu.iter().sum()))
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

enum Link {
    Tc(&'static str, SchedClassifierLinkId),
    Xdp(XdpLinkId),
}

struct Attachment {
    ifindex: u32,
    role: InterfaceRole,
    links: Vec<Link>,
}

/// The loaded packet path: programs, maps, and the interfaces they are attached to.
/// Dropping it detaches every interface; pinned maps (and their state) stay for the next run.
pub struct Dataplane {
    ebpf: Ebpf,
    pub maps: BpfMaps,
    pin_dir: PathBuf,
    attached: BTreeMap<String, Attachment>,
    /// Also attach the XDP fast path (native mode) to external interfaces.
    xdp: bool,
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

fn take_slots(ebpf: &mut Ebpf) -> Result<MappedSlots, LoadError> {
    let missing = LoadError::MissingMap {
        name: SLOTS_MAP,
        source: None,
    };
    match ebpf.take_map(SLOTS_MAP) {
        Some(Map::Array(data)) => MappedSlots::new(data).map_err(|source| LoadError::MapSlots {
            name: SLOTS_MAP,
            source,
        }),
        _ => Err(missing),
    }
}

impl Dataplane {
    /// Loads the packet path with its maps pinned under `<bpffs_dir>/<layout version>/`. With
    /// `xdp`, external interfaces also get the XDP fast path.
    pub fn load(bpffs_dir: &Path, xdp: bool) -> Result<Self, LoadError> {
        let pin_dir = pin_dir(bpffs_dir)?;
        check_pinned(&pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(EBPF_OBJECT)
            .map_err(LoadError::Load)?;
        for (name, _, _) in PROGRAMS {
            Self::program_of(&mut ebpf, name)?
                .load()
                .map_err(|source| LoadError::Program {
                    name,
                    action: "load (verifier)".to_owned(),
                    source,
                })?;
        }
        Self::xdp_of(&mut ebpf)?
            .load()
            .map_err(|source| LoadError::Program {
                name: EXTERNAL_XDP_PROGRAM,
                action: "load (verifier)".to_owned(),
                source,
            })?;
        let maps = BpfMaps {
            services: take_map(&mut ebpf, SERVICES_MAP)?,
            slots: take_slots(&mut ebpf)?,
            backends: take_map(&mut ebpf, BACKENDS_MAP)?,
            affinity: take_map(&mut ebpf, AFFINITY_MAP)?,
            node: take_map(&mut ebpf, NODE_MAP)?,
            counters: take_map(&mut ebpf, COUNTERS_MAP)?,
        };
        Ok(Self {
            ebpf,
            maps,
            pin_dir,
            attached: BTreeMap::new(),
            xdp,
        })
    }

    fn xdp_of(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
        let program = ebpf
            .program_mut(EXTERNAL_XDP_PROGRAM)
            .ok_or(LoadError::Program {
                name: EXTERNAL_XDP_PROGRAM,
                action: "lookup".to_owned(),
                source: ProgramError::NotLoaded,
            })?;
        program.try_into().map_err(|source| LoadError::Program {
            name: EXTERNAL_XDP_PROGRAM,
            action: "type check".to_owned(),
            source,
        })
    }

    /// The XDP program, e.g. for BPF_PROG_TEST_RUN.
    pub fn external_xdp(&mut self) -> &mut Xdp {
        Self::xdp_of(&mut self.ebpf).expect("checked at load")
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

    /// Attaches the programs for `role` to `ifname` (tcx). Re-attaches when the name now belongs
    /// to a new device or its role changed. Returns whether anything was attached.
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
        for (name, direction, for_role) in PROGRAMS {
            if for_role != role {
                continue;
            }
            match self.program(name).attach(ifname, direction) {
                Ok(link) => attachment.links.push(Link::Tc(name, link)),
                Err(source) => {
                    self.detach_all(attachment.links);
                    return Err(LoadError::Program {
                        name,
                        action: format!("attach to {ifname} {direction:?}"),
                        source,
                    });
                }
            }
        }
        if self.xdp && role == InterfaceRole::External {
            match self.external_xdp().attach(ifname, XdpMode::Driver) {
                Ok(link) => attachment.links.push(Link::Xdp(link)),
                Err(source) => {
                    self.detach_all(attachment.links);
                    return Err(LoadError::Program {
                        name: EXTERNAL_XDP_PROGRAM,
                        action: format!(
                            "attach to {ifname} in native (driver) mode; the driver may not \
                             support XDP: run without --xdp"
                        ),
                        source,
                    });
                }
            }
        }
        self.attached.insert(ifname.to_owned(), attachment);
        Ok(true)
    }

    fn detach_all(&mut self, links: Vec<Link>) {
        for link in links {
            // A link may already be gone with its device; either way it is no longer ours.
            let _ = match link {
                Link::Tc(name, link) => self.program(name).detach(link),
                Link::Xdp(link) => self.external_xdp().detach(link),
            };
        }
    }

    /// Detaches from `ifname`, if attached. A device that is already gone took its links with it.
    pub fn forget(&mut self, ifname: &str) {
        if let Some(old) = self.attached.remove(ifname) {
            self.detach_all(old.links);
        }
    }
}
