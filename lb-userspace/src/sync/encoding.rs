//! How translation's view (frontends, backends, plans) becomes map keys and values: the wire
//! encoding, in one place.

use std::collections::BTreeSet;

use lb_common::{
    addr::wide_from_ip,
    port_be,
    service::{
        BACKEND_F_DRAINING, BACKEND_F_REMOTE, Backend, BackendId, SERVICE_F_NODE_ADDRESS,
        SERVICE_F_REJECT, ServiceEntry, ServiceKey,
    },
};

use crate::{
    dataplane::{BackendValue, FrontendKey, TableRange},
    translate::{BackendAddr, Desired, Frontend, FrontendKind, FrontendPlan, WhenEmpty},
};

/// A frontend's key, either family in the wide form ([`FrontendKey`]).
pub fn service_key(frontend: &Frontend) -> FrontendKey {
    ServiceKey::new(
        wide_from_ip(frontend.addr),
        port_be(frontend.port),
        frontend.protocol.number(),
    )
}

pub fn backend_value(backend: &BackendAddr) -> BackendValue {
    let flags = if backend.on_this_node {
        0
    } else {
        BACKEND_F_REMOTE
    };
    Backend::new(wide_from_ip(backend.addr), port_be(backend.port), flags)
}

/// What a backend id stands for: its value without the draining mark, so a backend that starts
/// or stops draining keeps its id (and its flows).
pub(super) fn identity(backend: &BackendValue) -> BackendValue {
    Backend {
        flags: backend.flags & !BACKEND_F_DRAINING,
        ..*backend
    }
}

pub(super) fn is_draining(backend: &BackendValue) -> bool {
    backend.flags & BACKEND_F_DRAINING != 0
}

/// The backends `desired` keeps only for established flows, as programmed (marked draining).
pub(super) fn draining_values(desired: &Desired) -> BTreeSet<BackendValue> {
    desired
        .draining_backends()
        .iter()
        .map(|b| {
            let mut value = backend_value(b);
            value.flags |= BACKEND_F_DRAINING;
            value
        })
        .collect()
}

/// The entry a frontend with `plan`, table `range`, `service_id` and source-range set
/// `source_ranges_id` gets.
pub(super) fn service_entry(
    plan: &FrontendPlan,
    range: TableRange,
    (service_id, source_ranges_id): (u32, u32),
    reject_no_endpoints: bool,
) -> ServiceEntry {
    let mut flags = 0;
    if plan.kind == FrontendKind::NodePort {
        flags |= SERVICE_F_NODE_ADDRESS;
    }
    if plan.when_empty == WhenEmpty::Reject && reject_no_endpoints {
        flags |= SERVICE_F_REJECT;
    }
    ServiceEntry {
        service_id,
        table_offset: range.offset,
        table_size: range.size,
        affinity_timeout_s: plan.affinity_timeout_s.unwrap_or(0),
        flags,
        _pad: 0,
        source_ranges_id,
    }
}

/// Where a programmed entry's table lives.
pub(super) fn table_range(entry: &ServiceEntry) -> TableRange {
    TableRange {
        offset: entry.table_offset,
        size: entry.table_size,
    }
}

/// The id set a service's affinity memories may name.
pub(super) fn id_set(ids: &[BackendId]) -> BTreeSet<BackendId> {
    ids.iter().copied().collect()
}
