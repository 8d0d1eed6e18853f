//! An in-process fake of the Kubernetes API server, for testing code that
//! talks to the API through kube-rs (`watcher`, `reflector`, `Api`) on a
//! machine without a cluster.
//!
//! It speaks plain HTTP/1.1 on `127.0.0.1:<ephemeral port>` and serves the
//! kinds a test registers ([`FakeApiServer::serve`]) the way a real API
//! server serves a list-then-watch client:
//!
//! - **list** (`GET /api/v1/pods`, `GET /apis/<group>/<version>/namespaces/<ns>/<plural>`):
//!   a `<Kind>List` with `metadata.resourceVersion` (one counter for the
//!   whole server, as etcd's revision) and the items without
//!   `apiVersion`/`kind`, as the real server omits them;
//! - **watch** (`?watch=true&resourceVersion=N`): a chunked stream of
//!   newline-delimited JSON events (`ADDED`, `MODIFIED`, `DELETED`) for every
//!   change after `N`, kept open until the test ends it;
//! - **410 Gone**: [`FakeApiServer::expire_watches`] ends every open watch
//!   with an `ERROR` event of code 410, and answers later watches from an
//!   older version the same way, so a client has to list again. Changes made
//!   with [`FakeApiServer::apply_unannounced`] are seen only by that relist,
//!   as events lost to etcd compaction would be;
//! - **404** for any kind not registered: a CRD that is not installed;
//! - `fieldSelector` and `labelSelector` with `=`, `==` and `!=` terms (and
//!   bare label keys), e.g. `spec.nodeName=node0`;
//! - metadata-only reads (`Accept: application/json;as=PartialObjectMetadata…`,
//!   as kube-rs' `metadata_watcher` and `Controller::owns` send): lists,
//!   watches and gets answer `meta.k8s.io/v1` `PartialObjectMetadata`
//!   objects (`apiVersion`, `kind`, `metadata` only);
//! - `PUT` of one object (replace) with optimistic concurrency: a body whose
//!   `metadata.resourceVersion` is not the stored one gets 409 Conflict, as
//!   leader election's compare-and-swap on a `Lease` expects; `POST` of a
//!   name that exists gets 409 AlreadyExists;
//! - `GET` of one object, `POST` to a collection (create), `DELETE`, and
//!   per-path `POST` handlers ([`FakeApiServer::on_post`]) for
//!   request/response kinds such as `TokenReview`;
//! - `PATCH` of one object or of its `status` subresource, as server-side
//!   apply (`application/apply-patch+yaml`, creating the object if absent)
//!   or JSON merge patch (`application/merge-patch+json`). Both merge the
//!   patch into the stored object (maps recursively, anything else
//!   replaced; `null` removes a key); a patch that changes nothing changes
//!   no `resourceVersion` and announces nothing, as on a real server. A
//!   `status` patch changes only `status`. Every patch is recorded
//!   ([`FakeApiServer::patches`]) with its content type and field manager.
//!
//! Every request is recorded ([`FakeApiServer::requests`]) so a test can
//! check, for instance, that a client relisted after a 410.
//!
//! Not modelled: authentication, admission, optimistic concurrency on
//! patches (their `resourceVersion` is ignored), pagination (`limit` is
//! ignored; lists are one page), bookmarks, server-side apply's field
//! ownership (conflicts, removal of fields a manager stopped applying),
//! garbage collection by owner references, and protobuf.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};

/// A kind the fake serves: where its collection lives and how it is scoped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kind {
    /// `apiVersion`: `v1` for the core group, otherwise `<group>/<version>`.
    pub api_version: String,
    /// `kind`, e.g. `Pod`.
    pub kind: String,
    /// The collection's path segment, e.g. `pods`.
    pub plural: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
}

