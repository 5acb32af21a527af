//! What each of lb's programs costs per packet on each path, beside an empty program: the
//! `program_cost` bench of lb-userspace (BPF_PROG_TEST_RUN on the real programs, maps programmed
//! by the agent's own code, a full conntrack, a small and a 10,000-Service scale), run as part
//! of the benchmark so its figures come from the same run.

use std::{path::Path, process::Command};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::report::spread;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgramCost {
    pub rounds: usize,
    /// Runs of one packet for the repeated (empty-program) paths.
    pub repeat: u32,
    /// Single runs a path and round.
    pub single_runs: u32,
    pub rows: Vec<CostRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CostRow {
    pub program: String,
    pub path: String,
    pub single_runs: bool,
    pub services: usize,
    /// The program's verdict on the path's packet (TC_ACT_* or XDP_*).
    pub verdict: u32,
    /// Mean ns a run, one a round.
    pub ns: Vec<f64>,
}

pub const EMPTY_TC: &str = "empty tc program";
pub const EMPTY_XDP: &str = "empty XDP program";

impl ProgramCost {
    /// (median, min, max) ns of `program`'s `path` at `services`.
    pub fn ns(&self, program: &str, path: &str, services: usize) -> Option<(f64, f64, f64)> {
        self.rows
            .iter()
            .find(|r| r.program == program && r.path == path && r.services == services)
            .map(|r| spread(&r.ns))
    }

    /// The median of the empty program of `row`'s kind, timed as `row` is, at its scale.
    pub fn floor(&self, row: &CostRow) -> Option<f64> {
        let empty = if row.program.contains("xdp") || row.program == EMPTY_XDP {
            EMPTY_XDP
        } else {
            EMPTY_TC
        };
        self.rows
            .iter()
            .find(|r| {
                r.program == empty && r.services == row.services && r.single_runs == row.single_runs
            })
            .map(|r| spread(&r.ns).0)
    }

    pub fn scales(&self) -> Vec<usize> {
        let mut scales: Vec<usize> = self.rows.iter().map(|r| r.services).collect();
        scales.sort_unstable();
        scales.dedup();
        scales
    }
}

/// Runs the bench (built in release mode by cargo) and reads its samples back.
pub fn measure(rounds: usize, repeat: u32, scratch: &Path) -> anyhow::Result<ProgramCost> {
    let json = scratch.join("program-cost.json");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args([
            "bench",
            "--quiet",
            "-p",
            "lb-userspace",
            "--bench",
            "program_cost",
            "--",
        ])
        .args([rounds.to_string(), repeat.to_string()])
        .env("LB_PROGRAM_COST_JSON", &json)
        .current_dir(crate::workspace_root())
        .status()
        .with_context(|| format!("running {cargo} bench"))?;
    anyhow::ensure!(status.success(), "the program_cost bench failed ({status})");
    let text =
        std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
    let cost: ProgramCost =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    anyhow::ensure!(
        cost.rows
            .iter()
            .all(|r| r.ns.len() == rounds && r.ns.iter().all(|ns| *ns > 0.0)),
        "the program_cost bench left a path without its {rounds} figures"
    );
    Ok(cost)
}
