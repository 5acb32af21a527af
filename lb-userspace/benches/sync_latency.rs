//! Sync latency: from a change made through the API server to the BPF maps holding it.
//!
//!     cargo bench -p lb-userspace --bench sync_latency            (as root)
//!     cargo bench -p lb-userspace --bench sync_latency -- 10000 300   (Services, changes)
//!
//! A fake API server (real HTTP, in a network namespace of the benchmark's own) holds N Services
//! with one EndpointSlice of two endpoints each; the agent's own source, translation and sync
//! program the real (pinned) maps. Then one Service's slice is changed at a time, spaced wider
//! than the minimum sync interval, and the time from the API write to the end of the sync that
//! wrote the new backend is recorded. Changes alternate between two kinds: an endpoint replaced
//! by another, and a rolling-update step (one endpoint starts terminating, so its backend drains,
//! while a new one joins; recorded once the drain mark is written too). The same run first
//! measures a 100-Service cluster as the baseline, since this machine is shared and noisy.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::{maps::Capacities, service::BACKEND_F_DRAINING};
use lb_testbed::{fake_api::FakeApi, netns::Netns};
use lb_userspace::{
    loader::Dataplane,
    model::SERVICE_NAME_LABEL,
    pipeline::Pipeline,
    sources::{KubeSource, ObjectSource as _},
    sync::{Programmer, Settings},
    translate::NodeContext,
};

/// Between changes: wider than the agent's default minimum sync interval (100 ms), so every change
/// gets its own sync and coalescing does not hide or add latency.
const SPACING: Duration = Duration::from_millis(150);
/// Table size for the run, fixed so runs stay comparable with the figures in BENCHMARKS.md
/// (measured before the default followed the backend count; it would give these two-backend
/// Services 251 slots).
const TABLE_SIZE: u32 = 1021;

