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
    programs::{ProgramError, SchedClassifier, TcAttachType, tc::SchedClassifierLinkId},
};
use lb_common::{
    conntrack::{CtEntry, FlowKey},
    counters::COUNTER_SLOTS,
    maps::{
        BACKENDS_MAP, CONNTRACK_MAP, COUNTERS_MAP, MAX_BACKENDS, MAX_CONNTRACK, MAX_SERVICES,
        MAX_SLOTS, PIN_LAYOUT_VERSION, POD_INGRESS_PROGRAM, SERVICES_MAP, SLOTS_MAP,
    },
    service::{Backend, BackendId, ServiceEntry, ServiceKey, SlotKey},
};

use crate::dataplane::BpfMaps;

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

const EXPECTED_MAPS: [ExpectedMap; 5] = [
    expected::<ServiceKey, ServiceEntry>(SERVICES_MAP, MapType::Hash, MAX_SERVICES),
    expected::<SlotKey, BackendId>(SLOTS_MAP, MapType::Hash, MAX_SLOTS),
    expected::<BackendId, Backend>(BACKENDS_MAP, MapType::Hash, MAX_BACKENDS),
    expected::<FlowKey, CtEntry>(CONNTRACK_MAP, MapType::LruHash, MAX_CONNTRACK),
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

struct Attachment {
    ifindex: u32,
    link: SchedClassifierLinkId,
}

/// The loaded packet path: program, maps, and the interfaces it is attached to.
/// Dropping it detaches every interface; pinned maps (and their state) stay for the next run.
pub struct Dataplane {
    ebpf: Ebpf,
    pub maps: BpfMaps,
    pin_dir: PathBuf,
    attached: BTreeMap<String, Attachment>,
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

impl Dataplane {
    /// Loads the packet path with its maps pinned under `<bpffs_dir>/<layout version>/`.
    pub fn load(bpffs_dir: &Path) -> Result<Self, LoadError> {
        let pin_dir = pin_dir(bpffs_dir)?;
        check_pinned(&pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(EBPF_OBJECT)
            .map_err(LoadError::Load)?;
        let program = Self::program_of(&mut ebpf)?;
        program.load().map_err(|source| LoadError::Program {
            name: POD_INGRESS_PROGRAM,
            action: "load (verifier)".to_owned(),
            source,
        })?;
        let maps = BpfMaps {
            services: take_map(&mut ebpf, SERVICES_MAP)?,
            slots: take_map(&mut ebpf, SLOTS_MAP)?,
            backends: take_map(&mut ebpf, BACKENDS_MAP)?,
            counters: take_map(&mut ebpf, COUNTERS_MAP)?,
        };
        Ok(Self {
            ebpf,
            maps,
            pin_dir,
            attached: BTreeMap::new(),
        })
    }

    fn program_of(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
        let program = ebpf
            .program_mut(POD_INGRESS_PROGRAM)
            .ok_or_else(|| LoadError::Program {
                name: POD_INGRESS_PROGRAM,
                action: "lookup".to_owned(),
                source: ProgramError::NotLoaded,
            })?;
        program.try_into().map_err(|source| LoadError::Program {
            name: POD_INGRESS_PROGRAM,
            action: "type check".to_owned(),
            source,
        })
    }

    /// The pod-ingress program, e.g. for BPF_PROG_TEST_RUN.
    pub fn pod_ingress(&mut self) -> &mut SchedClassifier {
        Self::program_of(&mut self.ebpf).expect("checked at load")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Interfaces the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Attaches to `ifname`'s ingress (tcx). Re-attaches when the name now belongs to a new device.
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<bool, LoadError> {
        if self
            .attached
            .get(ifname)
            .is_some_and(|a| a.ifindex == ifindex)
        {
            return Ok(false);
        }
        self.forget(ifname);
        let link = self
            .pod_ingress()
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|source| LoadError::Program {
                name: POD_INGRESS_PROGRAM,
                action: format!("attach to {ifname} ingress"),
                source,
            })?;
        self.attached
            .insert(ifname.to_owned(), Attachment { ifindex, link });
        Ok(true)
    }

    /// Detaches from `ifname`, if attached. A device that is already gone took its link with it.
    pub fn forget(&mut self, ifname: &str) {
        if let Some(old) = self.attached.remove(ifname) {
            // The link may already be gone with its device; either way it is no longer ours.
            let _ = self.pod_ingress().detach(old.link);
        }
    }
}
