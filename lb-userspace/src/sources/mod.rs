//! Where Services and EndpointSlices come from: a manifest file ([`ManifestSource`]) or the
//! API server ([`KubeSource`]). Both hand out validated objects as a [`Snapshot`] behind one
//! small interface ([`ObjectSource`]), with the same last-known-good rule ([`ObjectStore`]): an
//! object that turns invalid keeps its previous version until it is fixed or removed, so a typo
//! never tears down a working Service.

mod kube;
mod manifest;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::SystemTime,
};

pub use kube::{KubeSource, ZONE_LABEL};
pub use manifest::ManifestSource;

use crate::{
    model::{Kind, Object, ObjectRef, Problem, ServiceName},
    translate::ServiceInputs,
};

/// The objects of one sync: the inputs of the Services whose objects changed since the previous
/// snapshot, or of every Service (`full`, the first snapshot). Objects unchanged are the same
/// `Arc`s as before, so translation skips them.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub changes: Vec<ServiceInputs>,
    /// `changes` lists every Service: any other translated before is gone.
    pub full: bool,
    /// Every problem the source has with its objects now.
    pub problems: Vec<Problem>,
    /// Rejected objects whose previous version is kept.
    pub kept_last_good: Vec<ObjectRef>,
    /// The zone of this agent's Node, when the source knows it (topology-aware routing).
    pub node_zone: Option<String>,
    /// When the changes were triggered: for each changed Service whose slices say so, the
    /// earliest last-change-trigger-time since the previous snapshot. Empty for the first
    /// snapshot (its changes predate the agent).
    pub change_triggers: Vec<SystemTime>,
}

/// A source of objects.
pub trait ObjectSource {
    /// Whether a snapshot now reflects the source (the API server's first lists are complete);
    /// before that the agent keeps what is programmed rather than flush it.
    fn ready(&self) -> bool {
        true
    }

    /// What changed since the last snapshot, or `None` when the objects cannot be read (the
    /// caller keeps what is programmed and says why).
    fn snapshot(&mut self) -> Option<Snapshot>;
}

/// The valid objects of a source filed by the Service they belong to, with the last-known-good
/// rule, and the Services changed since the last snapshot. Both sources feed it one object at a
/// time, so the work of a snapshot follows the change, not the cluster.
#[derive(Debug)]
pub struct ObjectStore {
    services: HashMap<ServiceName, Arc<Object>>,
    /// Slices by the Service they name, by slice name.
    slices: HashMap<ServiceName, Slices>,
    /// Where each stored slice is filed (its label may change, or a deletion name only it).
    slice_owner: HashMap<ObjectRef, ServiceName>,
    /// Rejected objects whose last good version is kept.
    kept: BTreeSet<ObjectRef>,
    dirty: HashSet<ServiceName>,
    /// The earliest trigger time of each dirty Service's slice changes.
    triggers: HashMap<ServiceName, SystemTime>,
    /// The next snapshot lists every Service.
    full: bool,
}

/// The slices filed under one Service, sorted by name. Most Services have one or two, so a
/// vector: a B-tree's smallest node has room for eleven.
#[derive(Debug, Default)]
struct Slices(Vec<Arc<Object>>);

impl Slices {
    fn position(&self, name: &str) -> Result<usize, usize> {
        (self.0).binary_search_by(|slice| (*slice.id().name).cmp(name))
    }

    /// Files `slice`, replacing the one of the same name.
    fn insert(&mut self, slice: Arc<Object>) {
        match self.position(&slice.id().name) {
            Ok(at) => self.0[at] = slice,
            Err(at) => self.0.insert(at, slice),
        }
    }

    fn remove(&mut self, name: &str) {
        if let Ok(at) = self.position(name) {
            self.0.remove(at);
        }
    }

    fn get(&self, name: &str) -> Option<&Arc<Object>> {
        self.position(name).ok().map(|at| &self.0[at])
    }

