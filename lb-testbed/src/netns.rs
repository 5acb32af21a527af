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

    /// `ip <args>` with only the network namespace switched (`ip -n` also remounts /sys, which
    /// hides bpffs pins under /sys/fs/bpf).
    pub fn ip_keeping_mounts(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(args);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = self.spawn(&mut cmd)?;
        let pid = child.id();
        let out = child.wait_with_output()?;
        cleanup::forget_child(pid);
        if !out.status.success() {
            bail!(
                "ip {} in {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
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

    /// A tokio runtime whose worker threads live in this namespace, so sockets its tasks open
    /// (e.g. a Kubernetes client's) belong to it. Call `block_on` from a thread in the namespace
    /// too (inside [`Self::run`]).
    pub fn tokio_runtime(&self) -> anyhow::Result<tokio::runtime::Runtime> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        let file = std::sync::Arc::new(file);
        let name = self.name.clone();
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                setns(file.as_ref(), CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {name}: {e}"));
            })
            .build()?)
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
    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<Child> {
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
    /// Runs `tool args` inside this namespace with `input` on its stdin and returns its stdout;
    /// fails with its stderr (e.g. `iptables-restore` refusing rules).
    pub fn pipe(&self, tool: &str, args: &[&str], input: &str) -> anyhow::Result<String> {
        use std::{io::Write as _, process::Stdio};
        let mut cmd = Command::new(tool);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn(&mut cmd)?;
        let pid = child.id();
        let fed = child
            .stdin
            .take()
            .context("stdin is piped")?
            .write_all(input.as_bytes());
        let out = child.wait_with_output();
        cleanup::forget_child(pid);
        fed.with_context(|| format!("feeding {tool}"))?;
        let out = out?;
        anyhow::ensure!(
            out.status.success(),
            "{tool} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

impl Netns {
    /// Turns off TX checksum offload for `ifname` (`ethtool -K <if> tx off`), so packets leave
    /// with complete checksums, as on a physical wire. Between namespaces a veth otherwise passes
    /// partial checksums along, which an XDP program cannot tell from complete ones.
    pub fn disable_tx_checksum(&self, ifname: &str) -> anyhow::Result<()> {
        const ETHTOOL_STXCSUM: u32 = 0x17;
        self.ethtool_set(ifname, ETHTOOL_STXCSUM, 0)
    }

    /// Writes `value` to `/sys/class/net/<ifname>/<attribute>` for this namespace's device.
    /// `ip netns exec` mounts the namespace's own sysfs, which a thread that only joined the
    /// namespace does not see.
    pub fn set_device_attribute(
        &self,
        ifname: &str,
        attribute: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        let path = format!("/sys/class/net/{ifname}/{attribute}");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "sh",
                "-c",
                &format!("echo {value} > {path}"),
            ])
            .output()
            .context("running ip netns exec")?;
        anyhow::ensure!(
            out.status.success(),
            "writing {value} to {path} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// One legacy ethtool "set value" ioctl (no ethtool binary needed).
    fn ethtool_set(&self, ifname: &str, cmd: u32, data: u32) -> anyhow::Result<()> {
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        let name = std::ffi::CString::new(ifname)?;
        let ifname = ifname.to_owned();
        self.run(move || -> anyhow::Result<()> {
            let mut value = EthtoolValue { cmd, data };
            // SAFETY: ifreq is plain data; all zeroes is valid.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes_with_nul()) {
                *dst = *src as libc::c_char;
            }
            req.ifr_ifru.ifru_data = (&raw mut value).cast();
            // SAFETY: a plain socket call; the descriptor is closed below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            // SAFETY: `req` names the interface and points at `value`, both alive for the call.
            let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
            let err = std::io::Error::last_os_error();
            // SAFETY: closing the descriptor opened above.
            unsafe { libc::close(fd) };
            anyhow::ensure!(rc == 0, "ethtool command {cmd:#x} on {ifname}: {err}");
            Ok(())
        })?
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
