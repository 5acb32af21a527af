//! The user-space side of lb: from Kubernetes objects to programmed BPF maps.
//!
//! Data flows one way: [`manifest`] (or, later, the API server) -> [`model`] validation ->
//! [`translate`] (pure) -> [`sync`] (diff with stable ids) -> [`dataplane`] map writes. The
//! [`loader`] owns the eBPF object and its attachments; [`agent`] runs the loop.

pub mod agent;
pub mod dataplane;
pub mod loader;
pub mod manifest;
pub mod model;
pub mod report;
pub mod source;
pub mod sync;
pub mod translate;
