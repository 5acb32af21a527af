//! `lb conntrack`: the flows lb translates, one row per flow (its forward entry, with its
//! reply entry's SNAT port), and `--flush`.

use std::collections::BTreeMap;

use aya::maps::IterableMap as _;

use lb_common::{
    Ip6,
    addr::narrow,
    conntrack::{CT_F_SNAT, CT_KIND_FORWARD, CtEntry, FlowKey, partner_key},
};
use serde::Serialize;

use super::{PinnedMaps, flow_state, wide_endpoint_text};
use crate::{model::Protocol, state::NodeState};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowView {
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    /// namespace/name of the frontend's Service ("service id N" without a state file).
    pub service: String,
    pub backend: String,
    /// The source the backend sees, when SNATed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<String>,
    pub state: &'static str,
    pub age_s: u32,
    /// Seconds until the flow dies unless a packet comes (0: already expired, awaiting sweep).
    pub expires_in_s: u32,
}

/// The service ids of the Service `namespace/name`'s frontends, as the maps hold them.
pub fn service_ids(maps: &PinnedMaps, state: &NodeState, wanted: &str) -> Vec<u32> {
    let index = state.frontend_index();
    maps.all_services()
        .into_iter()
        .filter(|(key, _)| {
            (index.get(key)).is_some_and(|(s, _)| format!("{}/{}", s.namespace, s.name) == wanted)
        })
        .map(|(_, entry)| entry.service_id)
        .collect()
}

/// Every conntrack entry of both families, in the wide form (IPv4 as `::ffff:a.b.c.d`).
pub fn entries(maps: &PinnedMaps) -> std::io::Result<Vec<(FlowKey<Ip6>, CtEntry<Ip6>)>> {
    use std::os::fd::AsFd as _;
    let v4 = crate::conntrack::read_all::<u32>(maps.conntrack.map().fd().as_fd())?;
    let mut all: Vec<_> = (v4.iter())
        .map(|(k, e)| (k.to_wide(), e.to_wide()))
        .collect();
    if let Some(v6) = &maps.conntrack6 {
        all.extend(crate::conntrack::read_all::<Ip6>(v6.map().fd().as_fd())?);
    }
    Ok(all)
}

/// One row per flow whose service id is in `only` (all flows when `None`).
pub fn collect(
    maps: &PinnedMaps,
    state: Option<&NodeState>,
    entries: &[(FlowKey<Ip6>, CtEntry<Ip6>)],
    only: Option<&[u32]>,
) -> Vec<FlowView> {
    let now = crate::conntrack::now_s();
    let names = super::service_names(maps, state);
    let by_key: BTreeMap<FlowKey<Ip6>, CtEntry<Ip6>> = entries.iter().copied().collect();
    let mut out: Vec<FlowView> = entries
        .iter()
        .filter(|(_, e)| e.kind == CT_KIND_FORWARD)
        .filter(|(_, e)| only.is_none_or(|ids| ids.contains(&e.service_id)))
        .map(|(key, e)| {
            let reply = by_key.get(&partner_key(key, e));
            let expires = reply.map_or(e.expires_s, |r| r.expires_s.max(e.expires_s));
            FlowView {
                protocol: Protocol::from_number(key.proto)
                    .map_or(key.proto.to_string(), |p| p.to_string()),
                client: wide_endpoint_text(key.saddr_be, key.sport_be),
                frontend: wide_endpoint_text(key.daddr_be, key.dport_be),
                service: names
                    .get(&e.service_id)
                    .cloned()
                    .unwrap_or_else(|| format!("service id {}", e.service_id)),
                backend: wide_endpoint_text(e.new_daddr_be, e.new_dport_be),
                snat: (e.flags & CT_F_SNAT != 0)
                    .then(|| wide_endpoint_text(e.new_saddr_be, e.new_sport_be)),
                state: flow_state(e, key.proto),
                age_s: now.saturating_sub(e.created_s),
                expires_in_s: expires.saturating_sub(now),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.service, &a.client).cmp(&(&b.service, &b.client)));
    out
}

/// Deletes both entries of every flow in `entries` whose service id is in `only` (every flow
/// when `None`). Their next packets start new flows (and may get another backend). Returns how
/// many flows went.
pub fn flush(
    maps: &PinnedMaps,
    entries: &[(FlowKey<Ip6>, CtEntry<Ip6>)],
    only: Option<&[u32]>,
) -> std::io::Result<usize> {
    use std::os::fd::AsFd as _;
    let doomed: Vec<FlowKey<Ip6>> = entries
        .iter()
        .filter(|(_, e)| only.is_none_or(|ids| ids.contains(&e.service_id)))
        .map(|(k, _)| *k)
        .collect();
    // Each family's keys from its own map.
    let doomed4: Vec<FlowKey> = (doomed.iter())
        .filter_map(|k| {
            let (saddr, daddr) = (narrow(k.saddr_be)?, narrow(k.daddr_be)?);
            Some(FlowKey::new(saddr, daddr, k.sport_be, k.dport_be, k.proto))
        })
        .collect();
    let doomed6: Vec<FlowKey<Ip6>> = (doomed.iter())
        .filter(|k| narrow(k.saddr_be).is_none())
        .copied()
        .collect();
    let flows = entries
        .iter()
        .filter(|(_, e)| e.kind == CT_KIND_FORWARD)
        .filter(|(_, e)| only.is_none_or(|ids| ids.contains(&e.service_id)))
        .count();
    crate::conntrack::delete(maps.conntrack.map().fd().as_fd(), &doomed4)?;
    if let Some(v6) = &maps.conntrack6 {
        crate::conntrack::delete(v6.map().fd().as_fd(), &doomed6)?;
    }
    Ok(flows)
}

pub fn render(flows: &[FlowView]) -> String {
    let mut table = super::table(&[
        "PROTO", "CLIENT", "FRONTEND", "SERVICE", "BACKEND", "SNAT", "STATE", "AGE", "EXPIRES",
    ]);
    for f in flows {
        table.add_row([
            f.protocol.clone(),
            f.client.clone(),
            f.frontend.clone(),
            f.service.clone(),
            f.backend.clone(),
            f.snat.clone().unwrap_or_else(|| "-".to_owned()),
            f.state.to_owned(),
            format!("{}s", f.age_s),
            format!("{}s", f.expires_in_s),
        ]);
    }
    format!("{table}\n{} flows", flows.len())
}
