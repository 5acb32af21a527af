//! Load generators for the side-by-side benchmark, run on threads inside testbed namespaces:
//! a new-connection rate client (closing with RST, so no TIME_WAIT piles up and connection
//! reuse does not swing the figures; see ../shared/TOOLCHAIN.md) with its accept-and-drop
//! server, and the counting receiver of the small-UDP-packet workload (whose sender is
//! [`crate::xdp_generator`]).

use std::{
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::sys::socket::{setsockopt, sockopt};

use crate::netns::Netns;

/// What a connection-rate run saw.
#[derive(Clone, Debug, Default)]
pub struct ConnectRate {
    pub connections: u64,
    pub failures: u64,
    pub elapsed: Duration,
    /// Time for each connect(), in the order they finished (all threads).
    pub connect_latencies: Vec<Duration>,
}

impl ConnectRate {
    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }
}

/// Opens TCP connections to `target` for `duration` from `threads` threads, each connection
/// closed at once with RST (SO_LINGER 0). Call from a thread inside the client's namespace;
/// worker threads are started in `ns`.
pub fn connection_rate(
    ns: &Netns,
    target: impl Into<SocketAddr>,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<ConnectRate> {
    let target: SocketAddr = target.into();
    let started = Instant::now();
    let workers = (0..threads)
        .map(|_| {
            ns.spawn_thread(move || {
                let mut run = ConnectRate::default();
                let deadline = Instant::now() + duration;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                        Ok(stream) => {
                            run.connect_latencies.push(t.elapsed());
                            run.connections += 1;
                            // RST on close: the 4-tuple is free again at once.
                            let _ = setsockopt(
                                &stream.as_fd(),
                                sockopt::Linger,
                                &libc::linger {
                                    l_onoff: 1,
                                    l_linger: 0,
                                },
                            );
                        }
                        Err(_) => run.failures += 1,
                    }
                }
                run
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut total = ConnectRate::default();
    for worker in workers {
        let run = worker
            .join()
            .map_err(|_| anyhow::anyhow!("connection worker panicked"))?;
        total.connections += run.connections;
        total.failures += run.failures;
        total.connect_latencies.extend(run.connect_latencies);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// Accepts connections and drops them, as fast as it can: the server side of
/// [`connection_rate`]. Stops on drop.
pub struct AcceptServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptServer {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Self> {
        let listener = ns.run(move || {
            let socket = socket2_listener(port)?;
            anyhow::Ok(socket)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        listener.set_nonblocking(false)?;
        // accept() gives up after this, so the loop can see `stop` (SO_RCVTIMEO applies to it).
        setsockopt(
            &listener.as_fd(),
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        let thread = std::thread::spawn({
            let (stop, accepted) = (stop.clone(), accepted.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if listener.accept().is_ok() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(Self {
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// A listening socket with a deep backlog (std's default of 128 would cap the rate).
fn socket2_listener(port: u16) -> anyhow::Result<TcpListener> {
    // `[::]` takes both families (IPv4 as mapped addresses): the IPv6 paths are measured too.
    let listener = TcpListener::bind(("::", port)).context("binding the accept server")?;
    // SAFETY: listen(2) on a socket we own, to raise its backlog; no memory is passed.
    let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    anyhow::ensure!(rc == 0, "listen: {}", std::io::Error::last_os_error());
    Ok(listener)
}

impl Drop for AcceptServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Counts UDP datagrams arriving on a port. Stops on drop.
pub struct UdpCounter {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpCounter {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Self> {
        let socket = ns.run(move || UdpSocket::bind(("0.0.0.0", port)))??;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, received) = (stop.clone(), received.clone());
            move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if socket.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(Self {
            stop,
            received,
            thread: Some(thread),
        })
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;

    fn namespace(role: &str) -> Option<Netns> {
        if !nix::unistd::Uid::effective().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI runs as root"
            );
            eprintln!("SKIPPED loadgen {role}: needs root for a network namespace");
            return None;
        }
        Some(
            Netns::create(&format!(
                "{}{}-loadgen-{role}",
                crate::cleanup::NETNS_PREFIX,
                std::process::id()
            ))
            .expect("namespace"),
        )
    }

    #[test]
    fn every_counted_connection_reached_the_server() {
        let Some(ns) = namespace("tcp") else {
            return;
        };
        let server = AcceptServer::start(&ns, 9000).expect("server");
        let target = SocketAddrV4::new([127, 0, 0, 1].into(), 9000);
        let run = connection_rate(&ns, target, 2, Duration::from_millis(300)).expect("run");
        assert!(run.connections > 100, "{run:?}");
        assert_eq!(run.failures, 0);
        assert_eq!(run.connect_latencies.len() as u64, run.connections);
        // The server has accepted them all (allow it a moment for the last few).
        let deadline = Instant::now() + Duration::from_secs(2);
        while server.accepted() < run.connections && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.accepted(), run.connections);
        assert!(run.per_second() > 0.0);
    }

    #[test]
    fn the_udp_counter_sees_what_the_flood_sent() {
        let Some(ns) = namespace("udp") else {
            return;
        };
        let counter = UdpCounter::start(&ns, 9001).expect("counter");
        let target = SocketAddrV4::new([127, 0, 0, 1].into(), 9001);
        let sent = ns
            .run(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
                let mut sent = 0u64;
                for _ in 0..5_000 {
                    sent += u64::from(socket.send_to(&[0x5a; 64], target).is_ok());
                }
                sent
            })
            .expect("sender thread");
        std::thread::sleep(Duration::from_millis(200));
        let received = counter.received();
        assert!(sent > 1000, "sent {sent}");
        // Loopback may drop when the receiver's buffer is full; it never invents datagrams.
        assert!(
            received > 0 && received <= sent,
            "received {received} of {sent}"
        );
    }
}
