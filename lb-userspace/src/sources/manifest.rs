//! A manifest file as a source of objects, re-read when it changes (or on SIGHUP).

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use tracing::error;

use super::{LastGood, ObjectSource, Snapshot};
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
    objects: LastGood,
    /// Re-read on the next snapshot even if the file looks unchanged.
    force: bool,
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
            objects: LastGood::default(),
            force: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.objects().map(|o| &**o)
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

    /// Reads the file again. On an I/O error nothing changes and the error is returned.
    pub fn reload(&mut self) -> io::Result<Reload> {
        let fingerprint = self.fingerprint()?;
        let text = std::fs::read_to_string(&self.path)?;
        self.seen = Some(fingerprint);
        let read = manifest::parse(&text, &self.path.display().to_string());
        let mut verdicts: BTreeMap<ObjectRef, Option<Arc<Object>>> = read
            .objects
            .into_iter()
            .map(|o| (o.id().clone(), Some(Arc::new(o))))
            .collect();
        for id in read.rejected {
            // A valid duplicate of the same object may also have been given: it wins.
            verdicts.entry(id).or_insert(None);
        }
        let kept_last_good = self.objects.update(verdicts.into_iter().collect());
        Ok(Reload {
            problems: read.problems,
            kept_last_good,
        })
    }
}

impl ObjectSource for ManifestSource {
    fn snapshot(&mut self) -> Option<Snapshot> {
        if !self.changed() && !std::mem::take(&mut self.force) {
            // Only something else changed (node addresses): the objects are the same.
            return Some(Snapshot {
                objects: self.objects.to_vec(),
                ..Snapshot::default()
            });
        }
        match self.reload() {
            Ok(reload) => Some(Snapshot {
                objects: self.objects.to_vec(),
                problems: reload.problems,
                kept_last_good: reload.kept_last_good,
                node_zone: None,
            }),
            Err(err) => {
                error!(
                    "cannot read {}: {err}; keeping what is programmed",
                    self.path.display()
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const OTHER: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: t}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";

    fn names(source: &ManifestSource) -> Vec<String> {
        source.objects().map(|o| o.id().name.clone()).collect()
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
        assert_eq!(reload.kept_last_good[0].name, "web");
        assert!(
            reload
                .problems
                .iter()
                .any(|p| p.field == "spec.clusterIP[0]")
        );
        assert_eq!(names(&source), ["api", "web"]);
        let Some(Object::Service(web)) = source.objects().find(|o| o.id().name == "web") else {
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
}
