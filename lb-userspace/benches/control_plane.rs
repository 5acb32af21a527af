//! The control plane from a manifest file at scale, in the agent's own code path: the source
//! (read, split, parse), translation and the sync into real (pinned) BPF maps.
//!
//!     cargo bench -p lb-userspace --bench control_plane                     (as root)
//!     cargo bench -p lb-userspace --bench control_plane -- 3 100 10000 50000   (rounds, scales)
//!
//! Each round at each scale runs in a fresh process (so its peak RSS is its own): it programs
//! N Services (2-10 endpoints each, as the side-by-side benchmark's) from nothing, then makes 20
//! changes, one Service gaining or losing an endpoint each, re-reading the whole file every
//! time. It reports the time to program everything (and how much of it is reading the YAML,
//! which an agent fed by the API server does not pay), the changes' p50 and p99, VmHWM (which
//! includes the mapped slots array) and the heap in use after (RssAnon), and the time and size
//! of the state file the agent writes after a sync (`lb services` reads it), and what one `lb
//! services -o json` (the same work as a /metrics scrape) takes, in a process of its own. The manifests are
//! written by a helper process, so the generator's memory is not counted. The smallest scale is
//! the baseline for ratios, measured in the same run. Above 10,000 Services the maps are sized
//! as the agent's capacity flags would size them (see `capacities_for`).

use std::{net::Ipv4Addr, path::Path, process::Command, time::Instant};

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use lb_common::maps::Capacities;
use lb_testbed::kube_proxy_layouts::{SYNTHETIC_NODE_PORTS, manifests_yaml, synthetic_cluster};
use lb_userspace::{
    loader::Dataplane,
    pipeline::Pipeline,
    sources::{ManifestSource, ObjectSource as _},
    state::Snapshot,
    sync::{Programmer, Settings},
    translate::NodeContext,
};

const CHANGES: usize = 20;

/// The defaults up to 10,000 Services; beyond, what the agent's flags would ask for
/// (`--max-frontends`, `--max-backends`, `--max-maglev-slots`), sized for `services`.
fn capacities_for(services: usize) -> Capacities {
    if services <= 10_000 {
        return Capacities::DEFAULT;
    }
    let n = services as u32;
    Capacities {
        frontends: (4 * n).next_power_of_two(),
        backends: (8 * n).next_power_of_two(),
        slots: (800 * n).next_power_of_two(),
        ..Capacities::DEFAULT
    }
}

