//! The one sync step, snapshot -> translate -> program (-> purge the UDP flows of backends that
//! left), that the agent, the controller tests and the benchmarks all run: nothing else calls
//! the translator and the programmer in sequence.

use crate::{
    dataplane::{MapWriter, WriteError},
    model::{ObjectRef, Problem},
    sources::Snapshot,
    sync::{Programmer, SyncStats},
    translate::{Desired, Frontend, NodeContext, Translator},
};

/// Translation (which remembers the work for unchanged objects) and the programmer (which
/// remembers what is programmed), kept from one step to the next.
#[derive(Default)]
pub struct Pipeline {
    translator: Translator,
    programmer: Programmer,
}

/// What one step did.
pub struct Step {
    /// What translation asked for (also when programming failed: health-check servers follow it).
    pub desired: Desired,
    /// The source's problems with its objects.
    pub problems: Vec<Problem>,
    /// Rejected objects whose previous version stays programmed.
    pub kept_last_good: Vec<ObjectRef>,
    /// The writes made and the frontends that found no room, or the write that failed (the
    /// next step resumes from what was written).
    pub programmed: Result<(SyncStats, Vec<Frontend>), WriteError>,
    /// After a successful sync: the conntrack entries deleted of UDP flows whose backend left
    /// their Service (see [`Programmer::udp_backends_leaving`]), or why they could not be.
    pub udp_flows_purged: Result<usize, WriteError>,
}

impl Pipeline {
    /// Starts from `programmer` (e.g. one that adopted pinned maps).
    pub fn new(programmer: Programmer) -> Self {
        Self {
            translator: Translator::default(),
            programmer,
        }
    }

    pub fn programmer(&self) -> &Programmer {
        &self.programmer
    }

    pub fn programmer_mut(&mut self) -> &mut Programmer {
        &mut self.programmer
    }

    /// Translates `snapshot` for `node` (its zone as the snapshot's source knows it) and writes
    /// the difference through `writer`.
    pub fn step(
        &mut self,
        snapshot: Snapshot,
        node: &mut NodeContext,
        writer: &mut dyn MapWriter,
    ) -> Step {
        node.zone = snapshot.node_zone;
        let desired = self.translator.translate(&snapshot.objects, node);
        let leaving = self.programmer.udp_backends_leaving(&desired);
        let programmed = self.programmer.sync(&desired, writer);
        let udp_flows_purged = match &programmed {
            Ok(_) if !leaving.is_empty() => writer.forget_udp_flows(&leaving),
            _ => Ok(0),
        };
        Step {
            desired,
            problems: snapshot.problems,
            kept_last_good: snapshot.kept_last_good,
            programmed,
            udp_flows_purged,
        }
    }
}
