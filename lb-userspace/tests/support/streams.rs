//! Long-lived flows for the restart, upgrade and churn tests: a TCP conversation or a UDP flow
//! on a fixed source port that exchanges a message every few milliseconds and records the
//! longest gap between answers, every pod that answered, and the first error (a reset, or no
//! answer within the client's timeout).

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_testbed::{echo::Conversation, netns::Netns};

/// Pause between two exchanges of a flow.
const PACE: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
pub struct FlowReport {
    pub name: String,
    pub exchanges: u64,
    /// The longest time between two answers.
    pub max_gap: Duration,
    pub pods: BTreeSet<String>,
    /// UDP: requests without an answer (each waits 200 ms).
    pub lost: u64,
    pub error: Option<String>,
}

impl FlowReport {
    /// Records an answer from `pod`, `last` being when the previous one came.
    fn answered(&mut self, last: &mut Instant, pod: String) {
        self.max_gap = self.max_gap.max(last.elapsed());
        *last = Instant::now();
        self.exchanges += 1;
        self.pods.insert(pod);
    }
}

pub struct Flow {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<FlowReport>,
}

impl Flow {
    /// A TCP conversation from `ns` to `target`, kept open.
    pub fn tcp(ns: &Netns, name: &str, target: impl Into<SocketAddr>) -> Self {
        let target: SocketAddr = target.into();
        Self::spawn(ns, name, move |stop, report| {
            let mut conversation = match Conversation::open(target, Duration::from_secs(2)) {
                Ok(c) => c,
                Err(e) => {
                    report.error = Some(format!("connect: {e}"));
                    return;
                }
            };
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                match conversation.ask() {
                    Ok(reply) => report.answered(&mut last, reply.pod),
                    Err(e) => {
                        report.error = Some(format!("{e:#}"));
                        return;
                    }
                }
                std::thread::sleep(PACE);
            }
        })
    }

    /// A UDP flow from `ns` to `target` on source port `sport` (one socket, so the same tuple
    /// the whole time).
    pub fn udp(ns: &Netns, name: &str, target: SocketAddrV4, sport: u16) -> Self {
        Self::spawn(ns, name, move |stop, report| {
            let socket = UdpSocket::bind(("0.0.0.0", sport)).expect("bind the UDP flow");
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            socket.connect(target).unwrap();
            let mut last = Instant::now();
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                let _ = socket.send(b"hello");
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        let pod = text
                            .split_whitespace()
                            .find_map(|f| f.strip_prefix("pod="))
                            .unwrap_or_default()
                            .to_owned();
                        report.answered(&mut last, pod);
                    }
                    Err(_) => report.lost += 1,
                }
                std::thread::sleep(PACE);
            }
            report.max_gap = report.max_gap.max(last.elapsed());
        })
    }

    /// Runs `body` on a thread in `ns` until told to stop; it fills the report.
    fn spawn(
        ns: &Netns,
        name: &str,
        body: impl FnOnce(&AtomicBool, &mut FlowReport) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (stop.clone(), name.to_owned());
        let thread = ns
            .spawn_thread(move || {
                let mut report = FlowReport {
                    name,
                    ..FlowReport::default()
                };
                body(&flag, &mut report);
                report
            })
            .expect("start the flow's thread");
        Self { stop, thread }
    }

    pub fn finish(self) -> FlowReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("flow thread")
    }
}
