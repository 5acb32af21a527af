//! Reads Kubernetes objects from multi-document YAML (standalone mode, tests, the demo).
//!
//! Each document is read on its own: one that is not YAML-valid Kubernetes, or that fails
//! validation, is reported by document number and, where it can be identified, by kind and name;
//! the other documents are unaffected. Kinds other than Service and EndpointSlice (Deployments,
//! Pods, ...) are skipped, so a whole application manifest can be given: they are counted (the
//! agent names each skipped kind once), and a kind that looks like a misspelt Service or
//! EndpointSlice is a warning. `kind: List` is unpacked; an empty List says the manifest is meant
//! to hold no Service (see [`ManifestRead::declares_empty`]).

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::model::{
    self, Kind, Object, ObjectRef, Problem, Severity, validate_service, validate_slice,
};

/// What one read of a manifest produced.
#[derive(Debug, Default)]
pub struct ManifestRead {
    pub objects: Vec<Object>,
    pub problems: Vec<Problem>,
    /// Objects that were identified but rejected: a caller keeps their last good version.
    pub rejected: Vec<ObjectRef>,
    /// Objects of kinds lb does not read, by kind.
    pub skipped_kinds: std::collections::BTreeMap<String, usize>,
    /// A `kind: List` with no items was read: the manifest holding nothing is intended (a
    /// file that merely parses to nothing is taken for a mistake and changes nothing).
    pub declares_empty: bool,
}

impl ManifestRead {
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }
}

/// Parses every document of `text`; `source` names the file in messages.
pub fn parse(text: &str, source: &str) -> ManifestRead {
    let mut read = ManifestRead::default();
    match split_documents(text) {
        Some(documents) => {
            for (index, document) in documents.into_iter().enumerate() {
                parse_document(document, &document_location(source, index), &mut read);
            }
        }
        None => parse_stream(text, source, &mut read),
    }
    read
}

/// How problems in the `index`th document (from 0) of `source` are located.
pub fn document_location(source: &str, index: usize) -> String {
    format!("{source} document {}", index + 1)
}

/// Reads one document (as split by [`split_documents`]) into `read`.
pub fn parse_document(text: &str, location: &str, read: &mut ManifestRead) {
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        match Value::deserialize(document) {
            Ok(value) => read_value(value, location, read),
            Err(err) => {
                read.problems
                    .push(problem(None, location, "", format!("invalid YAML: {err}")));
                break;
            }
        }
    }
}

/// The documents of a YAML stream, split at its `---` lines, so each can be parsed (and
/// cached) on its own and a syntax error in one leaves the others readable. `None` when the
/// text uses what this split does not follow (directives, `...`, content on a `---` line): the
/// caller then parses the stream whole. A `---` at the start of a line always starts a document
/// in YAML, even inside what would otherwise be a block scalar, so the split is exact.
pub fn split_documents(text: &str) -> Option<Vec<&str>> {
    let at_line_start =
        |marker: &str| text.starts_with(marker) || text.contains(&format!("\n{marker}"));
    if at_line_start("%") || at_line_start("...") {
        return None;
    }
    // Whether a chunk holds anything but blank lines and comments.
    let has_content = |chunk: &str| {
        chunk.lines().any(|line| {
            let line = line.trim_start();
            !line.is_empty() && !line.starts_with('#')
        })
    };
    let mut documents = Vec::new();
    let mut start = 0;
    let markers = (text.match_indices("---").map(|(at, _)| at))
        .filter(|&at| at == 0 || text.as_bytes()[at - 1] == b'\n');
    for at in markers {
        let line_end = text[at..].find('\n').map_or(text.len(), |n| at + n + 1);
        let rest = text[at + 3..line_end].trim();
        if !rest.is_empty() && !rest.starts_with('#') {
            return None;
        }
        // Only comments before the first marker are no document.
        let chunk = &text[start..at];
        if !documents.is_empty() || has_content(chunk) {
            documents.push(chunk);
        }
        start = line_end;
    }
    let last = &text[start..];
    if !documents.is_empty() || has_content(last) {
        documents.push(last);
    }
    Some(documents)
}

