//! Parsing YAML text into [`Resource`]s.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml::Value;

use crate::{DEFAULT_NAMESPACE, Manifests, Resource, ResourceId};

/// Largest manifest file accepted; bigger ones are refused unread.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// A document that could not be loaded, with where it was.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: document {document}{resource}: {kind}", resource = .resource.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
pub struct LoadError {
    /// File (or other source) the document came from.
    pub source_name: String,
    /// 1-based position of the document in its file.
    pub document: usize,
    /// The resource, when its kind and name could be read.
    pub resource: Option<ResourceId>,
    /// What went wrong.
    pub kind: LoadErrorKind,
}

/// Why a document could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadErrorKind {
    /// The file could not be read.
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("file is {0} bytes, larger than the {MAX_FILE_BYTES}-byte limit")]
    TooLarge(u64),
    /// Not valid YAML.
    #[error("invalid YAML: {0}")]
    Yaml(String),
    /// A top-level field every resource needs is missing or not a string.
    #[error("field `{0}` is missing or not a string")]
    MissingField(&'static str),
    /// A field has the wrong shape for the kind.
    #[error("field `{path}`: {message}")]
    Field {
        /// Dotted path to the field, e.g. `spec.ports[0].port`.
        path: String,
        /// What the decoder said.
        message: String,
    },
}

/// The outcome of loading a source: what loaded, and each document that did not.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Resources that loaded.
    pub manifests: Manifests,
    /// Documents that were rejected; the rest still loaded.
    pub errors: Vec<LoadError>,
}

impl Loaded {
    fn merge(&mut self, other: Loaded) {
        self.manifests.extend(other.manifests);
        self.errors.extend(other.errors);
    }
}

/// Loads every `.yaml`/`.yml` file below `dir`, in path order.
pub fn load_dir(dir: &Path) -> Loaded {
    let mut files = Vec::new();
    let mut loaded = Loaded::default();
    if let Err(err) = collect_yaml(dir, &mut files) {
        loaded.errors.push(io_error(dir, err));
    }
    files.sort();
    for file in files {
        loaded.merge(load_file(&file));
    }
    loaded
}

/// Loads one file.
pub fn load_file(path: &Path) -> Loaded {
    let source_name = path.display().to_string();
    let fail = |kind| Loaded {
        manifests: Manifests::default(),
        errors: vec![LoadError {
            source_name: source_name.clone(),
            document: 0,
            resource: None,
            kind,
        }],
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() > MAX_FILE_BYTES => {
            return fail(LoadErrorKind::TooLarge(meta.len()));
        }
        Ok(_) => {}
        Err(err) => return fail(err.into()),
    }
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&source_name, &text),
        Err(err) => fail(err.into()),
    }
}

/// Loads YAML text; `source_name` names it in errors.
pub fn load_str(source_name: &str, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document_no = index + 1;
        let error = |resource, kind| LoadError {
            source_name: source_name.to_owned(),
            document: document_no,
            resource,
            kind,
        };
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(value) => value,
            Err(err) => {
                // A syntax error ends the stream: nothing after it can be trusted.
                loaded
                    .errors
                    .push(error(None, LoadErrorKind::Yaml(err.to_string())));
                break;
            }
        };
        match parse_resource(value) {
            Ok(resource) => loaded.manifests.push(resource),
            Err(failed) => {
                let (resource, kind) = *failed;
                loaded.errors.push(error(resource, kind));
            }
        }
    }
    loaded
}

type ParseError = Box<(Option<ResourceId>, LoadErrorKind)>;

fn parse_resource(value: Value) -> Result<Resource, ParseError> {
    let api_version = string_field(&value, &["apiVersion"])
        .ok_or_else(|| Box::new((None, LoadErrorKind::MissingField("apiVersion"))))?;
    let kind = string_field(&value, &["kind"])
        .ok_or_else(|| Box::new((None, LoadErrorKind::MissingField("kind"))))?;
    let name = string_field(&value, &["metadata", "name"]);
    let cluster_scoped = kind == "Namespace";
    let namespace = match string_field(&value, &["metadata", "namespace"]) {
        Some(ns) => ns,
        None if cluster_scoped => String::new(),
        None => DEFAULT_NAMESPACE.to_owned(),
    };
    let id = ResourceId {
        api_version: api_version.clone(),
        kind: kind.clone(),
        namespace: namespace.clone(),
        name: name.clone().unwrap_or_default(),
    };
    if name.is_none() {
        return Err(Box::new((
            Some(id),
            LoadErrorKind::MissingField("metadata.name"),
        )));
    }
    let with_id = |kind| Box::new((Some(id.clone()), kind));
    let resource = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Resource::Namespace(typed(value).map_err(with_id)?),
        ("v1", "Service") => {
            Resource::Service(namespaced(typed(value), &namespace).map_err(with_id)?)
        }
        ("v1", "ServiceAccount") => {
            Resource::ServiceAccount(namespaced(typed(value), &namespace).map_err(with_id)?)
        }
        ("v1", "Pod") => Resource::Pod(namespaced(typed(value), &namespace).map_err(with_id)?),
        ("apps/v1", "Deployment") => {
            Resource::Deployment(namespaced(typed(value), &namespace).map_err(with_id)?)
        }
        _ => Resource::Other(id),
    };
    Ok(resource)
}

