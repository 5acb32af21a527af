//! Test infrastructure shared by the `xtask` task runner, the integration tests and the
//! benchmarks: network namespaces and the two-node testbed, the echo pods that report who
//! answered, a fake Kubernetes API server, load generators, kube-proxy's iptables and nftables
//! layouts, and cleanup that also runs on Ctrl-C. Nothing here is product logic.

pub mod bpf_syscall;
pub mod cleanup;
pub mod echo;
pub mod fake_api;
pub mod host;
pub mod kube_proxy_layouts;
pub mod loadgen;
pub mod netns;
pub mod testbed;
pub mod xdp_generator;
pub mod xdp_pass;
