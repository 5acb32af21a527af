//! `cargo xtask <command>`: setup, build, test, demo. See README.md.

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
            let mut args = vec!["test".to_owned()];
            if !cargo_test_args.is_empty() {
                args.push("--".to_owned());
                args.extend(cargo_test_args);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cargo_test(&args)
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

/// Runs `cargo test`, streaming its output, and ends with one line totalling every test binary
/// (`N passed, N failed, N skipped`), so the result of the whole run is in its last line.
fn cargo_test(args: &[&str]) -> anyhow::Result<()> {
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
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
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