/// One round at one scale, in this process; prints one line of figures for the parent.
fn child(services: usize) {
    let dir = std::env::temp_dir().join(format!("lb-cp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("services.yaml");
    write_manifest(services, 0, &manifest);
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/lb-cp-bench-{}", std::process::id()));
    let capacities = capacities_for(services);
    let mut dataplane =
        Dataplane::load_sized(&pins, false, capacities).expect("load the packet path");
    let mut source = ManifestSource::new(&manifest);
    let mut pipeline = Pipeline::new(Programmer::adopt(
        Default::default(),
        Settings {
            capacities,
            ..Settings::default()
        },
    ));
    let mut node = NodeContext {
        name: Some("node-1".to_owned()),
        addresses: vec![Ipv4Addr::new(192, 168, 0, 1).into()],
        ..NodeContext::default()
    };
    let started = Instant::now();
    let snapshot = source.snapshot().unwrap();
    let parse = started.elapsed();
    let step = pipeline.step(snapshot, &mut node, &mut dataplane.maps);
    let (_, unplaced) = step.programmed.expect("initial sync");
    let program = started.elapsed();
    // As the agent does after a step that translated everything.
    lb_userspace::pipeline::release_free_heap();
    assert!(unplaced.is_empty(), "{} unplaced", unplaced.len());
    assert_eq!(
        step.desired.frontends.len(),
        services + services.min(SYNTHETIC_NODE_PORTS),
        "a ClusterIP each and a NodePort for the first {SYNTHETIC_NODE_PORTS}"
    );
    // And then, within a second, the state file naming what the maps hold.
    let started = Instant::now();
    Snapshot::new(Some("node-1"), pipeline.translator(), pipeline.desired())
        .write(&dir)
        .expect("write the state file");
    let state_write = started.elapsed();
    let state_bytes = std::fs::metadata(dir.join(lb_userspace::state::STATE_FILE))
        .unwrap()
        .len();
    // What `lb services` (and a /metrics scrape, which does the same) costs at this scale, in
    // a process of its own as the CLI runs.
    let started = Instant::now();
    let status = Command::new(std::env::current_exe().unwrap())
        .arg("--view")
        .arg(&pins)
        .arg(&dir)
        .status()
        .expect("run the view");
    assert!(status.success());
    let view = started.elapsed();

    let mut changes = Vec::new();
    for change in 0..CHANGES {
        write_manifest(services, change + 1, &manifest);
        let started = Instant::now();
        source.force_reread();
        let snapshot = source.snapshot().unwrap();
        let step = pipeline.step(snapshot, &mut node, &mut dataplane.maps);
        let (stats, _) = step.programmed.expect("sync");
        changes.push(started.elapsed());
        assert!(!stats.is_empty(), "change {change} wrote nothing");
    }
    changes.sort();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = |field: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    println!(
        "figures {} {} {} {} {} {} {} {} {}",
        program.as_micros(),
        parse.as_micros(),
        changes[CHANGES / 2].as_micros(),
        changes[CHANGES - 1].as_micros(),
        kib("VmHWM:"),
        kib("RssAnon:"),
        state_write.as_micros(),
        state_bytes,
        view.as_micros(),
    );
    drop(dataplane);
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes the manifest of `services` Services after `changes` changes (each one Service
/// gaining or losing an endpoint), from another process: the generator's memory is not the
/// agent's, and stays out of the VmHWM measured here.
fn write_manifest(services: usize, changes: usize, path: &Path) {
    let exe = std::env::current_exe().unwrap();
    let status = Command::new(exe)
        .args(["--write", &services.to_string(), &changes.to_string()])
        .arg(path)
        .status()
        .expect("run the manifest writer");
    assert!(status.success(), "manifest writer failed");
}

/// The `--write` process of [`write_manifest`].
fn writer(services: usize, changes: usize, path: &Path) {
    let mut cluster = synthetic_cluster(services, []);
    for change in 0..changes {
        let changed = &mut cluster[(services / 2 + change * 7919) % services];
        if change % 2 == 0 {
            changed
                .endpoints
                .push((Ipv4Addr::new(10, 203, 0, change as u8), 8080));
        } else {
            changed.endpoints.pop();
        }
    }
    std::fs::write(path, manifests_yaml(&cluster)).unwrap();
}

/// Median and range of one column over the rounds.
fn spread(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    format!(
        "{median:.1} ({:.1}-{:.1})",
        values[0],
        values[values.len() - 1]
    )
}

fn run_round(exe: &Path, services: usize) -> [f64; 9] {
    let out = Command::new(exe)
        .args(["--child", &services.to_string()])
        .output()
        .expect("run a round");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("figures "));
    let Some(line) = line.filter(|_| out.status.success()) else {
        panic!(
            "round at {services} Services failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let v: Vec<f64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
    [
        v[0] / 1e3,
        v[1] / 1e3,
        v[2] / 1e3,
        v[3] / 1e3,
        v[4] / 1024.0,
        v[5] / 1024.0,
        v[6] / 1e3,
        v[7] / 1024.0 / 1024.0,
        v[8] / 1e3,
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, services, changes, path] = args.as_slice()
        && flag == "--write"
    {
        writer(
            services.parse().unwrap(),
            changes.parse().unwrap(),
            Path::new(path),
        );
        return;
    }
    if let [flag, pins, state] = args.as_slice()
        && flag == "--view"
    {
        // `lb services -o json` without the printing.
        let maps = lb_userspace::inspect::PinnedMaps::open(Path::new(pins)).expect("open maps");
        let state = lb_userspace::state::NodeState::read(Path::new(state)).expect("read state");
        let views = lb_userspace::inspect::services::collect(&maps, Some(&state));
        let json = serde_json::to_string(&views).unwrap();
        assert!(json.len() > 2);
        return;
    }
    if let [flag, services] = args.as_slice()
        && flag == "--child"
    {
        child(services.parse().unwrap());
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("control_plane needs root (BPF maps); run it as root");
        std::process::exit(1);
    }
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let (rounds, scales) = match numbers.split_first() {
        Some((rounds, scales)) if !scales.is_empty() => (*rounds, scales.to_vec()),
        _ => (3, vec![100, 10_000, 50_000]),
    };
    let exe = std::env::current_exe().unwrap();
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY).set_header([
        "Services",
        "program ms",
        "of which YAML ms",
        "change p50 ms",
        "change p99 ms",
        "VmHWM MiB",
        "RssAnon MiB",
        "KiB per Service",
        "state file ms",
        "state file MiB",
        "lb services ms",
    ]);
    println!("control plane from a manifest file, {rounds} rounds, median (min-max)");
    let mut baseline_anon = None;
    for services in scales {
        let mut columns: [Vec<f64>; 9] = Default::default();
        for _ in 0..rounds {
            for (column, value) in columns.iter_mut().zip(run_round(&exe, services)) {
                column.push(value);
            }
        }
        let anon = {
            let mut a = columns[5].clone();
            a.sort_by(f64::total_cmp);
            a[a.len() / 2]
        };
        let base: f64 = *baseline_anon.get_or_insert(anon);
        let per_service = if services > 100 {
            format!("{:.1}", (anon - base) * 1024.0 / services as f64)
        } else {
            "baseline".to_owned()
        };
        let mut row = vec![services.to_string()];
        row.extend(columns[..6].iter_mut().map(|c| spread(c)));
        row.push(per_service);
        row.extend(columns[6..].iter_mut().map(|c| spread(c)));
        table.add_row(row);
    }
    println!("{table}");
}