/// Types whose `metadata.namespace` we default.
trait HasMetadata {
    fn namespace_mut(&mut self) -> &mut Option<String>;
}

macro_rules! has_metadata {
    ($($ty:ty),*) => {$(
        impl HasMetadata for $ty {
            fn namespace_mut(&mut self) -> &mut Option<String> {
                &mut self.metadata.namespace
            }
        }
    )*};
}

has_metadata!(
    k8s_openapi::api::core::v1::Service,
    k8s_openapi::api::core::v1::ServiceAccount,
    k8s_openapi::api::core::v1::Pod,
    k8s_openapi::api::apps::v1::Deployment
);

fn namespaced<T: HasMetadata>(
    parsed: Result<Box<T>, LoadErrorKind>,
    namespace: &str,
) -> Result<Box<T>, LoadErrorKind> {
    let mut resource = parsed?;
    *resource.namespace_mut() = Some(namespace.to_owned());
    Ok(resource)
}

fn typed<T: DeserializeOwned>(value: Value) -> Result<Box<T>, LoadErrorKind> {
    serde_path_to_error::deserialize(value)
        .map(Box::new)
        .map_err(|err| LoadErrorKind::Field {
            path: FieldPath(err.path()).to_string(),
            message: err.into_inner().to_string(),
        })
}

/// Renders a serde path as `spec.ports[0].port`.
struct FieldPath<'a>(&'a serde_path_to_error::Path);

impl fmt::Display for FieldPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use serde_path_to_error::Segment;
        let mut first = true;
        for segment in self.0.iter() {
            match segment {
                Segment::Seq { index } => write!(f, "[{index}]")?,
                Segment::Map { key } | Segment::Enum { variant: key } => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(key)?;
                }
                Segment::Unknown => f.write_str("?")?,
            }
            first = false;
        }
        Ok(())
    }
}

fn string_field(value: &Value, path: &[&str]) -> Option<String> {
    let mut current = value;
    for key in path {
        current = current.get(*key)?;
    }
    current.as_str().map(str::to_owned)
}

fn collect_yaml(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_yaml(&path, files)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(path);
        }
    }
    Ok(())
}

fn io_error(path: &Path, err: std::io::Error) -> LoadError {
    LoadError {
        source_name: path.display().to_string(),
        document: 0,
        resource: None,
        kind: err.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_documents_and_defaults_namespace() {
        let loaded = load_str(
            "t.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ns1, labels: {istio.io/dataplane-mode: ambient}}\n",
        );
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.manifests.services.len(), 1);
        assert_eq!(
            loaded.manifests.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
        assert_eq!(
            loaded.manifests.namespaces[0].metadata.name.as_deref(),
            Some("ns1")
        );
    }

    #[test]
    fn bad_field_names_file_resource_and_path_and_keeps_the_rest() {
        let loaded = load_str(
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: eighty}]}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: ok}\n",
        );
        assert_eq!(loaded.manifests.service_accounts.len(), 1);
        let err = loaded.errors.first().expect("one error").to_string();
        assert!(
            err.starts_with("bad.yaml: document 1 (Service shop/web): field `spec.ports[0].port`"),
            "{err}"
        );
    }

    #[test]
    fn missing_kind_and_name_are_reported() {
        let loaded = load_str(
            "x",
            "apiVersion: v1\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {}\n",
        );
        let errs: Vec<_> = loaded.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errs,
            [
                "x: document 1: field `kind` is missing or not a string",
                "x: document 2 (Pod default/): field `metadata.name` is missing or not a string"
            ]
        );
    }

    #[test]
    fn invalid_yaml_is_an_error_not_a_panic() {
        let loaded = load_str("y", "apiVersion: v1\nkind: [unclosed\n");
        assert_eq!(loaded.errors.len(), 1);
        assert!(matches!(loaded.errors[0].kind, LoadErrorKind::Yaml(_)));
    }

    #[test]
    fn unknown_kinds_are_kept_by_identity() {
        let loaded = load_str(
            "z",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec: {}\n",
        );
        assert_eq!(
            loaded.manifests.others[0].to_string(),
            "VirtualService default/r"
        );
    }
}
