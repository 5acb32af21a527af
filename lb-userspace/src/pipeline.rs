//! The one sync step, snapshot -> translate -> program (-> purge the UDP flows of backends that
//! left), that the agent, the controller tests and the benchmarks all run: nothing else calls
//! the translator and the programmer in sequence.
//!
//! Work follows the change: a snapshot carries only the Services whose objects changed, the
//! translator hands on only the frontends whose plan may have changed ([`Touched`]), and the
//! programmer looks at those alone.

use std::time::SystemTime;

use crate::{
    dataplane::{MapWriter, WriteError},
    model::{ObjectRef, Problem},
    sources::Snapshot,
    sync::{Programmer, SyncStats},
    translate::{Desired, Frontend, NodeContext, Touched, Translator},
};

/// Translation (which keeps every Service's output) and the programmer (which remembers what is
/// programmed), kept from one step to the next.
#[derive(Default)]
pub struct Pipeline {
    translator: Translator,
    programmer: Programmer,
}

/// What one step did.
pub struct Step<'a> {
    /// What translation asks for now (also when programming failed: health-check servers follow
    /// it).
    pub desired: &'a Desired,
    /// The frontends this step may have changed.
    pub touched: Touched,
    /// The source's problems with its objects.
    pub problems: Vec<Problem>,
    /// Rejected objects whose previous version stays programmed.
    pub kept_last_good: Vec<ObjectRef>,
    /// The step translated every Service (the first one): a good moment to hand freed heap back.
    pub full: bool,
    /// When the changes this step programs were triggered (see [`Snapshot::change_triggers`]).
    pub change_triggers: Vec<SystemTime>,
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

    pub fn translator(&self) -> &Translator {
        &self.translator
    }

    /// What translation asks for, as of the last step.
    pub fn desired(&self) -> &Desired {
        self.translator.desired()
    }

    /// Translates what `snapshot` changed for `node` (its zone as the snapshot's source knows it)
    /// and writes the difference through `writer`.
    pub fn step(
        &mut self,
        snapshot: Snapshot,
        node: &mut NodeContext,
        writer: &mut dyn MapWriter,
    ) -> Step<'_> {
        node.zone = snapshot.node_zone;
        let full = snapshot.full;
        let touched = self.translator.apply(snapshot.changes, full, node);
        let desired = self.translator.desired();
        let leaving = self
            .programmer
            .udp_backends_leaving(desired, Some(&touched));
        let programmed = self
            .programmer
            .sync_touched(desired, Some(&touched), writer);
        let udp_flows_purged = match &programmed {
            Ok(_) if !leaving.is_empty() => writer.forget_udp_flows(&leaving),
            _ => Ok(0),
        };
        Step {
            desired,
            touched,
            problems: snapshot.problems,
            kept_last_good: snapshot.kept_last_good,
            full,
            change_triggers: snapshot.change_triggers,
            programmed,
            udp_flows_purged,
        }
    }
}

/// Hands the heap freed by a large step (parsing and translating everything) back to the
/// system: glibc keeps freed memory in its arenas, and a first sync of 10,000 Services frees
/// tens of MiB of parse temporaries interleaved with what stays.
pub fn release_free_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe { libc::malloc_trim(0) };
}