/// The whole stream through the YAML parser's own document split: after a syntax error later
/// documents cannot be told apart reliably, so reading stops there.
fn parse_stream(text: &str, source: &str, read: &mut ManifestRead) {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let location = document_location(source, index);
        match Value::deserialize(document) {
            Ok(value) => read_value(value, &location, read),
            Err(err) => {
                read.problems
                    .push(problem(None, &location, "", format!("invalid YAML: {err}")));
                break;
            }
        }
    }
}

fn read_value(value: Value, location: &str, read: &mut ManifestRead) {
    if value.is_null() {
        return; // an empty document, e.g. a trailing `---`
    }
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    match (kind.as_str(), api_version.as_str()) {
        ("List", _) | ("ServiceList", _) | ("EndpointSliceList", _) => {
            let items = value.get("items").and_then(Value::as_sequence).cloned().unwrap_or_default();
            read.declares_empty |= items.is_empty();
            for (i, item) in items.into_iter().enumerate() {
                read_value(item, &format!("{location} items[{i}]"), read);
            }
        }
        ("Service", "v1") => {
            let id = identify(Kind::Service, &value);
            match from_value::<Service>(value) {
                Ok(svc) => absorb(validate_service(&svc, location), read),
                Err(err) => reject(id, location, err, read),
            }
        }
        ("EndpointSlice", "discovery.k8s.io/v1") => {
            let id = identify(Kind::EndpointSlice, &value);
            match from_value::<EndpointSlice>(value) {
                Ok(slice) => absorb(validate_slice(&slice, location), read),
                Err(err) => reject(id, location, err, read),
            }
        }
        ("Service", _) | ("EndpointSlice", _) => read.problems.push(problem(
            None,
            location,
            "apiVersion",
            format!("{kind} with apiVersion {api_version:?} is not supported (use v1 / discovery.k8s.io/v1)"),
        )),
        ("", _) => read.problems.push(problem(None, location, "kind", "not a Kubernetes object (no kind)")),
        _ => match misspelt(&kind) {
            Some(meant) => read.problems.push(Problem {
                severity: Severity::Warning,
                ..problem(
                    identify(Kind::Service, &value).filter(|_| meant == "Service"),
                    location,
                    "kind",
                    format!("kind {kind:?} is not one lb reads; did you mean {meant}? Skipped"),
                )
            }),
            // Another kind of object (a Deployment...): not ours.
            None => *read.skipped_kinds.entry(kind).or_default() += 1,
        },
    }
}

/// The kind lb reads that `kind` looks like a misspelling of: the same but for case, or at most
/// two letters added, removed or changed.
fn misspelt(kind: &str) -> Option<&'static str> {
    ["Service", "EndpointSlice"].into_iter().find(|known| {
        let (a, b): (Vec<char>, Vec<char>) = (
            kind.to_lowercase().chars().collect(),
            known.to_lowercase().chars().collect(),
        );
        edit_distance(&a, &b) <= 2
    })
}

/// Levenshtein distance.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Deserializes with the path to a failing field, e.g. `spec.ports[0].port: invalid type`.
fn from_value<T: serde::de::DeserializeOwned>(
    value: Value,
) -> Result<T, serde_path_to_error::Error<serde_yaml_ng::Error>> {
    serde_path_to_error::deserialize(value)
}

/// Best-effort identity of an object that may not deserialize, so errors can name it.
fn identify(kind: Kind, value: &Value) -> Option<ObjectRef> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_owned();
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    Some(ObjectRef {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    })
}

fn absorb(validated: model::Validated, read: &mut ManifestRead) {
    if validated.object.is_none()
        && let Some(id) = validated.problems.iter().find_map(|p| p.object.clone())
    {
        read.rejected.push(id);
    }
    read.objects.extend(validated.object);
    read.problems.extend(validated.problems);
}

fn reject(
    id: Option<ObjectRef>,
    location: &str,
    err: serde_path_to_error::Error<serde_yaml_ng::Error>,
    read: &mut ManifestRead,
) {
    let field = err.path().to_string();
    let message = err.into_inner().to_string();
    read.problems
        .push(problem(id.clone(), location, &field, message));
    read.rejected.extend(id);
}

fn problem(
    object: Option<ObjectRef>,
    location: &str,
    field: &str,
    message: impl Into<String>,
) -> Problem {
    Problem {
        severity: Severity::Error,
        object,
        location: location.to_owned(),
        field: field.to_owned(),
        message: message.into(),
    }
}
