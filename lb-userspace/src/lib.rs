//! The user-space side of lb: from Kubernetes objects to programmed BPF maps.
//!
//! Data flows one way: [`sources`] (the API server or a manifest file, validated by [`model`],
//! as snapshots) -> [`translate`] (pure) -> [`sync`] (diff with stable ids and Maglev tables
//! into one write plan) -> [`dataplane`] map writes; [`pipeline`] is that step, the one the
//! agent, the tests and the benchmarks run. The [`loader`] owns the eBPF object and its
//! attachments; [`agent`] runs the loop with [`health`] and [`metrics`]; [`config`] resolves its
//! settings. [`state`] is the file naming what the maps hold; [`inspect`] reads the pinned maps
//! for the operator's commands (`lb services`, `explain`, `conntrack`, `monitor`).

pub mod agent;
pub mod bpf_sys;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod health;
pub mod inspect;
pub mod loader;
pub mod manifest;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod resize;
pub mod slot_table;
pub mod sources;
pub mod state;
pub mod sync;
pub mod translate;
