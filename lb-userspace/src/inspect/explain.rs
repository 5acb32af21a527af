//! `lb explain`: what the packet path would do with a flow, step by step, from the pinned maps.
//!
//! It follows `lb-ebpf/src/lb.rs` decision for decision (conntrack, frontend, source ranges,
//! session affinity, the Maglev slot, SNAT) and writes nothing: the packet path would record the
//! flow, `explain` only reads. `tests/packet.rs` holds the two to the same answer on thousands
//! of random flows.

use std::net::{IpAddr, SocketAddr};

use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, Ip6,
    conntrack::{
        CT_F_SNAT, CT_KIND_FORWARD, CT_KIND_REPLY, CT_S_CLOSING, CtEntry, FlowKey, partner_key,
    },
    hash::slot_for,
    service::{
        ANY_SOURCE, AffinityKey, BACKEND_F_DRAINING, BACKEND_F_REMOTE, Backend, BackendId,
        SERVICE_F_NODE_ADDRESS, SERVICE_F_REJECT, ServiceEntry, ServiceKey,
    },
};
use serde::Serialize;

use super::{MapFamily, PinnedMaps, flow_state, monotonic_ns};
use crate::state::NodeState;

/// Where the packet enters the node (which program sees it first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// From a pod on this node.
    Pod,
    /// From the network (another node, a client outside the cluster).
    #[default]
    External,
    /// From a process in the node's own network namespace.
    Host,
}

/// The flow asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Query {
    pub from: IpAddr,
    /// The client's port; `None`: any (the answer then lists what each port could get).
    pub from_port: Option<u16>,
    /// Of the client's family.
    pub to: IpAddr,
    pub to_port: u16,
    /// "TCP" or "UDP".
    pub protocol: &'static str,
    pub origin: Origin,
}

impl Query {
    fn proto(&self) -> u8 {
        if self.protocol == "UDP" {
            IPPROTO_UDP
        } else {
            IPPROTO_TCP
        }
    }

    /// The flow from client port `port`, in family `A`'s maps (the query's family).
    fn flow<A: MapFamily>(&self, port: u16) -> FlowKey<A> {
        FlowKey::new(
            A::from_ip(self.from).expect("the query's family"),
            A::from_ip(self.to).expect("the query's family"),
            port.to_be(),
            self.to_port.to_be(),
            self.proto(),
        )
    }

    fn destination_text(&self) -> String {
        format!(
            "{}/{}",
            SocketAddr::new(self.to, self.to_port),
            self.protocol
        )
    }
}

/// What the packet path would do, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The Service and frontend kind, when the destination is a frontend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Each decision, as a line for people.
    pub steps: Vec<String>,
    /// The final answer.
    pub verdict: Verdict,
}

/// What becomes of the flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Verdict {
    /// Not a frontend and no flow of lb's: the packet passes untouched.
    #[default]
    NotAService,
    /// Sent to this backend.
    Backend {
        backend_id: BackendId,
        address: IpAddr,
        port: u16,
        /// How it was chosen: "conntrack", "affinity" or "maglev".
        chosen_by: &'static str,
        /// The source is rewritten to the node (remote backend from outside, or hairpin).
        snat: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    /// The client port is not given: each port maps to one of these (Maglev shares).
    AnyOf { backends: Vec<(IpAddr, u16, u32)> },
    /// A new flow from outside `loadBalancerSourceRanges`: dropped.
    DeniedBySourceRanges,
    /// No usable backend: answered with a TCP RST / ICMP unreachable (`reject`) or dropped.
    NoBackend { reject: bool },
    /// The reply half of a flow lb translated: rewritten back to the Service address.
    ReplyOfFlow { client: IpAddr, client_port: u16 },
}

/// How many client ports `explain` tries when none is given, to show the shares.
const PORTS_SAMPLED: u16 = 4096;