impl Kind {
    /// A kind served at `apiVersion`, with collection `plural`.
    pub fn new(api_version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            plural: plural.to_owned(),
            namespaced,
        }
    }

    /// `v1` Namespace.
    pub fn namespace() -> Self {
        Self::new("v1", "Namespace", "namespaces", false)
    }

    /// `v1` Pod.
    pub fn pod() -> Self {
        Self::new("v1", "Pod", "pods", true)
    }

    /// `v1` Service.
    pub fn service() -> Self {
        Self::new("v1", "Service", "services", true)
    }

    /// `v1` Secret.
    pub fn secret() -> Self {
        Self::new("v1", "Secret", "secrets", true)
    }

    /// `v1` ServiceAccount.
    pub fn service_account() -> Self {
        Self::new("v1", "ServiceAccount", "serviceaccounts", true)
    }

    /// `apps/v1` Deployment.
    pub fn deployment() -> Self {
        Self::new("apps/v1", "Deployment", "deployments", true)
    }

    /// `apps/v1` DaemonSet.
    pub fn daemon_set() -> Self {
        Self::new("apps/v1", "DaemonSet", "daemonsets", true)
    }

    /// `coordination.k8s.io/v1` Lease.
    pub fn lease() -> Self {
        Self::new("coordination.k8s.io/v1", "Lease", "leases", true)
    }

    /// `/api/v1` or `/apis/<group>/<version>`.
    fn prefix(&self) -> String {
        if self.api_version.contains('/') {
            format!("/apis/{}", self.api_version)
        } else {
            format!("/api/{}", self.api_version)
        }
    }
}

/// One `PATCH` request, as received.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchRequest {
    /// The request path, e.g.
    /// `/apis/apps/v1/namespaces/shop/deployments/waypoint`.
    pub path: String,
    /// `content-type`: `application/apply-patch+yaml` for server-side apply.
    pub content_type: String,
    /// The `fieldManager` query parameter, if given.
    pub field_manager: Option<String>,
    /// Whether `force=true` was given.
    pub force: bool,
    /// The patch body.
    pub body: Value,
}

/// Handler of `POST`s to one path: gets the request body, returns the status
/// code and the response body.
pub type PostHandler = Arc<dyn Fn(&Value) -> (u16, Value) + Send + Sync>;

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change, so open watches look again.
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    kinds: Vec<Kind>,
    /// (kind index, namespace, name) → object as stored.
    objects: BTreeMap<(usize, String, String), Value>,
    /// Announced changes, oldest first.
    history: Vec<Change>,
    /// The last resource version handed out.
    revision: u64,
    /// Watches from a version older than this get 410 Gone.
    oldest_watchable: u64,
    /// Bumped by [`FakeApiServer::expire_watches`]: open watches of an older
    /// epoch end with 410 Gone.
    epoch: u64,
    requests: Vec<String>,
    patches: Vec<PatchRequest>,
    posts: HashMap<String, PostHandler>,
    closed: bool,
}

struct Change {
    revision: u64,
    kind: usize,
    event: &'static str,
    object: Value,
}

type Body = BoxBody<Bytes, Infallible>;

impl FakeApiServer {
    /// Binds `127.0.0.1:0` and starts serving (no kinds yet).
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake API server");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changes: watch::channel(0).0,
        });
        let accept = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(handle(&shared, request).await) }
                        });
                        // A client going away mid-watch is not an error here.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube `Config` pointed at this server (no credentials).
    pub fn config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("URL of the fake API server"))
    }

    /// A kube client of this server.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("kube client for the fake API server")
    }

    /// Serves `kind` from now on (until then, its paths answer 404, as for
    /// a CRD that is not installed).
    pub fn serve(&self, kind: Kind) {
        let mut state = self.lock();
        if !state.kinds.contains(&kind) {
            state.kinds.push(kind);
        }
    }

    /// Creates or replaces `object` (its `apiVersion` and `kind` must be
    /// served) and tells open watches (`ADDED` or `MODIFIED`). Sets
    /// `metadata.resourceVersion`, and `uid`, `creationTimestamp` and (for
    /// namespaced kinds) `namespace: default` when missing. Returns the
    /// object as stored.
    pub fn apply(&self, object: Value) -> Value {
        self.shared.change(|state| state.apply(object, true))
    }

    /// As [`apply`](Self::apply), but no watch hears of it: only a client
    /// that lists again (after [`expire_watches`](Self::expire_watches))
    /// sees it.
    pub fn apply_unannounced(&self, object: Value) -> Value {
        self.shared.change(|state| state.apply(object, false))
    }

    /// Deletes an object and tells open watches (`DELETED`); returns whether
    /// it existed. `namespace` is ignored for cluster-scoped kinds.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        self.shared
            .change(|state| state.delete(api_version, kind, namespace, name, true))
    }

    /// As [`delete`](Self::delete), but no watch hears of it.
    pub fn delete_unannounced(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> bool {
        self.shared
            .change(|state| state.delete(api_version, kind, namespace, name, false))
    }

    /// Forgets the change history, as etcd compaction does: every open watch
    /// ends with an `ERROR` event of code 410 (Gone), and so does every later
    /// watch from a version older than the current one.
    pub fn expire_watches(&self) {
        self.shared.change(|state| {
            state.oldest_watchable = state.revision;
            state.epoch += 1;
            state.history.clear();
        });
    }

    /// Answers `POST`s to `path` (e.g.
    /// `/apis/authentication.k8s.io/v1/tokenreviews`) with `handler`.
    pub fn on_post(
        &self,
        path: &str,
        handler: impl Fn(&Value) -> (u16, Value) + Send + Sync + 'static,
    ) {
        self.lock().posts.insert(path.to_owned(), Arc::new(handler));
    }

    /// Every request so far, as `METHOD /path?query` with the query
    /// percent-decoded, e.g. `GET /api/v1/pods?fieldSelector=spec.nodeName=node0&watch=true…`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Every `PATCH` so far, oldest first.
    pub fn patches(&self) -> Vec<PatchRequest> {
        self.lock().patches.clone()
    }

    /// The object stored under `kind`/`namespace`/`name`, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.lock();
        let key = state.key(api_version, kind, namespace, name)?;
        state.objects.get(&key).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.change(|state| state.closed = true);
        self.accept.abort();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn change<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let result = f(&mut self.lock());
        self.changes.send_modify(|n| *n += 1);
        result
    }
}

