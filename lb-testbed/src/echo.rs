//! Tiny echo pods: every reply says which pod answered and which client address the pod saw, so
//! tests and the demo can show load balancing, source addresses and reverse NAT.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a pod keeps a silent connection open.
const CONNECTION_IDLE: Duration = Duration::from_secs(30);

/// A pod's TCP and UDP echo servers, stopped on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `[::]:tcp_port` (TCP) and `[::]:udp_port` (UDP) inside `ns`: both families,
    /// IPv4 clients as IPv4-mapped addresses (the namespace's `bindv6only` is 0).
    pub fn start(ns: &Netns, pod: &str, tcp_port: u16, udp_port: u16) -> anyhow::Result<Self> {
        let tcp = ns.run(move || TcpListener::bind(("::", tcp_port)))??;
        let udp = ns.run(move || UdpSocket::bind(("::", udp_port)))??;
        Self::serve(pod, tcp, udp)
    }

    /// Listens in the namespace this process is in (a pod process of `cargo xtask testbed up`).
    pub fn start_here(pod: &str, tcp_port: u16, udp_port: u16) -> anyhow::Result<Self> {
        let tcp = TcpListener::bind(("::", tcp_port))?;
        let udp = UdpSocket::bind(("::", udp_port))?;
        Self::serve(pod, tcp, udp)
    }

    fn serve(pod: &str, tcp: TcpListener, udp: UdpSocket) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        // Sockets keep the namespace they were created in, so plain threads can serve them.
        let threads = vec![
            std::thread::spawn({
                let (stop, pod) = (stop.clone(), pod.to_owned());
                move || serve_tcp(tcp, &pod, &stop)
            }),
            std::thread::spawn({
                let (stop, pod) = (stop.clone(), pod.to_owned());
                move || serve_udp(udp, &pod, &stop)
            }),
        ];
        Ok(Self { stop, threads })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn answer(pod: &str, peer: SocketAddr) -> String {
    // An IPv4 client of the dual-stack socket shows as ::ffff:a.b.c.d; report it as IPv4.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    format!("pod={pod} peer={peer}\n")
}

fn serve_tcp(listener: TcpListener, pod: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                // One thread per connection: a client may keep it open across many lines.
                let pod = pod.to_owned();
                std::thread::spawn(move || serve_connection(conn, peer, &pod));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Answers every line until the client closes (or stays silent for the idle timeout).
fn serve_connection(mut conn: TcpStream, peer: SocketAddr, pod: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(CONNECTION_IDLE));
    let Ok(reader) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if conn.write_all(answer(pod, peer).as_bytes()).is_err() {
            break;
        }
        line.clear();
    }
}

fn serve_udp(socket: UdpSocket, pod: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(answer(pod, peer).as_bytes(), peer);
        }
    }
}

/// One answered request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The pod that answered.
    pub pod: String,
    /// The client address as the pod saw it.
    pub client_seen_by_pod: SocketAddr,
    /// The address the answer came from, as the client saw it.
    pub answered_from: SocketAddr,
}

fn parse_reply(text: &str, answered_from: SocketAddr) -> anyhow::Result<Reply> {
    let mut pod = None;
    let mut peer = None;
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("pod=") {
            pod = Some(v.to_owned());
        } else if let Some(v) = field.strip_prefix("peer=") {
            peer = Some(v.parse().with_context(|| format!("peer in {text:?}"))?);
        }
    }
    match (pod, peer) {
        (Some(pod), Some(client_seen_by_pod)) => Ok(Reply {
            pod,
            client_seen_by_pod,
            answered_from,
        }),
        _ => bail!("unexpected answer {text:?}"),
    }
}

/// An open TCP connection to an echo pod (through a Service), for asking several times.
pub struct Conversation {
    conn: TcpStream,
    reader: BufReader<TcpStream>,
    target: SocketAddr,
}

impl Conversation {
    /// Connects within `timeout`. Call from a thread inside the client's namespace.
    pub fn open(target: impl Into<SocketAddr>, timeout: Duration) -> std::io::Result<Self> {
        let target = target.into();
        let conn = TcpStream::connect_timeout(&target, timeout)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::new(conn.try_clone()?);
        Ok(Self {
            conn,
            reader,
            target,
        })
    }

    /// Sends a line and reads the answer.
    pub fn ask(&mut self) -> anyhow::Result<Reply> {
        self.conn.write_all(b"hello\n")?;
        let mut text = String::new();
        self.reader
            .read_line(&mut text)
            .with_context(|| format!("TCP answer from {}", self.target))?;
        parse_reply(&text, self.conn.peer_addr()?)
    }
}

/// Connects, sends a line, reads the answer. Call from a thread inside the client's namespace.
pub fn tcp_request(target: impl Into<SocketAddr>) -> anyhow::Result<Reply> {
    let target = target.into();
    Conversation::open(target, IO_TIMEOUT)
        .with_context(|| format!("TCP connect to {target}"))?
        .ask()
}

/// Sends one datagram and waits for the answer. Call from inside the client's namespace.
pub fn udp_request(target: impl Into<SocketAddr>) -> anyhow::Result<Reply> {
    udp_request_from(target, 0)
}

/// [`udp_request`] from a chosen source port (0: any), e.g. to predict the flow's hash.
pub fn udp_request_from(target: impl Into<SocketAddr>, source_port: u16) -> anyhow::Result<Reply> {
    let target = target.into();
    let any = if target.is_ipv4() { "0.0.0.0" } else { "::" };
    let socket = UdpSocket::bind((any, source_port))?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    // Connected, so an ICMP error for this flow is reported to us (ConnectionRefused).
    socket.connect(target)?;
    socket.send(b"hello")?;
    let mut buf = [0u8; 1500];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("UDP answer from {target}"))?;
    parse_reply(&String::from_utf8_lossy(&buf[..n]), from)
}
