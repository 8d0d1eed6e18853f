//! Parsing YAML text into [`Resource`]s.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml::Value;

use crate::{
    DEFAULT_NAMESPACE, Manifests, Resource, ResourceId,
    istio::{
        Crd, GATEWAY_API_EXPERIMENTAL_VERSIONS, GATEWAY_API_VERSIONS, NETWORKING_VERSIONS,
        SECURITY_VERSIONS,
    },
};

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

/// Something in a document that loaded but was not understood: an unknown
/// field or kind. Reported, never a reason to reject the resource.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: document {document} ({resource}): {message}")]
pub struct LoadWarning {
    /// File (or other source) the document came from.
    pub source_name: String,
    /// 1-based position of the document in its file.
    pub document: usize,
    /// The resource.
    pub resource: ResourceId,
    /// What was not understood.
    pub message: String,
}

/// The outcome of loading a source: what loaded, and each document that did not.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Resources that loaded.
    pub manifests: Manifests,
    /// Documents that were rejected; the rest still loaded.
    pub errors: Vec<LoadError>,
    /// Unknown fields and kinds in documents that loaded.
    pub warnings: Vec<LoadWarning>,
}

impl Loaded {
    /// Appends everything `other` loaded, rejected and warned about.
    pub fn merge(&mut self, other: Loaded) {
        self.manifests.extend(other.manifests);
        self.errors.extend(other.errors);
        self.warnings.extend(other.warnings);
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
        errors: vec![LoadError {
            source_name: source_name.clone(),
            document: 0,
            resource: None,
            kind,
        }],
        ..Loaded::default()
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
        load_document(&mut loaded, source_name, document_no, value);
    }
    loaded
}

/// Loads one already-decoded document, e.g. an object read from the
/// Kubernetes API (`serde_json::Value`), through the same parser as
/// [`load_str`]. `source_name` names it in errors and warnings (the API
/// source uses `kubernetes:<kind>/<namespace>/<name>`); it is reported as
/// document 1 of that source.
pub fn load_value(source_name: &str, value: &serde_json::Value) -> Loaded {
    let mut loaded = Loaded::default();
    match serde_yaml::to_value(value) {
        Ok(value) => load_document(&mut loaded, source_name, 1, value),
        // serde_yaml holds every JSON value; handled rather than unwrapped.
        Err(err) => loaded.errors.push(LoadError {
            source_name: source_name.to_owned(),
            document: 1,
            resource: None,
            kind: LoadErrorKind::Yaml(err.to_string()),
        }),
    }
    loaded
}

/// Parses document `document_no` of `source_name` into `loaded`.
fn load_document(loaded: &mut Loaded, source_name: &str, document_no: usize, value: Value) {
    let mut unknown = Vec::new();
    match parse_resource(value, &mut unknown) {
        Ok((id, resource)) => {
            if let Resource::Other(_) = resource {
                unknown.push(format!(
                    "kind `{}` of `{}` is not supported; ignored",
                    id.kind, id.api_version
                ));
            }
            loaded
                .warnings
                .extend(unknown.into_iter().map(|message| LoadWarning {
                    source_name: source_name.to_owned(),
                    document: document_no,
                    resource: id.clone(),
                    message,
                }));
            loaded.manifests.sources.insert(id, source_name.to_owned());
            loaded.manifests.push(resource);
        }
        Err(failed) => {
            let (resource, kind) = *failed;
            loaded.errors.push(LoadError {
                source_name: source_name.to_owned(),
                document: document_no,
                resource,
                kind,
            });
        }
    }
}

type ParseError = Box<(Option<ResourceId>, LoadErrorKind)>;