impl State {
    fn kind_index(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.kinds
            .iter()
            .position(|k| k.api_version == api_version && k.kind == kind)
    }

    fn key(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<(usize, String, String)> {
        let index = self.kind_index(api_version, kind)?;
        let namespace = if self.kinds[index].namespaced {
            namespace
        } else {
            ""
        };
        Some((index, namespace.to_owned(), name.to_owned()))
    }

    fn apply(&mut self, mut object: Value, announce: bool) -> Value {
        let api_version = str_at(&object, "apiVersion").to_owned();
        let kind = str_at(&object, "kind").to_owned();
        let index = self
            .kind_index(&api_version, &kind)
            .unwrap_or_else(|| panic!("the fake API server does not serve {api_version} {kind}"));
        let namespaced = self.kinds[index].namespaced;
        self.revision += 1;
        let revision = self.revision;
        let meta = object
            .as_object_mut()
            .expect("an object")
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("metadata is an object");
        meta.insert("resourceVersion".into(), revision.to_string().into());
        meta.entry("uid")
            .or_insert_with(|| format!("uid-{kind}-{revision}").to_lowercase().into());
        meta.entry("creationTimestamp")
            .or_insert_with(|| "2026-01-01T00:00:00Z".into());
        if namespaced {
            meta.entry("namespace").or_insert_with(|| "default".into());
        } else {
            meta.remove("namespace");
        }
        let namespace = str_at(&object, "metadata.namespace").to_owned();
        let name = str_at(&object, "metadata.name").to_owned();
        let existed = self
            .objects
            .insert((index, namespace, name), object.clone())
            .is_some();
        if announce {
            self.history.push(Change {
                revision,
                kind: index,
                event: if existed { "MODIFIED" } else { "ADDED" },
                object: object.clone(),
            });
        }
        object
    }

    fn delete(
        &mut self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        announce: bool,
    ) -> bool {
        let Some(key) = self.key(api_version, kind, namespace, name) else {
            return false;
        };
        let Some(mut object) = self.objects.remove(&key) else {
            return false;
        };
        self.revision += 1;
        object["metadata"]["resourceVersion"] = self.revision.to_string().into();
        if announce {
            self.history.push(Change {
                revision: self.revision,
                kind: key.0,
                event: "DELETED",
                object,
            });
        }
        true
    }
}

/// What a request addressed.
struct Target {
    kind: usize,
    /// Set for `/namespaces/<ns>/<plural>…`.
    namespace: Option<String>,
    name: Option<String>,
    /// `status` for `…/<name>/status`.
    subresource: Option<String>,
}

fn route(state: &State, path: &str) -> Option<Target> {
    state.kinds.iter().enumerate().find_map(|(index, kind)| {
        let rest = path.strip_prefix(&kind.prefix())?.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let (namespace, plural, name, sub) = match segments.as_slice() {
            ["namespaces", ns, plural] if kind.namespaced => (Some(*ns), *plural, None, None),
            ["namespaces", ns, plural, name] if kind.namespaced => {
                (Some(*ns), *plural, Some(*name), None)
            }
            ["namespaces", ns, plural, name, "status"] if kind.namespaced => {
                (Some(*ns), *plural, Some(*name), Some("status"))
            }
            [plural] => (None, *plural, None, None),
            [plural, name] => (None, *plural, Some(*name), None),
            [plural, name, "status"] => (None, *plural, Some(*name), Some("status")),
            _ => return None,
        };
        (plural == kind.plural).then(|| Target {
            kind: index,
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
            subresource: sub.map(str::to_owned),
        })
    })
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let query = parse_query(request.uri().query().unwrap_or_default());
    let metadata_only = request
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("as=PartialObjectMetadata"));
    let post = {
        let mut state = shared.lock();
        let shown: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        state
            .requests
            .push(format!("{method} {path}?{}", shown.join("&")));
        state.posts.get(&path).cloned()
    };
    if method == Method::POST
        && let Some(handler) = post
    {
        let Some(body) = json_body(request).await else {
            return status(400, "BadRequest", "the body is not JSON");
        };
        let (code, response) = handler(&body);
        return json_response(code, &response);
    }
    let target = route(&shared.lock(), &path);
    let Some(target) = target else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if target.subresource.is_some() && method != Method::PATCH && method != Method::GET {
        return status(
            405,
            "MethodNotAllowed",
            "method not allowed on a subresource",
        );
    }
    match (method, &target.name) {
        (Method::PATCH, Some(name)) => {
            let Some(body) = json_body(request).await.filter(Value::is_object) else {
                return status(400, "BadRequest", "the body is not a JSON object");
            };
            let name = name.clone();
            patch(shared, &target, &name, &path, &content_type, &query, body)
        }
        (Method::GET, None)
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) =>
        {
            watch(shared, target, &query, metadata_only)
        }
        (Method::GET, None) => list(&shared.lock(), &target, &query, metadata_only),
        (Method::GET, Some(name)) => {
            let state = shared.lock();
            let key = (
                target.kind,
                target.namespace.clone().unwrap_or_default(),
                name.clone(),
            );
            match state.objects.get(&key) {
                Some(object) if metadata_only => json_response(200, &metadata_of(object)),
                Some(object) => json_response(200, object),
                None => not_found(&state.kinds[target.kind], name),
            }
        }
        (Method::POST, None) => {
            let Some(mut body) = json_body(request).await.filter(Value::is_object) else {
                return status(400, "BadRequest", "the body is not a JSON object");
            };
            let kind = shared.lock().kinds[target.kind].clone();
            for (field, want) in [("apiVersion", &kind.api_version), ("kind", &kind.kind)] {
                match body.get(field).and_then(Value::as_str) {
                    None => body[field] = want.clone().into(),
                    Some(given) if given != want => {
                        return status(
                            400,
                            "BadRequest",
                            &format!("{field} {given} does not belong in {}", kind.plural),
                        );
                    }
                    Some(_) => {}
                }
            }
            if let Some(ns) = &target.namespace {
                body["metadata"]["namespace"] = ns.clone().into();
            }
            let name = str_at(&body, "metadata.name").to_owned();
            let key = (
                target.kind,
                target.namespace.clone().unwrap_or_default(),
                name.clone(),
            );
            let mut state = shared.lock();
            if state.objects.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", kind.plural),
                );
            }
            let stored = state.apply(body, true);
            drop(state);
            shared.changes.send_modify(|n| *n += 1);
            json_response(201, &stored)
        }
        (Method::PUT, Some(name)) if target.subresource.is_none() => {
            let Some(mut body) = json_body(request).await.filter(Value::is_object) else {
                return status(400, "BadRequest", "the body is not a JSON object");
            };
            let mut state = shared.lock();
            let kind = state.kinds[target.kind].clone();
            let key = (
                target.kind,
                target.namespace.clone().unwrap_or_default(),
                name.clone(),
            );
            let Some(stored) = state.objects.get(&key) else {
                return not_found(&kind, name);
            };
            let given = str_at(&body, "metadata.resourceVersion");
            let current = str_at(stored, "metadata.resourceVersion");
            if !given.is_empty() && given != current {
                return status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        kind.plural
                    ),
                );
            }
            let uid = stored["metadata"]["uid"].clone();
            let created = stored["metadata"]["creationTimestamp"].clone();
            body["apiVersion"] = kind.api_version.clone().into();
            body["kind"] = kind.kind.clone().into();
            body["metadata"]["name"] = name.clone().into();
            body["metadata"]["uid"] = uid;
            body["metadata"]["creationTimestamp"] = created;
            if let Some(ns) = &target.namespace {
                body["metadata"]["namespace"] = ns.clone().into();
            }
            let stored = state.apply(body, true);
            drop(state);
            shared.changes.send_modify(|n| *n += 1);
            json_response(200, &stored)
        }
        (Method::DELETE, Some(name)) => {
            let kind = shared.lock().kinds[target.kind].clone();
            let ns = target.namespace.clone().unwrap_or_default();
            if shared.change(|state| state.delete(&kind.api_version, &kind.kind, &ns, name, true)) {
                json_response(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                )
            } else {
                not_found(&kind, name)
            }
        }
        _ => status(405, "MethodNotAllowed", "method not allowed"),
    }
}

