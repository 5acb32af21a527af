//! Orchestration shared by the `xtask` binary and the privileged integration tests: a testbed of
//! network namespaces, the echo pods that report who answered, and cleanup that also runs on
//! Ctrl-C. Nothing here is product logic.

pub mod cleanup;
pub mod echo;
pub mod fake_api;
pub mod host;
pub mod kube_proxy_layouts;
pub mod loadgen;
pub mod netns;
pub mod testbed;
pub mod xdp_pass;