    fn values(&self) -> impl Iterator<Item = &Arc<Object>> {
        self.0.iter()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Default for ObjectStore {
    fn default() -> Self {
        Self {
            services: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            kept: BTreeSet::new(),
            dirty: HashSet::new(),
            triggers: HashMap::new(),
            full: true,
        }
    }
}

impl ObjectStore {
    /// One read of an object: a valid one (`Some`) replaces its previous version unless equal
    /// (the previous `Arc` is kept then); a rejected one keeps its previous version, if any.
    pub fn put(&mut self, id: &ObjectRef, object: Option<Arc<Object>>) {
        let Some(object) = object else {
            if self.get(id).is_some() {
                self.kept.insert(id.clone());
            }
            return;
        };
        self.kept.remove(id);
        if self
            .get(id)
            .is_some_and(|old| Arc::ptr_eq(old, &object) || **old == *object)
        {
            return;
        }
        let name = object.service_name();
        match object.as_ref() {
            Object::Slice(slice) if !self.full => {
                if let Some(at) = slice.last_change_trigger {
                    let earliest = self.triggers.entry(name.clone()).or_insert(at);
                    *earliest = (*earliest).min(at);
                }
            }
            _ => {}
        }
        match object.as_ref() {
            Object::Service(_) => {
                self.services.insert(name.clone(), object);
            }
            Object::Slice(_) => {
                if let Some(old) = self.slice_owner.get(id)
                    && *old != name
                {
                    self.remove(id);
                }
                self.slices.entry(name.clone()).or_default().insert(object);
                self.slice_owner.insert(id.clone(), name.clone());
            }
        }
        self.dirty.insert(name);
    }

    /// The object is gone from the source.
    pub fn remove(&mut self, id: &ObjectRef) {
        self.kept.remove(id);
        match id.kind {
            Kind::Service => {
                let name = ServiceName::of(id);
                if self.services.remove(&name).is_some() {
                    self.dirty.insert(name);
                }
            }
            Kind::EndpointSlice => {
                let Some(name) = self.slice_owner.remove(id) else {
                    return;
                };
                if let Some(slices) = self.slices.get_mut(&name) {
                    slices.remove(&id.name);
                    if slices.is_empty() {
                        self.slices.remove(&name);
                    }
                }
                self.dirty.insert(name);
            }
        }
    }

    /// The stored version of an object.
    pub fn get(&self, id: &ObjectRef) -> Option<&Arc<Object>> {
        match id.kind {
            Kind::Service => self.services.get(&ServiceName::of(id)),
            Kind::EndpointSlice => self.slices.get(self.slice_owner.get(id)?)?.get(&id.name),
        }
    }

    /// Rejected objects whose last good version is kept.
    pub fn kept(&self) -> impl Iterator<Item = &ObjectRef> {
        self.kept.iter()
    }

    /// Every stored object id.
    pub fn ids(&self) -> impl Iterator<Item = ObjectRef> + '_ {
        let services = self.services.values().map(|o| o.id().clone());
        services.chain(self.slice_owner.keys().cloned())
    }

    /// Every stored object, Services first.
    pub fn objects(&self) -> impl Iterator<Item = &Arc<Object>> {
        let slices = self.slices.values().flat_map(|s| s.values());
        self.services.values().chain(slices)
    }

    /// A snapshot of the Services changed since the last one (of all of them the first time)
    /// and the objects kept at their last good version; the caller adds its problems and zone.
    pub fn take_changes(&mut self) -> Snapshot {
        let full = std::mem::take(&mut self.full);
        let names: Vec<ServiceName> = if full {
            self.dirty.clear();
            let mut all: HashSet<ServiceName> = self.services.keys().cloned().collect();
            all.extend(self.slices.keys().cloned());
            all.into_iter().collect()
        } else {
            self.dirty.drain().collect()
        };
        let changes = names
            .into_iter()
            .map(|name| ServiceInputs {
                service: self.services.get(&name).cloned(),
                slices: (self.slices.get(&name))
                    .map(|s| s.values().cloned().collect())
                    .unwrap_or_default(),
                name,
            })
            .collect();
        Snapshot {
            changes,
            full,
            kept_last_good: self.kept.iter().cloned().collect(),
            change_triggers: self.triggers.drain().map(|(_, at)| at).collect(),
            ..Snapshot::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{ManifestSource, ObjectSource as _, Snapshot};
    use crate::model::Object;

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const API: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: t}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";

    /// The changed Services' names, sorted.
    fn changed(snapshot: &Snapshot) -> Vec<String> {
        let mut names: Vec<String> = (snapshot.changes.iter())
            .map(|c| c.name.name.to_string())
            .collect();
        names.sort();
        names
    }

    fn service<'a>(snapshot: &'a Snapshot, name: &str) -> Option<&'a Arc<Object>> {
        let inputs = snapshot.changes.iter().find(|c| &*c.name.name == name)?;
        inputs.service.as_ref()
    }

    /// A snapshot carries only what changed, and translation works on `Arc` identity: a re-read
    /// file must hand out the same `Arc` for an object that did not change, and a new one for
    /// an object that did.
    #[test]
    fn a_reread_hands_out_only_what_changed_and_keeps_the_last_good_of_rejected_objects() {
        let path =
            std::env::temp_dir().join(format!("lb-sources-test-{}.yaml", std::process::id()));
        std::fs::write(&path, format!("{WEB}{API}")).unwrap();
        let mut source = ManifestSource::new(&path);
        let first = source.snapshot().unwrap();
        assert!(first.full);
        assert_eq!(changed(&first), ["api", "web"]);
        let web = source.objects().find(|o| &*o.id().name == "web").unwrap() as *const Object;

        std::fs::write(
            &path,
            format!("{WEB}{}", API.replace("10.96.0.2", "10.96.0.3")),
        )
        .unwrap();
        source.force_reread();
        let second = source.snapshot().unwrap();
        assert!(!second.full);
        assert_eq!(changed(&second), ["api"], "web is unchanged");
        assert!(!Arc::ptr_eq(
            service(&first, "api").unwrap(),
            service(&second, "api").unwrap()
        ));
        let web_again = source.objects().find(|o| &*o.id().name == "web").unwrap();
        assert!(std::ptr::eq(web, web_again), "the same Arc for web");

        // api turns invalid: nothing changes, its last good version stays, and says so.
        std::fs::write(
            &path,
            format!("{WEB}{}", API.replace("10.96.0.2", "10.96.0.999")),
        )
        .unwrap();
        source.force_reread();
        let third = source.snapshot().unwrap();
        assert!(third.changes.is_empty());
        assert_eq!(third.kept_last_good.len(), 1);
        assert_eq!(&*third.kept_last_good[0].name, "api");
        assert!(
            third
                .problems
                .iter()
                .any(|p| p.field == "spec.clusterIP[0]")
        );

        // web leaves the file: its name comes with no Service.
        std::fs::write(&path, API.replace("10.96.0.2", "10.96.0.3")).unwrap();
        source.force_reread();
        let fourth = source.snapshot().unwrap();
        assert_eq!(changed(&fourth), ["web"]);
        assert!(service(&fourth, "web").is_none());
        assert!(fourth.kept_last_good.is_empty(), "api is valid again");

        // An unreadable file gives no snapshot (the caller keeps what is programmed).
        std::fs::remove_file(&path).unwrap();
        assert!(source.snapshot().is_none());
    }
}