/// `PATCH` of one object (or its `status`): server-side apply or merge
/// patch, both merged into the stored object.
fn patch(
    shared: &Arc<Shared>,
    target: &Target,
    name: &str,
    path: &str,
    content_type: &str,
    query: &BTreeMap<String, String>,
    body: Value,
) -> Response<Body> {
    let apply = content_type.starts_with("application/apply-patch+yaml");
    if !apply && !content_type.starts_with("application/merge-patch+json") {
        return status(
            415,
            "UnsupportedMediaType",
            &format!("the fake API server does not take {content_type:?} patches"),
        );
    }
    let mut state = shared.lock();
    state.patches.push(PatchRequest {
        path: path.to_owned(),
        content_type: content_type.to_owned(),
        field_manager: query.get("fieldManager").cloned(),
        force: query.get("force").map(String::as_str) == Some("true"),
        body: body.clone(),
    });
    if apply && !query.contains_key("fieldManager") {
        return status(422, "Invalid", "PATCH with apply requires a fieldManager");
    }
    let kind = state.kinds[target.kind].clone();
    let namespace = if kind.namespaced {
        target.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let key = (target.kind, namespace.clone(), name.to_owned());
    let existing = state.objects.get(&key).cloned();
    let status_only = target.subresource.is_some();
    let merged = match existing.clone() {
        Some(mut object) if status_only => {
            if let Some(new) = body.get("status") {
                merge(
                    object
                        .as_object_mut()
                        .expect("an object")
                        .entry("status")
                        .or_insert(json!({})),
                    new,
                );
            }
            object
        }
        Some(mut object) => {
            merge(&mut object, &body);
            object
        }
        None if apply && !status_only => {
            let mut object = body;
            object["apiVersion"] = kind.api_version.clone().into();
            object["kind"] = kind.kind.clone().into();
            object["metadata"]["name"] = name.into();
            if kind.namespaced {
                object["metadata"]["namespace"] = namespace.into();
            }
            object
        }
        None => return not_found(&kind, name),
    };
    if existing.as_ref() == Some(&merged) {
        return json_response(200, &merged);
    }
    let stored = state.apply(merged, true);
    drop(state);
    shared.changes.send_modify(|n| *n += 1);
    json_response(if existing.is_some() { 200 } else { 201 }, &stored)
}

/// JSON merge patch (RFC 7386): maps merge recursively, `null` removes.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(target), Some(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// Whether `object` is in the request's namespace and matches its selectors.
fn selected(object: &Value, namespace: Option<&str>, query: &BTreeMap<String, String>) -> bool {
    if let Some(ns) = namespace
        && str_at(object, "metadata.namespace") != ns
    {
        return false;
    }
    let fields = query
        .get("fieldSelector")
        .map(String::as_str)
        .unwrap_or_default();
    let labels = query
        .get("labelSelector")
        .map(String::as_str)
        .unwrap_or_default();
    terms(fields).all(|(path, op, value)| {
        let actual = str_at(object, path);
        match op {
            Op::Eq => actual == value,
            Op::Ne => actual != value,
            Op::Exists => !actual.is_empty(),
        }
    }) && terms(labels).all(|(key, op, value)| {
        let actual = object["metadata"]["labels"]
            .get(key)
            .and_then(Value::as_str);
        match op {
            Op::Eq => actual == Some(value),
            Op::Ne => actual != Some(value),
            Op::Exists => actual.is_some(),
        }
    })
}

enum Op {
    Eq,
    Ne,
    Exists,
}

/// `a=b,c!=d,e` → `(a, Eq, b), (c, Ne, d), (e, Exists, "")`.
fn terms(selector: &str) -> impl Iterator<Item = (&str, Op, &str)> {
    selector.split(',').filter(|t| !t.is_empty()).map(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            (k, Op::Ne, v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (k, Op::Eq, v)
        } else {
            (term, Op::Exists, "")
        }
    })
}

