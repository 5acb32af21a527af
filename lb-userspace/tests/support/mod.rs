//! Shared by the privileged tests: a root gate, a loaded data path with its own pin directory,
//! and provisioning through the same code the agent uses.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod cluster;
pub mod controller;
pub mod packet_netns;
pub mod streams;

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use lb_common::counters::Counter;
use lb_userspace::{
    loader::Dataplane,
    manifest,
    sync::Programmer,
    translate::{NodeContext, translate},
};

/// True when the test may run. Without root, says why in one line and returns false; in CI
/// (CI=true, always root) a missing privilege is a failure, never a silent skip.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root and CI must run it as root"
    );
    // Written to the real stderr (not `eprintln!`, which the test harness captures and hides for
    // passing tests), so the skip is always visible.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root (BPF and network namespaces); run `cargo xtask test` as root"
    );
    false
}

/// A unique bpffs directory for one test, removed (with its pinned maps) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(test: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        lb_testbed::host::ensure_bpffs().expect("bpffs at /sys/fs/bpf");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/lb-test-{}-{n}-{test}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real packet path, loaded with pinned maps in a private directory.
pub struct LoadedPath {
    pub dataplane: Dataplane,
    pub programmer: Programmer,
    // Dropped after the dataplane, so the pins go once nothing uses them.
    _pins: PinDir,
}

impl LoadedPath {
    pub fn load(test: &str) -> Self {
        let pins = PinDir::new(test);
        let dataplane = Dataplane::load(&pins.0, false).expect("load the packet path");
        Self {
            dataplane,
            programmer: Programmer::default(),
            _pins: pins,
        }
    }

    /// Programs the maps from YAML exactly as `lb agent --manifests` does, with no node context.
    pub fn provision(&mut self, yaml: &str) {
        self.provision_as(yaml, &NodeContext::default());
    }

    /// Programs the maps from YAML as the agent on `node` does.
    pub fn provision_as(&mut self, yaml: &str, node: &NodeContext) {
        let read = manifest::parse(yaml, "test manifest");
        assert!(
            read.problems.is_empty(),
            "test manifest has problems: {:?}",
            read.problems
        );
        let desired = translate(&read.objects, node);
        let (_, unplaced) = self
            .programmer
            .sync(&desired, &mut self.dataplane.maps)
            .expect("program the maps");
        assert!(unplaced.is_empty(), "{unplaced:?}");
    }

    /// The bpffs directory the maps are pinned under (what `lb --bpffs-dir` takes).
    pub fn bpffs_dir(&self) -> &std::path::Path {
        &self._pins.0
    }

    pub fn counters(&self) -> BTreeMap<Counter, u64> {
        self.dataplane.maps.read_counters().expect("read counters")
    }
}
