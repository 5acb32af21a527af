//! Network namespaces made with `ip netns add`, entered per thread with setns(2) (only the calling
//! thread changes namespace, so the rest of the process is unaffected) or per child process.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    process::{Child, Command},
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

use crate::cleanup;

/// A named network namespace, deleted (with every interface in it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        cleanup::register_netns(name);
        let ns = Self {
            name: name.to_owned(),
        };
        // Loopback up; everything else is configured by the caller.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Sets a sysctl inside the namespace (`/proc/sys/net` is per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        self.run(move || std::fs::write(&path, value).with_context(|| format!("writing {path}")))?
    }

    /// Runs `f` on a new thread inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn_thread(f)?
            .join()
            .map_err(|panic| anyhow::anyhow!("thread in {} panicked: {panic:?}", self.name))
    }

    /// Starts `f` on a new thread inside this namespace.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<JoinHandle<T>> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        let name = self.name.clone();
        Ok(std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns into {name}: {e}"));
            f()
        }))
    }

    /// Spawns `cmd` inside this namespace. Only the network namespace changes (unlike
    /// `ip netns exec`, which also remounts /sys and would hide /sys/fs/bpf). The child gets
    /// SIGTERM if this process dies, so it never outlives its testbed.
    pub fn spawn(&self, mut cmd: Command) -> anyhow::Result<Child> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
        // system calls (setns, prctl) on a descriptor opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {cmd:?} in {}", self.name))?;
        cleanup::register_child(child.id());
        Ok(child)
    }
}

impl Netns {
    /// Spawns `cmd` inside this namespace in its own session, to outlive this process
    /// (`cargo xtask testbed up`). Not registered for cleanup: `testbed down` stops it.
    pub fn spawn_detached(&self, mut cmd: Command) -> anyhow::Result<Child> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        // SAFETY: as in `spawn`: only async-signal-safe calls (setns, setsid) before exec.
        unsafe {
            cmd.pre_exec(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
            .with_context(|| format!("spawning {cmd:?} in {}", self.name))
    }

    /// Keeps the namespace after this value and this process are gone.
    pub fn persist(self) {
        cleanup::forget_netns(&self.name);
        std::mem::forget(self);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        cleanup::delete_netns(&self.name);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