/// `object` as a `PartialObjectMetadata`: its metadata only.
fn metadata_of(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

fn list(
    state: &State,
    target: &Target,
    query: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Response<Body> {
    let kind = &state.kinds[target.kind];
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((index, _, _), object)| {
            *index == target.kind && selected(object, target.namespace.as_deref(), query)
        })
        .map(|(_, object)| {
            if metadata_only {
                return metadata_of(object);
            }
            let mut item = object.clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
            item
        })
        .collect();
    let (api_version, list_kind) = if metadata_only {
        (
            "meta.k8s.io/v1".to_owned(),
            "PartialObjectMetadataList".to_owned(),
        )
    } else {
        (kind.api_version.clone(), format!("{}List", kind.kind))
    };
    json_response(
        200,
        &json!({
            "apiVersion": api_version,
            "kind": list_kind,
            "metadata": {"resourceVersion": state.revision.to_string()},
            "items": items,
        }),
    )
}

fn watch(
    shared: &Arc<Shared>,
    target: Target,
    query: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let query = query.clone();
    let shared = shared.clone();
    let mut changes = shared.changes.subscribe();
    tokio::spawn(async move {
        let (epoch, expired) = {
            let state = shared.lock();
            (state.epoch, from < state.oldest_watchable)
        };
        if expired {
            let _ = tx.send(gone(from)).await;
            return;
        }
        let mut cursor = from;
        loop {
            changes.borrow_and_update();
            // An expired watch gets its 410 and ends.
            let (events, last): (Vec<Bytes>, bool) = {
                let state = shared.lock();
                if state.closed {
                    return;
                }
                if state.epoch != epoch {
                    (vec![gone(cursor)], true)
                } else {
                    let events = state
                        .history
                        .iter()
                        .filter(|c| {
                            c.revision > cursor
                                && c.kind == target.kind
                                && selected(&c.object, target.namespace.as_deref(), &query)
                        })
                        .map(|c| {
                            let object = if metadata_only {
                                metadata_of(&c.object)
                            } else {
                                c.object.clone()
                            };
                            line(&json!({"type": c.event, "object": object}))
                        })
                        .collect();
                    cursor = state.revision;
                    (events, false)
                }
            };
            for event in events {
                if tx.send(event).await.is_err() {
                    return; // the client went away
                }
            }
            if last || changes.changed().await.is_err() {
                return;
            }
        }
    });
    let body =
        StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .expect("response")
}

/// The `ERROR` event that tells a watcher to list again.
fn gone(from: u64) -> Bytes {
    line(&json!({
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {from}"),
            "reason": "Expired",
            "code": 410,
        },
    }))
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn not_found(kind: &Kind, name: &str) -> Response<Body> {
    status(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.plural),
    )
}