/// Explains `query` against `maps`, naming things with `state` when there is one.
pub fn explain(maps: &PinnedMaps, state: Option<&NodeState>, query: &Query) -> Explanation {
    match (query.from, query.to) {
        (IpAddr::V4(_), IpAddr::V4(_)) => explain_in::<u32>(maps, state, query),
        (IpAddr::V6(_), IpAddr::V6(_)) => explain_in::<Ip6>(maps, state, query),
        _ => Explanation {
            steps: vec![
                "the client and the destination are of different families: no packet goes so"
                    .to_owned(),
            ],
            ..Explanation::default()
        },
    }
}

/// [`explain`] in the maps of the query's family `A`.
fn explain_in<A: MapFamily>(
    maps: &PinnedMaps,
    state: Option<&NodeState>,
    query: &Query,
) -> Explanation {
    let mut out = Explanation::default();
    let proto = query.proto();
    let to = A::from_ip(query.to).expect("the query's family");
    let key = ServiceKey::new(to, query.to_port.to_be(), proto);
    let service = A::service(maps, &key);
    if let Some(state) = state
        && let Some((svc, frontend)) = state.frontend(query.to, query.to_port, query.protocol)
    {
        let port = if frontend.port_name.is_empty() {
            String::new()
        } else {
            format!(" port {}", frontend.port_name)
        };
        out.service = Some(format!(
            "{}/{}{port} ({} {})",
            svc.namespace,
            svc.name,
            frontend.kind,
            query.destination_text()
        ));
    }
    let Some(port) = query.from_port else {
        return match service {
            Some(entry) => any_port::<A>(maps, state, query, &entry, out),
            None => {
                out.steps.push(format!(
                    "{} is not a frontend in the maps: the packet passes untouched",
                    query.destination_text()
                ));
                out
            }
        };
    };
    let flow = query.flow::<A>(port);
    let now_s = crate::conntrack::now_s();
    if let Some(entry) = A::conntrack_entry(maps, &flow) {
        let partner = A::conntrack_entry(maps, &partner_key(&flow, &entry));
        let alive = !entry.expired(now_s) || partner.is_some_and(|p| !p.expired(now_s));
        let age = now_s.saturating_sub(entry.created_s);
        if !alive {
            out.steps.push(format!(
                "conntrack: a dead flow (expired {}s ago) holds this tuple: ignored, the sweep \
                 removes it",
                now_s.saturating_sub(entry.expires_s)
            ));
        } else if entry.kind == CT_KIND_REPLY {
            out.steps.push(format!(
                "conntrack: this tuple is the reply side of a flow {age}s old: rewritten back to \
                 {}",
                SocketAddr::new(entry.new_saddr_be.to_ip(), u16::from_be(entry.new_sport_be))
            ));
            out.verdict = Verdict::ReplyOfFlow {
                client: entry.new_daddr_be.to_ip(),
                client_port: u16::from_be(entry.new_dport_be),
            };
            return out;
        } else if entry.kind == CT_KIND_FORWARD {
            match usable_backend(maps, &entry, proto) {
                Some(_) => {
                    let state_name = flow_state(&entry, proto);
                    out.steps.push(format!(
                        "conntrack: an established flow ({state_name}, {age}s old, expires in \
                         {}s) keeps its backend",
                        entry.expires_s.saturating_sub(now_s)
                    ));
                    if proto == IPPROTO_TCP && entry.state & CT_S_CLOSING != 0 {
                        out.steps.push(
                            "a new SYN on this closing tuple would start a new flow instead"
                                .to_owned(),
                        );
                    }
                    out.verdict = Verdict::Backend {
                        backend_id: entry.backend_id,
                        address: entry.new_daddr_be.to_ip(),
                        port: u16::from_be(entry.new_dport_be),
                        chosen_by: "conntrack",
                        snat: entry.flags & CT_F_SNAT != 0,
                        node: node_of(state, entry.new_daddr_be.to_ip()),
                    };
                    return out;
                }
                None => out.steps.push(
                    "conntrack: the flow's backend left (or, for UDP, drains): it is balanced \
                     afresh as a new flow"
                        .to_owned(),
                ),
            }
        }
    } else {
        out.steps
            .push("conntrack: no flow yet: a new flow".to_owned());
    }
    let Some(entry) = service else {
        out.steps.push(format!(
            "{} is not a frontend in the maps: the packet passes untouched",
            query.destination_text()
        ));
        return out;
    };
    new_flow(maps, state, query, &flow, &entry, out)
}

