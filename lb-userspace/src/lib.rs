//! The user-space side of lb: from Kubernetes objects to programmed BPF maps.
//!
//! Data flows one way: [`kube_source`] (the API server) or [`source`] (a manifest file) ->
//! [`model`] validation -> [`translate`] (pure) -> [`sync`] (diff with stable ids, Maglev tables)
//! -> [`dataplane`] map writes. The [`loader`] owns the eBPF object and its attachments;
//! [`agent`] runs the loop with [`health`] and [`metrics`]; [`config`] resolves its settings.

pub mod agent;
pub mod bpf_sys;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod health;
pub mod kube_source;
pub mod loader;
pub mod manifest;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod report;
pub mod source;
pub mod sync;
pub mod translate;
