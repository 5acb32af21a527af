//! Human-readable views of a translation, shared by the CLI and tests.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};

use crate::translate::Desired;

/// One row per frontend: where clients connect, which Service port it is, and the backends.
pub fn frontends_table(desired: &Desired) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(["FRONTEND", "SERVICE", "PORT NAME", "BACKENDS"]);
    for (frontend, plan) in &desired.frontends {
        let backends = if plan.backends.is_empty() {
            "(none: traffic is dropped)".to_owned()
        } else {
            plan.backends
                .iter()
                .map(ToString::to_string)
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
            format!("{}/{}", plan.service.namespace, plan.service.name),
            port_name.to_owned(),
            backends,
        ]);
    }
    table
}