/// The packet path's `backend_usable`.
fn usable_backend<A: MapFamily>(
    maps: &PinnedMaps,
    entry: &CtEntry<A>,
    proto: u8,
) -> Option<Backend<A>> {
    A::backend(maps, entry.backend_id).filter(|b| {
        b.addr_be == entry.new_daddr_be
            && b.port_be == entry.new_dport_be
            && !(proto == IPPROTO_UDP && b.flags & BACKEND_F_DRAINING != 0)
    })
}

fn node_of(state: Option<&NodeState>, addr: IpAddr) -> Option<String> {
    state?
        .services
        .iter()
        .flat_map(|s| &s.endpoints)
        .find(|e| e.address == addr)
        .and_then(|e| e.node.clone())
}

/// The frontend's policies, as lines.
fn describe_frontend(
    state: Option<&NodeState>,
    query: &Query,
    entry: &ServiceEntry,
) -> Vec<String> {
    let mut steps = Vec::new();
    let plan = state.and_then(|s| s.frontend(query.to, query.to_port, query.protocol));
    match plan {
        Some((svc, f)) => {
            let mut line = format!(
                "frontend: {} of {}/{}, {} traffic policy (externalTrafficPolicy {}, \
                 internalTrafficPolicy {})",
                f.kind,
                svc.namespace,
                svc.name,
                f.policy,
                svc.external_traffic_policy,
                svc.internal_traffic_policy
            );
            if f.terminating_fallback {
                line.push_str("; no endpoint is ready, so terminating ones serve (KEP-1669)");
            }
            steps.push(line);
        }
        None => steps.push(format!(
            "frontend: service id {} (no state file names it)",
            entry.service_id
        )),
    }
    let node_port = entry.flags & SERVICE_F_NODE_ADDRESS != 0;
    steps.push(format!(
        "maglev table of {} slots at offset {}{}",
        entry.table_size,
        entry.table_offset,
        if node_port {
            "; a node address (NodePort)"
        } else {
            ""
        }
    ));
    steps
}

/// The frontend's steps up to the choice of a backend, shared by one flow and "any port": its
/// policies, then whether a new flow is admitted at all (source ranges, endpoints). `false`
/// when that already decides the verdict.
fn admitted<A: MapFamily>(
    maps: &PinnedMaps,
    state: Option<&NodeState>,
    query: &Query,
    entry: &ServiceEntry,
    out: &mut Explanation,
) -> bool {
    out.steps.extend(describe_frontend(state, query, entry));
    if entry.source_ranges_id != ANY_SOURCE {
        let from = A::from_ip(query.from).expect("the query's family");
        if !A::source_allowed(maps, entry.source_ranges_id, from) {
            out.steps.push(format!(
                "loadBalancerSourceRanges (set {}): {} is outside them: dropped",
                entry.source_ranges_id, query.from
            ));
            out.verdict = Verdict::DeniedBySourceRanges;
            return false;
        }
        out.steps.push(format!(
            "loadBalancerSourceRanges (set {}): {} is inside them",
            entry.source_ranges_id, query.from
        ));
    }
    if entry.table_size == 0 {
        let reject = entry.flags & SERVICE_F_REJECT != 0;
        out.steps.push(format!(
            "no usable endpoint: {}",
            if reject {
                "answered with a TCP RST / ICMP port unreachable, as kube-proxy does"
            } else {
                "dropped (a Local policy with no endpoint on this node, or --no-endpoints drop)"
            }
        ));
        out.verdict = Verdict::NoBackend { reject };
        return false;
    }
    true
}

