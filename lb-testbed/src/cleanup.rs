//! Everything a testbed creates is registered here, so it is removed on drop, on panic, and on
//! Ctrl-C (via [`install_interrupt_handler`]), and leftovers of dead runs are swept.

use std::{
    path::PathBuf,
    process::Command,
    sync::{Mutex, Once},
};

/// Prefix of every network namespace the testbed creates: `lbt<pid>-<n>-<role>`.
pub const NETNS_PREFIX: &str = "lbt";

#[derive(Default)]
struct Registry {
    netns: Vec<String>,
    pin_dirs: Vec<PathBuf>,
    children: Vec<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    netns: Vec::new(),
    pin_dirs: Vec::new(),
    children: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn register_netns(name: &str) {
    registry().netns.push(name.to_owned());
}

/// Takes a namespace off the cleanup list (it is meant to outlive this process).
pub fn forget_netns(name: &str) {
    registry().netns.retain(|n| n != name);
}

pub fn register_pin_dir(dir: PathBuf) {
    registry().pin_dirs.push(dir);
}

pub fn register_child(pid: u32) {
    registry().children.push(pid);
}

pub fn forget_child(pid: u32) {
    registry().children.retain(|p| *p != pid);
}

pub fn delete_netns(name: &str) {
    let _ = Command::new("ip").args(["netns", "delete", name]).status();
    registry().netns.retain(|n| n != name);
}

pub fn remove_pin_dir(dir: &PathBuf) {
    let _ = std::fs::remove_dir_all(dir);
    registry().pin_dirs.retain(|d| d != dir);
}

/// Stops registered processes, deletes registered namespaces and pin directories.
pub fn cleanup_all() {
    let (children, netns, pin_dirs) = {
        let mut r = registry();
        (
            std::mem::take(&mut r.children),
            std::mem::take(&mut r.netns),
            std::mem::take(&mut r.pin_dirs),
        )
    };
    for pid in children {
        // SAFETY: kill(2) with a pid we spawned; at worst the process is already gone.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    for name in netns {
        let _ = Command::new("ip").args(["netns", "delete", &name]).status();
    }
    for dir in pin_dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// On Ctrl-C or SIGTERM: clean up everything registered, then exit 130.
pub fn install_interrupt_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            eprintln!("\ninterrupted: tearing the testbed down");
            cleanup_all();
            std::process::exit(130);
        });
    });
}

/// Deletes namespaces (and pin and state directories) left by testbed runs whose process no longer exists,
/// e.g. after a SIGKILL. Only names with our prefix and a dead pid are touched.
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let listing = String::from_utf8_lossy(&out.stdout);
    for name in listing.lines().filter_map(|l| l.split_whitespace().next()) {
        if dead_owner(name).is_some() {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
    // Pin directories, and the agents' state directories in the temp directory.
    for dir in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead_owner(&name).is_some() && entry.path().is_dir() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The pid in `lbt<pid>-...` when that process is gone.
fn dead_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let pid: u32 = rest.split('-').next()?.parse().ok()?;
    (!PathBuf::from(format!("/proc/{pid}")).exists()).then_some(pid)
}
