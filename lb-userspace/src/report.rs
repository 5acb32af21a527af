//! Human-readable views of a translation, shared by the CLI and tests.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};

use crate::{
    model::TrafficPolicy,
    translate::{Desired, FrontendPlan, WhenEmpty},
};

/// One row per frontend: where clients connect, what kind of address it is, which Service port,
/// the backends (`*` = on this node) and what shapes the choice.
pub fn frontends_table(desired: &Desired) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    // Wrap cells to fit a real terminal; leave the table alone when the width is unknown or tiny.
    if table.width().is_some_and(|w| w >= 80) {
        table.set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
    }
    table.set_header(["FRONTEND", "KIND", "SERVICE", "PORT", "BACKENDS", "NOTES"]);
    for (frontend, plan) in &desired.frontends {
        let backends = if plan.backends.is_empty() {
            match plan.when_empty {
                WhenEmpty::Reject => "(none: rejected)".to_owned(),
                WhenEmpty::Drop => "(none on this node: dropped)".to_owned(),
            }
        } else {
            plan.backends
                .iter()
                .map(|b| format!("{b}{}", if b.on_this_node { "*" } else { "" }))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let port_name = if plan.port_name.is_empty() {
            "-"
        } else {
            &plan.port_name
        };
        table.add_row([
            frontend.to_string(),
            plan.kind.to_string(),
            format!("{}/{}", plan.service.namespace, plan.service.name),
            port_name.to_owned(),
            backends,
            notes(plan),
        ]);
    }
    table
}

fn notes(plan: &FrontendPlan) -> String {
    let mut notes = Vec::new();
    if plan.policy == TrafficPolicy::Local {
        notes.push(if plan.kind.is_external() {
            "externalTrafficPolicy Local".to_owned()
        } else {
            "internalTrafficPolicy Local".to_owned()
        });
    }
    if plan.terminating_fallback {
        notes.push("terminating endpoints (none ready)".to_owned());
    }
    if let Some(timeout) = plan.affinity_timeout_s {
        notes.push(format!("ClientIP affinity {timeout}s"));
    }
    if !plan.backends.is_empty() {
        notes.push(format!("maglev {}", plan.table_size));
    }
    notes.join(", ")
}