fn new_flow<A: MapFamily>(
    maps: &PinnedMaps,
    state: Option<&NodeState>,
    query: &Query,
    flow: &FlowKey<A>,
    entry: &ServiceEntry,
    mut out: Explanation,
) -> Explanation {
    if !admitted::<A>(maps, state, query, entry, &mut out) {
        return out;
    }
    let mut chosen: Option<(BackendId, Backend<A>, &'static str)> = None;
    if entry.affinity_timeout_s != 0 {
        let key = AffinityKey {
            service_id: entry.service_id,
            client_addr_be: flow.saddr_be,
        };
        let timeout_ns = u64::from(entry.affinity_timeout_s) * 1_000_000_000;
        match A::affinity_entry(maps, &key) {
            Some(a) => {
                let age_ns = monotonic_ns().wrapping_sub(a.last_used_ns);
                let backend = A::backend(maps, a.backend_id);
                if age_ns >= timeout_ns {
                    out.steps.push(format!(
                        "sessionAffinity ClientIP ({}s): {}'s last backend is {}s old, expired",
                        entry.affinity_timeout_s,
                        query.from,
                        age_ns / 1_000_000_000
                    ));
                } else if let Some(b) = backend.filter(|b| b.flags & BACKEND_F_DRAINING == 0) {
                    out.steps.push(format!(
                        "sessionAffinity ClientIP ({}s): {} keeps backend {} (last new flow {}s \
                         ago)",
                        entry.affinity_timeout_s,
                        query.from,
                        backend_text(&b),
                        age_ns / 1_000_000_000
                    ));
                    chosen = Some((a.backend_id, b, "affinity"));
                } else {
                    out.steps.push(format!(
                        "sessionAffinity ClientIP ({}s): {}'s last backend drains or left",
                        entry.affinity_timeout_s, query.from
                    ));
                }
            }
            None => out.steps.push(format!(
                "sessionAffinity ClientIP ({}s): {} has no backend yet",
                entry.affinity_timeout_s, query.from
            )),
        }
    }
    let chosen = match chosen {
        Some(found) => found,
        None => {
            let index = slot_for(flow, entry.table_size);
            let Some((id, backend)) = maps
                .slot(entry.table_offset + index)
                .and_then(|id| Some((id, A::backend(maps, id)?)))
            else {
                out.steps.push(format!(
                    "maglev slot {index} holds no backend (mid-update): treated as no backend"
                ));
                out.verdict = Verdict::NoBackend {
                    reject: entry.flags & SERVICE_F_REJECT != 0,
                };
                return out;
            };
            out.steps.push(format!(
                "maglev: the flow hashes to slot {index} of {}: backend {}",
                entry.table_size,
                backend_text(&backend)
            ));
            (id, backend, "maglev")
        }
    };
    let (id, backend, chosen_by) = chosen;
    let snat = match query.origin {
        Origin::External => backend.flags & BACKEND_F_REMOTE != 0,
        Origin::Pod => backend.addr_be == flow.saddr_be,
        Origin::Host => false,
    };
    let address = backend.addr_be.to_ip();
    if snat {
        let node = A::snat_addr(maps).to_ip();
        out.steps.push(if query.origin == Origin::Pod {
            format!("the client is the backend itself (hairpin): SNAT to {node}")
        } else {
            format!("the backend runs on another node: SNAT to {node} so the reply comes back here")
        });
    } else if query.origin == Origin::External {
        out.steps
            .push("the backend runs on this node: only the destination changes".to_owned());
    }
    out.verdict = Verdict::Backend {
        backend_id: id,
        address,
        port: u16::from_be(backend.port_be),
        chosen_by,
        snat,
        node: node_of(state, address),
    };
    out
}

fn backend_text<A: MapFamily>(b: &Backend<A>) -> String {
    format!(
        "{}{}",
        SocketAddr::new(b.addr_be.to_ip(), u16::from_be(b.port_be)),
        if b.flags & BACKEND_F_REMOTE != 0 {
            " (remote)"
        } else {
            ""
        }
    )
}

/// Without a client port: the backends the ports spread over, by Maglev share.
fn any_port<A: MapFamily>(
    maps: &PinnedMaps,
    state: Option<&NodeState>,
    query: &Query,
    entry: &ServiceEntry,
    mut out: Explanation,
) -> Explanation {
    if !admitted::<A>(maps, state, query, entry, &mut out) {
        return out;
    }
    let mut shares: std::collections::BTreeMap<(IpAddr, u16), u32> = Default::default();
    for port in 0..PORTS_SAMPLED {
        let flow = query.flow::<A>(32768 + port);
        let index = slot_for(&flow, entry.table_size);
        if let Some(b) = maps
            .slot(entry.table_offset + index)
            .and_then(|id| A::backend(maps, id))
        {
            *shares
                .entry((b.addr_be.to_ip(), u16::from_be(b.port_be)))
                .or_default() += 1;
        }
    }
    out.steps.push(format!(
        "no client port given: the backend depends on it; of {PORTS_SAMPLED} ephemeral ports, \
         each backend gets (give --from IP:PORT for one flow):"
    ));
    out.verdict = Verdict::AnyOf {
        backends: shares.into_iter().map(|((a, p), n)| (a, p, n)).collect(),
    };
    out
}

/// The explanation as text.
pub fn render(query: &Query, e: &Explanation) -> String {
    let from = match query.from_port {
        Some(port) => SocketAddr::new(query.from, port).to_string(),
        None => query.from.to_string(),
    };
    let mut text = format!(
        "{from} -> {} ({})\n",
        query.destination_text(),
        match query.origin {
            Origin::Pod => "from a pod on this node",
            Origin::External => "arriving from the network",
            Origin::Host => "from the node itself",
        }
    );
    if let Some(service) = &e.service {
        text.push_str(&format!("service: {service}\n"));
    }
    for (i, step) in e.steps.iter().enumerate() {
        text.push_str(&format!("  {}. {step}\n", i + 1));
    }
    text.push_str(&match &e.verdict {
        Verdict::NotAService => "=> passes untouched (not Service traffic)".to_owned(),
        Verdict::Backend {
            address,
            port,
            chosen_by,
            snat,
            node,
            ..
        } => format!(
            "=> backend {}{} (by {chosen_by}){}",
            SocketAddr::new(*address, *port),
            node.as_ref()
                .map(|n| format!(" on {n}"))
                .unwrap_or_default(),
            if *snat {
                ", source NATed to the node"
            } else {
                ""
            }
        ),
        Verdict::AnyOf { backends } => {
            let total: u32 = backends.iter().map(|b| b.2).sum::<u32>().max(1);
            let list: Vec<String> = backends
                .iter()
                .map(|(a, p, n)| {
                    let share = f64::from(*n) * 100.0 / f64::from(total);
                    format!("{} {share:.0}%", SocketAddr::new(*a, *p))
                })
                .collect();
            format!("=> one of {}", list.join(", "))
        }
        Verdict::DeniedBySourceRanges => "=> dropped (loadBalancerSourceRanges)".to_owned(),
        Verdict::NoBackend { reject: true } => "=> rejected (no endpoints)".to_owned(),
        Verdict::NoBackend { reject: false } => "=> dropped (no endpoints)".to_owned(),
        Verdict::ReplyOfFlow {
            client,
            client_port,
        } => format!(
            "=> reply of a translated flow, to {}",
            SocketAddr::new(*client, *client_port)
        ),
    });
    text
}
