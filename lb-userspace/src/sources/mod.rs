//! Where Services and EndpointSlices come from: a manifest file ([`ManifestSource`]) or the
//! API server ([`KubeSource`]). Both hand out validated objects as a [`Snapshot`] behind one
//! small interface ([`ObjectSource`]), with the same last-known-good rule ([`LastGood`]): an
//! object that turns invalid keeps its previous version until it is fixed or removed, so a typo
//! never tears down a working Service.

mod kube;
mod manifest;

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::Arc,
};

pub use kube::{KubeSource, ZONE_LABEL};
pub use manifest::ManifestSource;

use crate::model::{Object, ObjectRef, Problem};

/// The objects of one sync. Objects unchanged since the previous snapshot are the same `Arc`s,
/// so translation reuses its work for them.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub objects: Vec<Arc<Object>>,
    pub problems: Vec<Problem>,
    /// Rejected objects whose previous version is kept.
    pub kept_last_good: Vec<ObjectRef>,
    /// The zone of this agent's Node, when the source knows it (topology-aware routing).
    pub node_zone: Option<String>,
}

/// A source of objects.
pub trait ObjectSource {
    /// Whether a snapshot now reflects the source (the API server's first lists are complete);
    /// before that the agent keeps what is programmed rather than flush it.
    fn ready(&self) -> bool {
        true
    }

    /// The objects to program now, or `None` when they cannot be read (the caller keeps what is
    /// programmed and says why).
    fn snapshot(&mut self) -> Option<Snapshot>;
}

/// One read of a source: each object identified, valid (`Some`) or rejected (`None`).
pub type Verdicts = Vec<(ObjectRef, Option<Arc<Object>>)>;

/// The last good version of every object, and the rule that applies it.
#[derive(Debug, Default)]
pub struct LastGood {
    /// id -> (last good version, the read that last mentioned it).
    by_id: HashMap<ObjectRef, (Arc<Object>, u64)>,
    /// The same objects in the order of the last read.
    in_order: Vec<Arc<Object>>,
    reads: u64,
}

impl LastGood {
    /// Takes one read: valid objects replace their previous version (keeping the previous `Arc`
    /// when nothing changed); a rejected object keeps its previous version if it had one;
    /// objects the read does not mention are gone. Returns the ids kept at their last good
    /// version. One hash lookup an object: the map is updated in place.
    pub fn update(&mut self, verdicts: Verdicts) -> Vec<ObjectRef> {
        self.reads += 1;
        let read = self.reads;
        let mut kept = Vec::new();
        self.in_order.clear();
        for (id, object) in verdicts {
            let object = match (self.by_id.entry(id), object) {
                (Entry::Occupied(mut slot), Some(object)) => {
                    let (previous, seen) = slot.get_mut();
                    if !Arc::ptr_eq(previous, &object) && **previous != *object {
                        *previous = object;
                    }
                    *seen = read;
                    previous.clone()
                }
                (Entry::Occupied(mut slot), None) => {
                    kept.push(slot.key().clone());
                    let (previous, seen) = slot.get_mut();
                    *seen = read;
                    previous.clone()
                }
                (Entry::Vacant(slot), Some(object)) => slot.insert((object, read)).0.clone(),
                (Entry::Vacant(_), None) => continue,
            };
            self.in_order.push(object);
        }
        self.by_id.retain(|_, (_, seen)| *seen == read);
        kept
    }

    /// In the order of the last read.
    pub fn objects(&self) -> impl Iterator<Item = &Arc<Object>> {
        self.in_order.iter()
    }

    pub fn to_vec(&self) -> Vec<Arc<Object>> {
        self.in_order.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{ManifestSource, ObjectSource as _, Snapshot};

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const API: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: t}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";

    fn by_name<'a>(snapshot: &'a Snapshot, name: &str) -> &'a Arc<crate::model::Object> {
        snapshot
            .objects
            .iter()
            .find(|o| o.id().name == name)
            .unwrap_or_else(|| panic!("{name} in the snapshot"))
    }

    /// The translation cache works on `Arc` identity: a re-read file must hand out the same
    /// `Arc` for an object that did not change, and a new one for an object that did.
    #[test]
    fn a_reread_keeps_the_arcs_of_unchanged_objects_and_the_last_good_of_rejected_ones() {
        let path =
            std::env::temp_dir().join(format!("lb-sources-test-{}.yaml", std::process::id()));
        std::fs::write(&path, format!("{WEB}{API}")).unwrap();
        let mut source = ManifestSource::new(&path);
        let first = source.snapshot().unwrap();
        assert_eq!(first.objects.len(), 2);

        std::fs::write(
            &path,
            format!("{WEB}{}", API.replace("10.96.0.2", "10.96.0.3")),
        )
        .unwrap();
        source.force_reread();
        let second = source.snapshot().unwrap();
        assert!(Arc::ptr_eq(by_name(&first, "web"), by_name(&second, "web")));
        assert!(!Arc::ptr_eq(
            by_name(&first, "api"),
            by_name(&second, "api")
        ));

        // api turns invalid: its last good version (the same Arc) stays, and says so.
        std::fs::write(
            &path,
            format!("{WEB}{}", API.replace("10.96.0.2", "10.96.0.999")),
        )
        .unwrap();
        source.force_reread();
        let third = source.snapshot().unwrap();
        assert_eq!(third.kept_last_good.len(), 1);
        assert_eq!(third.kept_last_good[0].name, "api");
        assert!(Arc::ptr_eq(by_name(&second, "api"), by_name(&third, "api")));

        // An unreadable file gives no snapshot (the caller keeps what is programmed).
        std::fs::remove_file(&path).unwrap();
        assert!(source.snapshot().is_none());
    }
}
