//! A manifest file as a source of objects, re-read when it changes (or on SIGHUP).

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use rayon::prelude::*;
use tracing::error;

use super::{ObjectSource, ObjectStore, Snapshot};
use crate::{
    manifest,
    model::{Object, ObjectRef, Problem},
};

/// Identifies a version of the file cheaply, to avoid re-reading an unchanged file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

pub struct ManifestSource {
    path: PathBuf,
    seen: Option<Fingerprint>,
    store: ObjectStore,
    /// The documents of the last read by their text's hash, as parsed: an unchanged document
    /// is not parsed again, and hands out the same `Arc`s.
    documents: HashMap<u64, Document>,
    /// The problems of the last read.
    problems: Vec<Problem>,
    occurrences: Occurrences,
    /// Re-read on the next snapshot even if the file looks unchanged.
    force: bool,
    /// Kinds lb does not read that were already named in the log (once each).
    skipped_kinds_named: std::collections::HashSet<String>,
    /// The maps held Services when the agent started and no read was applied since: a file
    /// that holds nothing must not flush them either.
    programmed_at_start: bool,
}

/// How many documents of the file name each object.
#[derive(Default)]
struct Occurrences {
    by_id: HashMap<ObjectRef, u32>,
    /// Ids named by more than one document.
    duplicated: usize,
}

impl Occurrences {
    fn count<'a>(&mut self, ids: impl Iterator<Item = &'a ObjectRef>) {
        for id in ids {
            let n = self.by_id.entry(id.clone()).or_default();
            *n += 1;
            if *n == 2 {
                self.duplicated += 1;
            }
        }
    }

    fn forget<'a>(&mut self, ids: impl Iterator<Item = &'a ObjectRef>) {
        for id in ids {
            let Some(n) = self.by_id.get_mut(id) else {
                continue;
            };
            *n -= 1;
            if *n == 1 {
                self.duplicated -= 1;
            }
            if *n == 0 {
                self.by_id.remove(id);
            }
        }
    }
}

/// The objects as `Arc`s, in a vector of their own size: collecting in place would keep the
/// parsed objects' (far larger) allocation alive for as long as the document is cached.
fn shared(objects: Vec<Object>) -> Vec<Arc<Object>> {
    let mut shared = Vec::with_capacity(objects.len());
    shared.extend(objects.into_iter().map(Arc::new));
    shared
}

/// One document as parsed, where it was then.
struct Document {
    location: String,
    objects: Vec<Arc<Object>>,
    rejected: Vec<ObjectRef>,
    problems: Vec<Problem>,
    skipped_kinds: Vec<String>,
    declares_empty: bool,
}

impl Document {
    fn parse(text: &str, location: String) -> Self {
        let mut read = manifest::ManifestRead::default();
        manifest::parse_document(text, &location, &mut read);
        Self::from_read(read, location)
    }

    fn from_read(read: manifest::ManifestRead, location: String) -> Self {
        Self {
            location,
            objects: shared(read.objects),
            rejected: read.rejected,
            problems: read.problems,
            skipped_kinds: read.skipped_kinds.into_keys().collect(),
            declares_empty: read.declares_empty,
        }
    }

    /// The objects it names, valid or not.
    fn ids(&self) -> impl Iterator<Item = &ObjectRef> {
        self.objects.iter().map(|o| o.id()).chain(&self.rejected)
    }

    /// The same document found at another place in the file: its problems say so.
    fn moved_to(&mut self, location: String) {
        for problem in &mut self.problems {
            if let Some(rest) = problem.location.strip_prefix(&self.location) {
                problem.location = format!("{location}{rest}");
            }
        }
        self.location = location;
    }
}

/// A document of a read before parsing: known from the last read, or to parse.
enum Pending<'a> {
    Known(Document),
    Fresh { document: &'a str, location: String },
}

/// The outcome of one read.
pub struct Reload {
    pub problems: Vec<Problem>,
    /// Rejected objects whose previous version is kept.
    pub kept_last_good: Vec<ObjectRef>,
    /// The file held no object while the last good read had some: nothing was changed (a file
    /// emptied or cut short while being written must not remove every Service).
    pub kept_everything: bool,
}