/// Parses one document; unknown fields are appended to `unknown` as messages.
fn parse_resource(
    value: Value,
    unknown: &mut Vec<String>,
) -> Result<(ResourceId, Resource), ParseError> {
    let api_version = string_field(&value, &["apiVersion"])
        .ok_or_else(|| Box::new((None, LoadErrorKind::MissingField("apiVersion"))))?;
    let kind = string_field(&value, &["kind"])
        .ok_or_else(|| Box::new((None, LoadErrorKind::MissingField("kind"))))?;
    let name = string_field(&value, &["metadata", "name"]);
    let cluster_scoped = matches!(kind.as_str(), "Namespace" | "GatewayClass");
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
    let api = api_version.as_str();
    let networking = NETWORKING_VERSIONS.contains(&api);
    let security = SECURITY_VERSIONS.contains(&api);
    let gateway_api = GATEWAY_API_VERSIONS.contains(&api);
    let experimental = GATEWAY_API_EXPERIMENTAL_VERSIONS.contains(&api);
    macro_rules! parse {
        ($variant:ident) => {
            Resource::$variant(namespaced(typed(value, unknown), &namespace).map_err(with_id)?)
        };
    }
    let resource = match kind.as_str() {
        "Namespace" if api == "v1" => Resource::Namespace(typed(value, unknown).map_err(with_id)?),
        "Service" if api == "v1" => parse!(Service),
        "ServiceAccount" if api == "v1" => parse!(ServiceAccount),
        "Secret" if api == "v1" => parse!(Secret),
        "EndpointSlice" if api == "discovery.k8s.io/v1" => parse!(EndpointSlice),
        // Checked as the full Kubernetes type, kept slim (see `crate::pod`).
        "Pod" if api == "v1" => Resource::Pod(
            namespaced(
                typed::<k8s_openapi::api::core::v1::Pod>(value, unknown),
                &namespace,
            )
            .map(|pod| Box::new(crate::Pod::from(*pod)))
            .map_err(with_id)?,
        ),
        "Deployment" if api == "apps/v1" => parse!(Deployment),
        "VirtualService" if networking => parse!(VirtualService),
        "DestinationRule" if networking => parse!(DestinationRule),
        "Gateway" if networking => parse!(IstioGateway),
        "ServiceEntry" if networking => parse!(ServiceEntry),
        "AuthorizationPolicy" if security => parse!(AuthorizationPolicy),
        "PeerAuthentication" if security => parse!(PeerAuthentication),
        "Gateway" if gateway_api => parse!(KubeGateway),
        "HTTPRoute" if gateway_api => parse!(KubeHttpRoute),
        "GRPCRoute" if gateway_api => parse!(KubeGrpcRoute),
        "ReferenceGrant" if gateway_api => parse!(ReferenceGrant),
        "TCPRoute" if gateway_api || experimental => parse!(KubeTcpRoute),
        "TLSRoute" if gateway_api || experimental => parse!(KubeTlsRoute),
        _ => Resource::Other(id.clone()),
    };
    Ok((id, resource))
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
    k8s_openapi::api::core::v1::Secret,
    k8s_openapi::api::discovery::v1::EndpointSlice,
    k8s_openapi::api::core::v1::Pod,
    k8s_openapi::api::apps::v1::Deployment
);

impl<S> HasMetadata for Crd<S> {
    fn namespace_mut(&mut self) -> &mut Option<String> {
        &mut self.metadata.namespace
    }
}

fn namespaced<T: HasMetadata>(
    parsed: Result<Box<T>, LoadErrorKind>,
    namespace: &str,
) -> Result<Box<T>, LoadErrorKind> {
    let mut resource = parsed?;
    *resource.namespace_mut() = Some(namespace.to_owned());
    Ok(resource)
}

