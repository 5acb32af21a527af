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
}

impl Document {
    fn parse(text: &str, location: String) -> Self {
        let mut read = manifest::ManifestRead::default();
        manifest::parse_document(text, &location, &mut read);
        Self {
            location,
            objects: shared(read.objects),
            rejected: read.rejected,
            problems: read.problems,
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
        }
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
        let left: Vec<Document>;
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
                left = previous.into_values().collect();
                documents
            }
            // Parsed whole; nothing to reuse.
            None => {
                let read = manifest::parse(&text, &source);
                let whole = Document {
                    location: String::new(),
                    objects: shared(read.objects),
                    rejected: read.rejected,
                    problems: read.problems,
                };
                left = std::mem::take(&mut self.documents).into_values().collect();
                fresh.push(0);
                vec![(0, whole)]
            }
        };
        for document in &left {
            self.occurrences.forget(document.ids());
        }
        for &index in &fresh {
            self.occurrences.count(documents[index].1.ids());
        }
        if self.occurrences.duplicated == 0 {
            for id in left.iter().flat_map(Document::ids) {
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
        })
    }
}

impl ObjectSource for ManifestSource {
    fn snapshot(&mut self) -> Option<Snapshot> {
        if (self.changed() || std::mem::take(&mut self.force))
            && let Err(err) = self.reload()
        {
            error!(
                "cannot read {}: {err}; keeping what is programmed",
                self.path.display()
            );
            return None;
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
            std::fs::write(&path, documents.join("---\n")).unwrap();
            source.force_reread();
            source.reload().unwrap();
            let mut first = ManifestSource::new(&path);
            first.reload().unwrap();
            assert_eq!(sorted(&source), sorted(&first), "round {round}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}
