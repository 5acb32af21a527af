//! The measuring tools the benchmark needs, installed with apt when missing.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::Context as _;

/// (what must exist, the Debian package that provides it)
const NEEDED: [(&str, &str); 5] = [
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    ("iptables-legacy-restore", "iptables"),
    ("nft", "nftables"),
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
];

fn present(what: &str) -> bool {
    if what.starts_with('/') {
        return Path::new(what).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(what).is_file()))
}

/// Installs the packages of whatever is missing (`apt-get install`, updating the package lists
/// once if the first attempt fails).
pub fn ensure_installed() -> anyhow::Result<()> {
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(what, _)| !present(what))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    crate::step(&format!("installing {}", missing.join(", ")));
    let install = || {
        Command::new("apt-get")
            .args(["install", "--yes", "--quiet", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get (the benchmark installs its tools with it)")
    };
    if !install()?.success() {
        let _ = Command::new("apt-get")
            .args(["update", "--quiet"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        anyhow::ensure!(
            install()?.success(),
            "apt-get could not install {}",
            missing.join(", ")
        );
    }
    if let Some((what, _)) = NEEDED.iter().find(|(what, _)| !present(what)) {
        anyhow::bail!("{what} is still missing after installing its package");
    }
    Ok(())
}

/// Each tool's version line, for the record.
pub fn versions() -> BTreeMap<String, String> {
    let version = |tool: &str, arg: &str| {
        Command::new(tool)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    BTreeMap::from([
        ("iperf3".to_owned(), version("iperf3", "--version")),
        ("sockperf".to_owned(), version("sockperf", "--version")),
        (
            "iptables".to_owned(),
            version("iptables-legacy", "--version"),
        ),
        ("nft".to_owned(), version("nft", "--version")),
    ])
}