/// Deserialises `value` as `T`, naming the failing field's path on error
/// and appending a message per field `T` does not know to `unknown`.
fn typed<T: DeserializeOwned>(
    value: Value,
    unknown: &mut Vec<String>,
) -> Result<Box<T>, LoadErrorKind> {
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(value, &mut track);
    let result = serde_ignored::deserialize(tracked, |path| {
        unknown.push(format!("unknown field `{}` ignored", IgnoredPath(&path)));
    });
    result.map(Box::new).map_err(|err| LoadErrorKind::Field {
        path: FieldPath(&track.path()).to_string(),
        message: err.to_string(),
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

/// Renders an ignored field's path in the same style as [`FieldPath`]:
/// `spec.ports[0].nme`, without serde_ignored's `?` for each `Option` and
/// newtype on the way.
struct IgnoredPath<'a>(&'a serde_ignored::Path<'a>);

impl fmt::Display for IgnoredPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use serde_ignored::Path;
        /// Writes `path`; returns whether it wrote anything, so a key knows
        /// whether it needs a separating dot.
        fn write(path: &Path<'_>, f: &mut fmt::Formatter<'_>) -> Result<bool, fmt::Error> {
            match path {
                Path::Root => Ok(false),
                Path::Seq { parent, index } => {
                    write(parent, f)?;
                    write!(f, "[{index}]")?;
                    Ok(true)
                }
                Path::Map { parent, key } => {
                    if write(parent, f)? {
                        f.write_str(".")?;
                    }
                    f.write_str(key)?;
                    Ok(true)
                }
                Path::Some { parent }
                | Path::NewtypeStruct { parent }
                | Path::NewtypeVariant { parent } => write(parent, f),
            }
        }
        write(self.0, f).map(|_| ())
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
    fn unknown_kinds_are_kept_by_identity_with_a_warning() {
        let loaded = load_str(
            "z",
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: r}\nspec: {}\n",
        );
        assert!(loaded.errors.is_empty());
        assert_eq!(loaded.manifests.others[0].to_string(), "Widget default/r");
        assert_eq!(
            loaded.warnings[0].to_string(),
            "z: document 1 (Widget default/r): kind `Widget` of `example.com/v1` is not supported; ignored"
        );
    }

    #[test]
    fn unknown_fields_warn_without_rejecting() {
        let loaded = load_str(
            "w.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: shop}\nspec:\n  hosts: [r]\n  htp: []\n  http:\n  - route: [{destination: {host: r}}]\n    retrys: {}\n",
        );
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.manifests.virtual_services.len(), 1);
        let warnings: Vec<_> = loaded.warnings.iter().map(|w| w.message.as_str()).collect();
        assert_eq!(
            warnings,
            [
                "unknown field `spec.htp` ignored",
                "unknown field `spec.http[0].retrys` ignored"
            ]
        );
    }

    #[test]
    fn istio_kinds_in_every_api_version_load_with_their_namespace() {
        for version in ["v1alpha3", "v1beta1", "v1"] {
            let loaded = load_str(
                "v",
                &format!(
                    "apiVersion: networking.istio.io/{version}\nkind: DestinationRule\nmetadata: {{name: d}}\nspec: {{host: d, subsets: [{{name: v1, labels: {{version: v1}}}}]}}\n"
                ),
            );
            assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
            let rule = &loaded.manifests.destination_rules[0];
            assert_eq!(rule.metadata.namespace.as_deref(), Some("default"));
            assert_eq!(rule.spec.subsets[0].name, "v1");
        }
    }

    #[test]
    fn a_decoded_document_goes_through_the_same_parser() {
        let value = serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "r", "namespace": "shop", "resourceVersion": "7"},
            "spec": {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weight": "half"}]}]},
        });
        let loaded = load_value("kubernetes:VirtualService/shop/r", &value);
        assert!(loaded.manifests.virtual_services.is_empty());
        let err = loaded.errors[0].to_string();
        assert!(
            err.starts_with("kubernetes:VirtualService/shop/r: document 1 (VirtualService shop/r): field `spec.http[0].route[0].weight`"),
            "{err}"
        );
        let ok = load_value(
            "kubernetes:Namespace//a",
            &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}),
        );
        assert!(ok.errors.is_empty(), "{:?}", ok.errors);
        assert_eq!(ok.manifests.namespaces.len(), 1);
        assert_eq!(
            ok.manifests.sources.values().next().map(String::as_str),
            Some("kubernetes:Namespace//a")
        );
    }

    #[test]
    fn a_misspelt_enum_value_names_its_field() {
        let loaded = load_str(
            "e",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: a}\nspec: {action: ALLOWED}\n",
        );
        let err = loaded.errors[0].to_string();
        assert!(
            err.starts_with("e: document 1 (AuthorizationPolicy a/p): field `spec.action`"),
            "{err}"
        );
    }
}
