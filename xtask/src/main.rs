//! `cargo xtask <command>`: setup, build, test, demo. See README.md.

mod bench;
mod demo;
mod setup;
mod testbed_cmd;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo lb")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make sure of the toolchain: nightly with rust-src, a bpf-linker built against the
    /// nightly's LLVM, and a mounted bpffs. Quick when already done.
    Setup {
        /// Only the build toolchain (nightly, rust-src, bpf-linker); leave bpffs alone, e.g. in a
        /// container image build.
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Build everything (the agent embeds the eBPF object).
    Build,
    /// Run all tests: formatting, clippy, unit tests, the packet-test table and the
    /// network-namespace tests (those need root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Bring up the two-node testbed, run an agent per node on the bundled example and show real
    /// requests to every Service type being answered (needs root). Tears everything down at the
    /// end or on Ctrl-C.
    Demo,
    /// Benchmark lb against no load balancer and kube-proxy's iptables and nftables layouts on
    /// the testbed (needs root; installs iperf3 and sockperf when missing). Writes
    /// bench/results/<timestamp>.{json,md} and PNG charts. See BENCHMARKS.md.
    Bench {
        /// One round, 4 and 1,004 Services, 1-second measurements: a smoke run (< 3 minutes).
        #[arg(long)]
        quick: bool,
        /// Rounds per scale [default: 5, or 1 with --quick].
        #[arg(long)]
        rounds: Option<usize>,
        /// Synthetic Services per scale, comma-separated; the 4 measured ones come on top
        /// [default: 0,1000,10000, or 0,1000 with --quick].
        #[arg(long, value_delimiter = ',')]
        services: Option<Vec<usize>>,
        /// Where results go [default: bench/results].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Measure nothing: write the report and charts of an earlier run's JSON again.
        #[arg(long, value_name = "JSON")]
        replot: Option<PathBuf>,
    },
    /// The two-node testbed (docs/testbed.md), left running to explore (needs root).
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
    },
    /// (internal) An echo pod's server, run inside its namespace by `testbed up`.
    #[command(hide = true)]
    EchoPod { name: String },
}

#[derive(Subcommand)]
enum TestbedAction {
    /// Build it, start echo pods and one `lb agent` per node on deploy/examples/services.yaml.
    Up {
        /// Attach the agents' XDP fast path to the nodes' external interfaces too.
        #[arg(long)]
        xdp: bool,
    },
    /// Stop the agents and pods and remove every testbed namespace and pin.
    Down,
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Setup { toolchain_only } => {
            if toolchain_only {
                setup::ensure_toolchain()
            } else {
                setup::ensure()
            }
        }
        Cmd::Build => {
            setup::ensure()?;
            cargo(&["build"])
        }
        Cmd::Test { cargo_test_args } => {
            setup::ensure()?;
            step("checking formatting");
            cargo(&["fmt", "--all", "--", "--check"])?;
            step("clippy");
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            step("tests (unit, packet table, network namespaces)");
            let filtered = !cargo_test_args.is_empty();
            let mut args = vec!["test".to_owned()];
            if filtered {
                args.push("--".to_owned());
                args.extend(cargo_test_args);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let totals = cargo_test(&args)?;
            let smoke = if filtered || !nix::unistd::Uid::effective().is_root() {
                "benchmark smoke run skipped (filtered run, or not root)"
            } else {
                step("benchmark smoke run (cargo xtask bench --quick; timings not judged)");
                let out =
                    std::env::temp_dir().join(format!("lb-bench-smoke-{}", std::process::id()));
                let lb = build_release_lb()?;
                let ran = bench::run(
                    &lb,
                    &bench::Options {
                        quick: true,
                        rounds: None,
                        synthetic: None,
                        out_dir: out.clone(),
                    },
                );
                let _ = std::fs::remove_dir_all(&out);
                ran.context("the benchmark smoke run failed")?;
                "benchmark smoke run ok"
            };
            println!(
                "{} passed, {} failed, {} skipped; {smoke}",
                totals.passed, totals.failed, totals.ignored
            );
            Ok(())
        }
        Cmd::Bench {
            replot: Some(json), ..
        } => bench::replot(&json),
        Cmd::Bench {
            quick,
            rounds,
            services,
            out,
            replot: None,
        } => {
            setup::ensure()?;
            let lb = build_release_lb()?;
            bench::run(
                &lb,
                &bench::Options {
                    quick,
                    rounds,
                    synthetic: services,
                    out_dir: out.unwrap_or_else(|| workspace_root().join("bench/results")),
                },
            )
            .map(|_| ())
        }
        Cmd::Demo => {
            setup::ensure()?;
            step("building lb");
            cargo(&["build", "--package", "lb-userspace"])?;
            demo::run(&target_dir().join("debug/lb"))
        }
        Cmd::Testbed { action } => {
            anyhow::ensure!(
                nix::unistd::Uid::effective().is_root(),
                "the testbed is made of network namespaces and BPF programs: run it as root"
            );
            match action {
                TestbedAction::Up { xdp } => {
                    setup::ensure()?;
                    step("building lb");
                    cargo(&["build", "--package", "lb-userspace"])?;
                    testbed_cmd::up(&target_dir().join("debug/lb"), xdp)
                }
                TestbedAction::Down => testbed_cmd::down(),
            }
        }
        Cmd::EchoPod { name } => testbed_cmd::echo_pod(&name),
    }
}

pub fn step(what: &str) {
    eprintln!("==> {what}");
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The release `lb`: benchmarks measure what users run.
fn build_release_lb() -> anyhow::Result<PathBuf> {
    step("building lb (release)");
    cargo(&["build", "--release", "--package", "lb-userspace"])?;
    Ok(target_dir().join("release/lb"))
}

/// Runs `cargo test`, streaming its output, and totals every test binary; on failure prints
/// the totals (`N passed, N failed, N skipped`) as the last line before failing.
fn cargo_test(args: &[&str]) -> anyhow::Result<TestTotals> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut child = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut totals = TestTotals::default();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        println!(
            "{} passed, {} failed, {} skipped",
            totals.passed, totals.failed, totals.ignored
        );
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(totals)
}

/// Sums libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` lines.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Runs cargo (the same one that runs xtask) in the workspace root and fails on failure.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