impl ManifestSource {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            seen: None,
            store: ObjectStore::default(),
            documents: HashMap::new(),
            problems: Vec::new(),
            occurrences: Occurrences::default(),
            force: true,
            skipped_kinds_named: Default::default(),
            programmed_at_start: false,
        }
    }

    /// Tells the source that the maps already hold Services (adopted from an earlier run): a
    /// first read that holds nothing then keeps them instead of flushing them.
    pub fn with_programmed_services(mut self, programmed: bool) -> Self {
        self.programmed_at_start = programmed;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.store.objects().map(|o| &**o)
    }

    /// The next snapshot re-reads the file (SIGHUP).
    pub fn force_reread(&mut self) {
        self.force = true;
    }

    fn fingerprint(&self) -> io::Result<Fingerprint> {
        let meta = std::fs::metadata(&self.path)?;
        Ok(Fingerprint {
            inode: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }

    /// Whether the file looks different from the last read (or cannot be examined).
    pub fn changed(&self) -> bool {
        self.fingerprint().ok() != self.seen
    }

    /// Reads the file again, parsing only the documents that changed. On an I/O error nothing
    /// changes and the error is returned.
    pub fn reload(&mut self) -> io::Result<Reload> {
        let fingerprint = self.fingerprint()?;
        let text = std::fs::read_to_string(&self.path)?;
        self.seen = Some(fingerprint);
        let source = self.path.display().to_string();
        // The documents parsed afresh, and those of the last read that are gone: with no id
        // given twice in the file, only their objects can have changed.
        let mut fresh = Vec::new();
        let left: Vec<(u64, Document)>;
        let documents = match manifest::split_documents(&text) {
            Some(split) => {
                let mut previous = std::mem::take(&mut self.documents);
                // Known documents are taken from the last read; the others are parsed on
                // every core (YAML parsing is most of a first read's time).
                let slots: Vec<(u64, Pending)> = split
                    .into_iter()
                    .enumerate()
                    .map(|(index, document)| {
                        let location = manifest::document_location(&source, index);
                        let mut hasher = DefaultHasher::new();
                        document.hash(&mut hasher);
                        let hash = hasher.finish();
                        let known = match previous.remove(&hash) {
                            Some(mut parsed) => {
                                if parsed.location != location {
                                    parsed.moved_to(location);
                                }
                                Pending::Known(parsed)
                            }
                            None => Pending::Fresh { document, location },
                        };
                        (hash, known)
                    })
                    .collect();
                fresh.extend(
                    (slots.iter().enumerate())
                        .filter(|(_, (_, pending))| matches!(pending, Pending::Fresh { .. }))
                        .map(|(index, _)| index),
                );
                let documents: Vec<(u64, Document)> = slots
                    .into_par_iter()
                    .map(|(hash, pending)| {
                        let parsed = match pending {
                            Pending::Known(parsed) => parsed,
                            Pending::Fresh { document, location } => {
                                Document::parse(document, location)
                            }
                        };
                        (hash, parsed)
                    })
                    .collect();
                left = previous.into_iter().collect();
                documents
            }
            // Parsed whole; nothing to reuse.
            None => {
                let whole = Document::from_read(manifest::parse(&text, &source), String::new());
                left = std::mem::take(&mut self.documents).into_iter().collect();
                fresh.push(0);
                vec![(0, whole)]
            }
        };
        let holds_nothing = (documents.iter()).all(|(_, d)| d.ids().next().is_none());
        let declares_empty = documents.iter().any(|(_, d)| d.declares_empty);
        let something_to_lose = self.store.ids().next().is_some() || self.programmed_at_start;
        if holds_nothing && !declares_empty && something_to_lose {
            // The last good read stays in force, documents included, so the next read of a
            // complete file only parses what changed.
            self.documents = left.into_iter().collect();
            let mut problems = vec![Problem {
                severity: crate::model::Severity::Error,
                object: None,
                location: source.clone(),
                field: String::new(),
                message: "holds no Service or EndpointSlice (empty, or cut short while being \
                          written?); keeping every Service programmed. To remove them all, \
                          write an empty list: `{apiVersion: v1, kind: List, items: []}`"
                    .to_owned(),
            }];
            problems.extend(documents.into_iter().flat_map(|(_, d)| d.problems));
            self.problems = problems.clone();
            return Ok(Reload {
                problems,
                kept_last_good: Vec::new(),
                kept_everything: true,
            });
        }
        self.programmed_at_start = false;
        for (_, document) in &left {
            self.occurrences.forget(document.ids());
        }
        for &index in &fresh {
            self.occurrences.count(documents[index].1.ids());
        }
        if self.occurrences.duplicated == 0 {
            for id in left.iter().flat_map(|(_, d)| d.ids()) {
                if !self.occurrences.by_id.contains_key(id) {
                    self.store.remove(id);
                }
            }
            for &index in &fresh {
                let document = &documents[index].1;
                for object in &document.objects {
                    self.store.put(object.id(), Some(object.clone()));
                }
                for id in &document.rejected {
                    self.store.put(id, None);
                }
            }
        } else {
            // Some object is given twice: every verdict again. A valid copy wins over a
            // rejected one.
            let mut verdicts: HashMap<&ObjectRef, Option<&Arc<Object>>> = HashMap::new();
            for (_, document) in &documents {
                for object in &document.objects {
                    verdicts.insert(object.id(), Some(object));
                }
                for id in &document.rejected {
                    verdicts.entry(id).or_insert(None);
                }
            }
            let gone: Vec<ObjectRef> = (self.store.ids())
                .filter(|id| !verdicts.contains_key(id))
                .collect();
            for id in &gone {
                self.store.remove(id);
            }
            for (id, object) in verdicts {
                self.store.put(id, object.cloned());
            }
        }
        self.problems = (documents.iter())
            .flat_map(|(_, d)| d.problems.iter().cloned())
            .collect();
        for (_, document) in &documents {
            for kind in &document.skipped_kinds {
                if self.skipped_kinds_named.insert(kind.clone()) {
                    tracing::info!(
                        "{}: skipping objects of kind {kind} (lb reads Services and EndpointSlices)",
                        self.path.display()
                    );
                }
            }
        }
        self.documents = HashMap::with_capacity(documents.len());
        for (hash, document) in documents {
            // The same text twice: one copy is kept (the counts follow what is kept).
            if let Some(dropped) = self.documents.insert(hash, document) {
                self.occurrences.forget(dropped.ids());
            }
        }
        Ok(Reload {
            problems: self.problems.clone(),
            kept_last_good: self.store.kept().cloned().collect(),
            kept_everything: false,
        })
    }
}

impl ObjectSource for ManifestSource {
    fn snapshot(&mut self) -> Option<Snapshot> {
        if self.changed() || std::mem::take(&mut self.force) {
            match self.reload() {
                Err(err) => {
                    error!(
                        "cannot read {}: {err}; keeping what is programmed",
                        self.path.display()
                    );
                    return None;
                }
                // Nothing read yet but the maps hold Services from an earlier run: no sync,
                // which would flush them.
                Ok(reload) if reload.kept_everything && self.store.ids().next().is_none() => {
                    for problem in &reload.problems {
                        error!("{problem}");
                    }
                    return None;
                }
                Ok(_) => {}
            }
        }
        // Unchanged file: only something else changed (node addresses), no objects.
        Some(Snapshot {
            problems: self.problems.clone(),
            ..self.store.take_changes()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const OTHER: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: t}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";

    fn names(source: &ManifestSource) -> Vec<String> {
        let mut names: Vec<String> = source.objects().map(|o| o.id().name.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn an_object_that_turns_invalid_keeps_its_last_good_version_until_removed() {
        let path = std::env::temp_dir().join(format!("lb-source-test-{}.yaml", std::process::id()));
        std::fs::write(&path, format!("{GOOD}{OTHER}")).unwrap();
        let mut source = ManifestSource::new(&path);
        assert!(source.changed());
        source.reload().unwrap();
        assert!(!source.changed());
        assert_eq!(names(&source), ["api", "web"]);

        // A typo in web: reported, web's previous version stays, api is unaffected.
        std::fs::write(
            &path,
            format!("{}{OTHER}", GOOD.replace("10.96.0.1", "10.96.0.999")),
        )
        .unwrap();
        let reload = source.reload().unwrap();
        assert_eq!(reload.kept_last_good.len(), 1);
        assert_eq!(&*reload.kept_last_good[0].name, "web");
        assert!(
            reload
                .problems
                .iter()
                .any(|p| p.field == "spec.clusterIP[0]")
        );
        assert_eq!(names(&source), ["api", "web"]);
        let Some(Object::Service(web)) = source.objects().find(|o| &*o.id().name == "web") else {
            panic!("web kept");
        };
        assert_eq!(web.cluster_ips, [std::net::Ipv4Addr::new(10, 96, 0, 1)]);

        // Removing it from the file removes it.
        std::fs::write(&path, OTHER).unwrap();
        source.reload().unwrap();
        assert_eq!(names(&source), ["api"]);

        // An unreadable file changes nothing.
        std::fs::remove_file(&path).unwrap();
        assert!(source.reload().is_err());
        assert_eq!(names(&source), ["api"]);
    }

    /// Bad input loses nothing: a document that is not YAML is reported and skipped alone
    /// (the documents after it still load); a file that holds nothing (emptied, or cut short
    /// while being written) keeps every Service until an empty List says that is meant; a
    /// misspelt kind is a warning; other kinds are skipped quietly.
    #[test]
    fn bad_input_is_reported_and_loses_nothing() {
        let path = std::env::temp_dir().join(format!("lb-source-bad-{}.yaml", std::process::id()));
        let broken = "---
apiVersion: v1
kind: Service
metadata: {name: broken
spec: [
";
        let typo = "---
apiVersion: v1
kind: Servic
metadata: {name: typo}
";
        let deployment = "---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
";
        std::fs::write(&path, format!("{GOOD}{broken}{typo}{deployment}{OTHER}")).unwrap();
        let mut source = ManifestSource::new(&path);
        let reload = source.reload().unwrap();
        assert_eq!(
            names(&source),
            ["api", "web"],
            "the documents after the bad one load"
        );
        let problems: Vec<String> = reload.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].contains("document 2") && problems[0].contains("invalid YAML"));
        assert!(
            problems[1].starts_with("warning") && problems[1].contains("did you mean Service?")
        );

        for cut_short in ["", "\n", "# being written\n", "---\n", "apiVersion: v1\nki"] {
            std::fs::write(&path, cut_short).unwrap();
            let reload = source.reload().unwrap();
            assert!(reload.kept_everything, "{cut_short:?}");
            assert_eq!(
                names(&source),
                ["api", "web"],
                "{cut_short:?} keeps every Service"
            );
            assert!(
                reload.problems[0]
                    .to_string()
                    .contains("keeping every Service"),
                "{:?}",
                reload.problems
            );
        }
        // An agent restarted on an empty file over maps that hold Services: no sync at all.
        std::fs::write(&path, "").unwrap();
        let mut restarted = ManifestSource::new(&path).with_programmed_services(true);
        assert!(
            restarted.snapshot().is_none(),
            "nothing to sync: the maps stay"
        );
        assert!(
            ManifestSource::new(&path).snapshot().is_some(),
            "nothing programmed: fine"
        );

        // A complete file again, then an intended empty one.
        std::fs::write(&path, OTHER).unwrap();
        assert!(!source.reload().unwrap().kept_everything);
        assert_eq!(names(&source), ["api"]);
        std::fs::write(&path, "apiVersion: v1\nkind: List\nitems: []\n").unwrap();
        let reload = source.reload().unwrap();
        assert!(!reload.kept_everything && reload.problems.is_empty());
        assert!(names(&source).is_empty(), "an empty List removes them all");
        std::fs::remove_file(&path).unwrap();
    }

    /// A re-read that parses only changed documents must leave what a first read of the same
    /// file gives, through random edits: documents added, removed, changed, moved and given
    /// twice.
    #[test]
    fn rereads_match_a_first_read_through_random_edits() {
        let variant = |name: usize, ip: usize| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{name}, namespace: t}}\nspec: {{clusterIP: 10.96.0.{ip}, ports: [{{port: 80}}]}}\n"
            )
        };
        let sorted = |source: &ManifestSource| {
            let mut objects: Vec<Object> = source.objects().cloned().collect();
            objects.sort_by(|a, b| a.id().cmp(b.id()));
            objects
        };
        let path = std::env::temp_dir().join(format!("lb-reread-test-{}.yaml", std::process::id()));
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut below = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as usize
        };
        let mut documents: Vec<String> = Vec::new();
        let mut source = ManifestSource::new(&path);
        for round in 0..300 {
            match below(4) {
                0 if !documents.is_empty() => {
                    let at = below(documents.len() as u64);
                    documents.remove(at);
                }
                1 if !documents.is_empty() => {
                    let at = below(documents.len() as u64);
                    let moved = documents.remove(at);
                    documents.insert(below(documents.len() as u64 + 1), moved);
                }
                _ => {
                    let at = below(documents.len() as u64 + 1);
                    documents.insert(at, variant(below(6), below(3) + 1));
                }
            }
            // Emptied on purpose: said with an empty List (a file of nothing changes nothing).
            let text = match documents.is_empty() {
                true => "apiVersion: v1\nkind: List\nitems: []\n".to_owned(),
                false => documents.join("---\n"),
            };
            std::fs::write(&path, text).unwrap();
            source.force_reread();
            source.reload().unwrap();
            let mut first = ManifestSource::new(&path);
            first.reload().unwrap();
            assert_eq!(sorted(&source), sorted(&first), "round {round}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}