fn service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some("bench".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(Ipv4Addr::from(0x0a60_0000 + i as u32).to_string()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn pod(n: u32) -> String {
    Ipv4Addr::from(0x0af4_0000 + n).to_string()
}

fn slice(i: usize, endpoints: [String; 2]) -> EndpointSlice {
    slice_with(i, endpoints.map(|a| (a, false)).to_vec())
}

/// The slice of Service `i` with these endpoints, each (address, terminating).
fn slice_with(i: usize, endpoints: Vec<(String, bool)>) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-1")),
            namespace: Some("bench".to_owned()),
            labels: Some([(SERVICE_NAME_LABEL.to_owned(), format!("svc-{i}"))].into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_owned(),
        ports: Some(vec![EndpointPort {
            port: Some(8080),
            ..EndpointPort::default()
        }]),
        endpoints: Some(
            endpoints
                .into_iter()
                .map(|(a, terminating)| Endpoint {
                    addresses: vec![a],
                    conditions: terminating.then_some(EndpointConditions {
                        ready: Some(false),
                        serving: Some(true),
                        terminating: Some(true),
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        ),
    }
}

struct Run {
    services: usize,
    initial_sync: Duration,
    /// One endpoint replaced by another.
    replaced: Vec<Duration>,
    /// A rolling-update step: one endpoint starts terminating (its backend drains) while a new
    /// one is added.
    rolling: Vec<Duration>,
}

fn measure(ns: &Netns, services: usize, changes: usize) -> Run {
    let api = FakeApi::new().expect("fake API server");
    let addr = api
        .listen_in(ns, "127.0.0.1:0".parse().unwrap())
        .expect("listen");
    api.apply(&Node {
        metadata: ObjectMeta {
            name: Some("node-1".to_owned()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    });
    for i in 0..services {
        api.apply(&service(i));
        api.apply(&slice(i, [pod(2 * i as u32), pod(2 * i as u32 + 1)]));
    }
    let kubeconfig = std::env::temp_dir().join(format!("{}-bench.kubeconfig", ns.name()));
    FakeApi::write_kubeconfig(&kubeconfig, &format!("http://{addr}")).unwrap();
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/{}-bench-{services}", ns.name()));
    let handle = api.clone_handle();
    let runtime = ns.tokio_runtime().expect("runtime");
    let pins_for_run = pins.clone();
    let kubeconfig_for_run = kubeconfig.clone();
    let run = ns
        .run(move || {
            runtime.block_on(async move {
                // Room for every table at the fixed size (the default slots array holds
                // 10,000 Services at the default, smaller tables).
                let capacities = Capacities {
                    slots: (services as u32 * TABLE_SIZE)
                        .next_power_of_two()
                        .max(Capacities::DEFAULT.slots),
                    ..Capacities::DEFAULT
                };
                let mut dataplane = Dataplane::load_sized(&pins_for_run, false, capacities)
                    .expect("load the packet path");
                let client = lb_userspace::agent::kube_client(Some(&kubeconfig_for_run), None)
                    .await
                    .expect("client");
                let mut source = KubeSource::start(client, "node-1");
                let mut node = NodeContext {
                    name: Some("node-1".to_owned()),
                    default_table_size: Some(TABLE_SIZE),
                    ..NodeContext::default()
                };
                let mut pipeline = Pipeline::new(Programmer::adopt(
                    Default::default(),
                    Settings {
                        capacities,
                        ..Settings::default()
                    },
                ));
                while !source.ready() {
                    source.changed().await;
                }
                let started = Instant::now();
                let snapshot = source.snapshot().expect("a snapshot");
                let step = pipeline.step(snapshot, &mut node, &mut dataplane.maps);
                let (_, unplaced) = step.programmed.expect("initial sync");
                let initial_sync = started.elapsed();
                assert_eq!(step.desired.frontends.len(), services);
                assert!(unplaced.is_empty(), "{} unplaced", unplaced.len());

                let (mut replaced, mut rolling) = (Vec::new(), Vec::new());
                for change in 0..changes {
                    let i = change % services;
                    let fresh = pod(1_000_000 + change as u32);
                    let be = |a: &str| lb_common::addr_be(a.parse::<Ipv4Addr>().unwrap().octets());
                    let wanted = be(&fresh);
                    // Every other change is a rolling-update step: the second endpoint starts
                    // terminating while a new one joins; done when its backend is marked
                    // draining (its established flows stay) and the new one is programmed.
                    let roll = change % 2 == 1;
                    let (kept, old) = (pod(2 * i as u32), pod(2 * i as u32 + 1));
                    let draining = roll.then(|| be(&old));
                    tokio::time::sleep(SPACING).await;
                    let written = Instant::now();
                    if roll {
                        handle.apply(&slice_with(
                            i,
                            vec![(kept, false), (old, true), (fresh, false)],
                        ));
                    } else {
                        handle.apply(&slice(i, [kept, fresh]));
                    }
                    loop {
                        source.changed().await;
                        let snapshot = source.snapshot().expect("a snapshot");
                        let step = pipeline.step(snapshot, &mut node, &mut dataplane.maps);
                        step.programmed.expect("sync");
                        let backends = &pipeline.programmer().programmed().backends;
                        let added = backends
                            .values()
                            .any(|b| b.addr_be == lb_common::Address::to_wide(wanted));
                        let drained = draining.is_none_or(|addr| {
                            (backends.values()).any(|b| {
                                b.addr_be == lb_common::Address::to_wide(addr)
                                    && b.flags & BACKEND_F_DRAINING != 0
                            })
                        });
                        if added && drained {
                            if roll { &mut rolling } else { &mut replaced }.push(written.elapsed());
                            break;
                        }
                    }
                }
                Run {
                    services,
                    initial_sync,
                    replaced,
                    rolling,
                }
            })
        })
        .expect("benchmark thread");
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_file(&kubeconfig);
    run
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("sync_latency needs root (a network namespace and BPF maps); run it as root");
        std::process::exit(1);
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let services: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let changes: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    lb_testbed::host::ensure_bpffs().expect("bpffs");
    lb_testbed::cleanup::install_interrupt_handler();
    let ns = Netns::create(&format!(
        "{}{}-bench",
        lb_testbed::cleanup::NETNS_PREFIX,
        std::process::id()
    ))
    .expect("namespace");

    let runs = [measure(&ns, 100, changes), measure(&ns, services, changes)];
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "SERVICES",
        "INITIAL SYNC ms",
        "CHANGE",
        "COUNT",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
    ]);
    let mut p50s = Vec::new();
    for run in &runs {
        for (kind, latencies) in [
            ("endpoint replaced", &run.replaced),
            ("rolling step", &run.rolling),
        ] {
            let mut sorted = latencies.clone();
            sorted.sort();
            if kind == "endpoint replaced" {
                p50s.push(percentile(&sorted, 0.5));
            }
            table.add_row([
                run.services.to_string(),
                ms(run.initial_sync),
                kind.to_owned(),
                sorted.len().to_string(),
                ms(percentile(&sorted, 0.5)),
                ms(percentile(&sorted, 0.9)),
                ms(percentile(&sorted, 0.99)),
                ms(*sorted.last().unwrap()),
            ]);
        }
    }
    println!("sync latency: API write -> maps written (Maglev tables of {TABLE_SIZE} slots)");
    println!("{table}");
    println!(
        "endpoint replaced: p50 with {} Services is {:.1}x the p50 with 100",
        runs[1].services,
        p50s[1].as_secs_f64() / p50s[0].as_secs_f64()
    );
}