/// A `Status` failure, as the API server writes them.
fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }),
    )
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("response")
}

async fn json_body(request: Request<Incoming>) -> Option<Value> {
    let bytes = request.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&bytes).ok()
}

/// The string at dotted `path` (`metadata.name`), or `""`: the API server
/// compares missing fields as empty.
fn str_at<'a>(value: &'a Value, path: &str) -> &'a str {
    path.split('.')
        .try_fold(value, |v, key| v.get(key))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_query_decoding() {
        let pod = json!({"metadata": {"name": "a", "namespace": "x", "labels": {"app": "web"}}, "spec": {"nodeName": "n0"}});
        let q = parse_query("fieldSelector=spec.nodeName%3Dn0&labelSelector=app%3Dweb%2Cenv");
        assert!(!selected(&pod, None, &q));
        let q = parse_query(
            "fieldSelector=spec.nodeName%3Dn0%2Cmetadata.name%21%3Db&labelSelector=app%3D%3Dweb",
        );
        assert!(selected(&pod, Some("x"), &q));
        assert!(!selected(&pod, Some("y"), &q));
        assert_eq!(percent_decode("a%2"), "a%2");
    }

    #[test]
    fn merge_patches_maps_recursively_and_null_removes() {
        let mut object = json!({"metadata": {"name": "a", "labels": {"x": "1", "y": "2"}}, "spec": {"ports": [1, 2]}});
        merge(
            &mut object,
            &json!({"metadata": {"labels": {"y": null, "z": "3"}}, "spec": {"ports": [3]}}),
        );
        assert_eq!(
            object,
            json!({"metadata": {"name": "a", "labels": {"x": "1", "z": "3"}}, "spec": {"ports": [3]}})
        );
    }
}
