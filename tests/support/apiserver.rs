//! A small in-process Kubernetes API server on a loopback port, enough for a real
//! kube-runtime `Controller`: list and watch (with resourceVersion), get, create, replace,
//! merge / strategic / JSON / apply patches (with server-side-apply conflicts and field
//! removal), the status subresource, label and field selectors, finalizers (a DELETE only
//! sets `deletionTimestamp` until the last one is removed), garbage collection of owned
//! objects (foreground or background), Secrets, events.k8s.io Events and coordination Leases.
//!
//! It is as hostile as a real apiserver where a controller can trip:
//! - `metadata.uid` and `metadata.resourceVersion` in a PUT or PATCH body are preconditions
//!   (409 `Conflict` when they differ from the stored object);
//! - a server-side apply removes the fields its manager set before and now omits;
//! - BrazeExports go through admission built from the CRD's own `openAPIV3Schema`: pruning,
//!   defaulting, validation (422 `Invalid` in the apiserver's words, with ratcheting of
//!   unchanged values) and the CEL rules (`x-kubernetes-validations`, evaluated by kube's
//!   `cel` feature); a PUT of a BrazeExport must carry a resourceVersion; strategic merge
//!   patches of BrazeExports are refused (415), as for every custom resource;
//! - knobs: [`FakeApiServer::set_watch_lag`] (a busy watch cache),
//!   [`FakeApiServer::expire_watches`] (410 Gone, forcing a relist),
//!   [`FakeApiServer::partitionable_client`] (a network partition for one client),
//!   [`FakeApiServer::client_with_rules`] (a client held to RBAC rules: 403 otherwise),
//!   [`FakeApiServer::set_crd`] (another CRD version) and [`FakeApiServer::put_unchecked`].

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use kube::core::cel::{CompiledSchema, ErrorKind, ValidationErrors, Validator, compile_schema};
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

/// (resource, namespace, name); resource is `group/version/plural` (`v1/secrets` for core).
pub type Key = (String, String, String);

/// The BrazeExport resource path.
pub const EXPORTS: &str = "looker-braze.dev/v1alpha1/brazeexports";
/// Core Secrets.
pub const SECRETS: &str = "v1/secrets";
/// events.k8s.io Events.
pub const EVENTS: &str = "events.k8s.io/v1/events";
/// Leases.
pub const LEASES: &str = "coordination.k8s.io/v1/leases";

/// The field manager the test-side helpers ([`FakeApiServer::put`], [`FakeApiServer::patch`])
/// write as.
pub const TEST_MANAGER: &str = "test";

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
    /// When watchers may see it (the write's time plus the watch lag then in force).
    due: Instant,
}

/// One write request (POST, PUT or PATCH) as the server received it, answered or refused.
#[derive(Clone, Debug)]
pub struct Write {
    /// `POST`, `PUT` or `PATCH`.
    pub method: String,
    /// `group/version/plural`, like [`EXPORTS`].
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// True for a write to the `/status` subresource.
    pub status: bool,
    /// The request's `Content-Type`.
    pub content_type: String,
    /// The raw query string (`fieldManager=...&force=true`).
    pub query: String,
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
    /// The `force` query parameter.
    pub force: bool,
    /// The request body.
    pub body: Value,
}

/// A write the server refused: the `Status` it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub code: u16,
    pub reason: String,
    pub message: String,
    /// `details` of the `Status` (with `causes` for a 422).
    details: Option<Box<Value>>,
}

impl Rejection {
    fn new(code: u16, reason: &str, message: String) -> Self {
        Self {
            code,
            reason: reason.to_owned(),
            message,
            details: None,
        }
    }

    /// The whole `Status` object the server answered.
    pub fn status(&self) -> Value {
        let mut status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code});
        if let Some(d) = &self.details {
            status["details"] = (**d).clone();
        }
        status
    }

    fn response(&self) -> Response {
        (
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "application/json")],
            self.status().to_string(),
        )
            .into_response()
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

/// Who set a field, and how: by server-side apply or by another write (an update).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Owner {
    manager: String,
    apply: bool,
}

impl Owner {
    fn new(manager: &str, apply: bool) -> Self {
        Self {
            manager: manager.to_owned(),
            apply,
        }
    }
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Field path (`/spec/braze/batchSize`; lists are atomic) -> its manager.
    owners: HashMap<Key, HashMap<String, Owner>>,
    log: Vec<Change>,
    requests: Vec<String>,
    lists: HashMap<String, usize>,
    writes: Vec<Write>,
    watch_lag: Duration,
    /// The resourceVersion of the last `expire_watches` (0: never).
    expired_at: u64,
    crd: Option<Arc<Crd>>,
    /// Benchmarks: skip schema admission and write records.
    no_admission: bool,
    /// Requests refused by RBAC.
    denied: Vec<String>,
}

struct ApiState {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    /// Bumped by `expire_watches`: every open watch ends with 410 Gone.
    expiry: watch::Sender<u64>,
}

impl ApiState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake API server.
pub struct FakeApiServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<ApiState>,
    task: tokio::task::JoinHandle<()>,
    listeners: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        for t in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            t.abort();
        }
    }
}

/// A network partition between one client (from [`FakeApiServer::partitionable_client`]) and
/// the server.
pub struct Partition {
    cut: watch::Sender<bool>,
}

impl Partition {
    /// From now on the client's requests get no answer (they wait, as packets would, and are
    /// served if the partition heals before the client gives up), and its open responses,
    /// watch streams included, go silent: no events, no end.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Restores the connection: waiting requests are served and held watch events flow.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Whether the partition is in force.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

fn kind_of(resource: &str) -> &'static str {
    match resource.rsplit('/').next().unwrap_or_default() {
        "brazeexports" => "BrazeExport",
        "secrets" => "Secret",
        "events" => "Event",
        "leases" => "Lease",
        _ => "Unknown",
    }
}

fn api_version_of(resource: &str) -> String {
    resource
        .rsplit_once('/')
        .map(|(gv, _)| gv.to_owned())
        .unwrap_or_default()
}

/// (group, plural) of a resource path; the group is empty for core resources.
fn group_plural(resource: &str) -> (String, String) {
    let parts: Vec<&str> = resource.split('/').collect();
    match parts.as_slice() {
        [group, _, plural] => ((*group).to_owned(), (*plural).to_owned()),
        [_, plural] => (String::new(), (*plural).to_owned()),
        _ => (String::new(), resource.to_owned()),
    }
}

/// `brazeexports.looker-braze.dev`, `secrets`: how the apiserver names a resource in errors.
fn qualified_resource(resource: &str) -> String {
    match group_plural(resource) {
        (g, p) if g.is_empty() => p,
        (g, p) => format!("{p}.{g}"),
    }
}

fn status_error(code: u16, reason: &str, message: String) -> Response {
    Rejection::new(code, reason, message).response()
}

fn ok_json(v: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Field paths (JSON pointers) of every leaf: lists and empty objects are leaves.
fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                leaves(&format!("{prefix}/{}", escape_pointer(k)), v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn unescape_pointer(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Removes the value at a JSON pointer, if any.
fn remove_pointer(v: &mut Value, pointer: &str) -> Option<Value> {
    let (parent, last) = pointer.rsplit_once('/')?;
    let last = unescape_pointer(last);
    match v.pointer_mut(parent)? {
        Value::Object(m) => m.remove(&last),
        Value::Array(a) => {
            let i: usize = last.parse().ok()?;
            (i < a.len()).then(|| a.remove(i))
        }
        _ => None,
    }
}

/// Whether `path` is `prefix` or below it.
fn under(path: &str, prefix: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn selector_matches(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => {
                labels.get(k.trim_end_matches('=')).and_then(Value::as_str)
                    == Some(v.trim_start_matches('='))
            }
            None => labels.get(term).is_some(),
        })
}

/// The field selectors a real apiserver supports on custom resources.
fn field_path(key: &str) -> Option<&'static str> {
    match key {
        "metadata.name" => Some("/metadata/name"),
        "metadata.namespace" => Some("/metadata/namespace"),
        _ => None,
    }
}

/// Why a field selector is refused (the apiserver answers 400), if it is.
fn field_selector_error(selector: &str) -> Option<String> {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.split_once('=')
                .map_or(t, |(k, _)| k.trim_end_matches('!'))
        })
        .find(|key| field_path(key).is_none())
        .map(|key| format!("field label not supported: {key}"))
}

/// `metadata.name=x`, `metadata.name==x` and `metadata.name!=x` terms, all of which must hold.
fn fields_match(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (key, want, equal) = match term.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => match term.split_once('=') {
                Some((k, v)) => (k, v.trim_start_matches('='), true),
                None => return false,
            },
        };
        let value = field_path(key).and_then(|p| object.pointer(p)?.as_str());
        (value == Some(want)) == equal
    })
}

/// Routes requests to the shared state; `gate` is set on a partitionable client's listener,
/// `rules` on a client held to RBAC rules.
#[derive(Clone)]
struct Conn {
    state: Arc<ApiState>,
    gate: Option<watch::Receiver<bool>>,
    rules: Option<Arc<Vec<Rule>>>,
}

/// One RBAC policy rule (as a Role's `rules` holds it).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// API groups (`""` is core).
    #[serde(default)]
    pub api_groups: Vec<String>,
    /// Resources, `plural` or `plural/subresource`.
    #[serde(default)]
    pub resources: Vec<String>,
    /// Verbs: get, list, watch, create, update, patch, delete, deletecollection.
    #[serde(default)]
    pub verbs: Vec<String>,
    /// Names the rule is limited to (empty: any).
    #[serde(default)]
    pub resource_names: Vec<String>,
}

impl Rule {
    fn allows(&self, group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == v || x == "*");
        any(&self.api_groups, group)
            && any(&self.resources, resource)
            && any(&self.verbs, verb)
            && (self.resource_names.is_empty()
                || name.is_some_and(|n| self.resource_names.iter().any(|x| x == n)))
    }
}

/// The RBAC verb, group and resource of a request.
fn rbac_request(
    method: &Method,
    t: &Target,
    query: &HashMap<String, String>,
) -> (String, String, String) {
    let verb = match (method, &t.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None)
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) =>
        {
            "watch"
        }
        (&Method::GET, None) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        (&Method::DELETE, None) => "deletecollection",
        _ => "unknown",
    };
    let parts: Vec<&str> = t.resource.split('/').collect();
    let group = if parts.len() == 3 { parts[0] } else { "" };
    let plural = parts.last().copied().unwrap_or_default();
    let resource = if t.status {
        format!("{plural}/status")
    } else {
        plural.to_owned()
    };
    (verb.to_owned(), group.to_owned(), resource)
}

fn bind(conn: Conn) -> (String, tokio::task::JoinHandle<()>) {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", std_listener.local_addr().expect("addr"));
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
    let router = Router::new().fallback(handle).with_state(conn);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (url, task)
}

fn client_for(url: &str) -> kube::Client {
    braze_export_operator::http::install_crypto_provider();
    let config = kube::Config::new(url.parse().expect("url"));
    kube::Client::try_from(config).expect("client")
}

impl FakeApiServer {
    /// Starts an empty server admitting BrazeExports by `BrazeExport::crd()`.
    pub async fn start() -> Self {
        let (changes, _) = broadcast::channel(100_000);
        let (expiry, _) = watch::channel(0);
        let crd = {
            use kube::CustomResourceExt;
            serde_json::to_value(braze_export_operator::spec::BrazeExport::crd()).expect("crd")
        };
        let inner = Inner {
            crd: Some(Arc::new(Crd::new(&crd))),
            ..Inner::default()
        };
        let state = Arc::new(ApiState {
            inner: Mutex::new(inner),
            changes,
            expiry,
        });
        let (url, task) = bind(Conn {
            state: Arc::clone(&state),
            gate: None,
            rules: None,
        });
        Self {
            url,
            state,
            task,
            listeners: Mutex::new(Vec::new()),
        }
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        client_for(&self.url)
    }

    /// A kube client reaching this server through a listener of its own, and the
    /// [`Partition`] that can cut it off. Other clients are never affected.
    pub fn partitionable_client(&self) -> (kube::Client, Partition) {
        let (cut, gate) = watch::channel(false);
        let (url, task) = bind(Conn {
            state: Arc::clone(&self.state),
            gate: Some(gate),
            rules: None,
        });
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        (client_for(&url), Partition { cut })
    }

    /// A kube client held to these RBAC rules, as a ServiceAccount is: any other request
    /// gets 403 `Forbidden` (and is recorded, see [`FakeApiServer::denied`]).
    pub fn client_with_rules(&self, rules: Vec<Rule>) -> kube::Client {
        let (url, task) = bind(Conn {
            state: Arc::clone(&self.state),
            gate: None,
            rules: Some(Arc::new(rules)),
        });
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        client_for(&url)
    }

    /// The requests RBAC refused, as `verb group/resource`.
    pub fn denied(&self) -> Vec<String> {
        self.lock().denied.clone()
    }

    /// A kubeconfig file pointing at this server (for the binary).
    pub fn kubeconfig(&self) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url
        );
        std::fs::write(f.path(), text).expect("write kubeconfig");
        f
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock()
    }

    fn helper_write(
        &self,
        resource: &str,
        namespace: String,
        name: String,
        op: Op,
        body: Value,
        admission: bool,
    ) -> Result<Value, Rejection> {
        let mut inner = self.lock();
        let op = match op {
            Op::Create
                if inner.objects.contains_key(&(
                    resource.to_owned(),
                    namespace.clone(),
                    name.clone(),
                )) =>
            {
                Op::Replace
            }
            op => op,
        };
        apply_write(
            &self.state,
            &mut inner,
            WriteRequest {
                resource: resource.to_owned(),
                namespace,
                name,
                scope: Scope::Whole,
                op,
                body,
                manager: TEST_MANAGER.to_owned(),
                force: true,
                preconditions: false,
                from_client: false,
                admission,
            },
        )
        .map(|(_, v)| v)
    }

    fn key_of(object: &Value) -> (String, String) {
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .expect("metadata.name")
            .to_owned();
        (ns, name)
    }

    /// Creates or replaces an object as a client would (with watch events), status included
    /// when the object has one (else the stored status stays). BrazeExports go through
    /// admission; panics if it refuses (see [`FakeApiServer::try_put`]).
    pub fn put(&self, resource: &str, object: Value) -> Value {
        self.try_put(resource, object)
            .unwrap_or_else(|r| panic!("the fake apiserver refused the object: {r}"))
    }

    /// Like [`FakeApiServer::put`], answering the refusal instead of panicking.
    pub fn try_put(&self, resource: &str, object: Value) -> Result<Value, Rejection> {
        let (ns, name) = Self::key_of(&object);
        self.helper_write(resource, ns, name, Op::Create, object, true)
    }

    /// Stores an object without admission (as an older or newer CRD may have let it in).
    pub fn put_unchecked(&self, resource: &str, object: Value) -> Value {
        let (ns, name) = Self::key_of(&object);
        self.helper_write(resource, ns, name, Op::Create, object, false)
            .unwrap_or_else(|r| panic!("the fake apiserver refused the object: {r}"))
    }

    /// A Secret with these string keys.
    pub fn put_secret(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        let data: Map<String, Value> = data
            .iter()
            .map(|(k, v)| ((*k).into(), json!(base64(v.as_bytes()))))
            .collect();
        self.put(SECRETS, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": data}));
    }

    /// Merge-patches an object (metadata, spec or status) as a client would; BrazeExports go
    /// through admission, and this panics if it refuses (see [`FakeApiServer::try_patch`]).
    pub fn patch(&self, resource: &str, namespace: &str, name: &str, patch: Value) -> Value {
        self.try_patch(resource, namespace, name, patch)
            .unwrap_or_else(|r| panic!("the fake apiserver refused the patch: {r}"))
    }

    /// Like [`FakeApiServer::patch`], answering the refusal instead of panicking.
    pub fn try_patch(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        patch: Value,
    ) -> Result<Value, Rejection> {
        self.helper_write(
            resource,
            namespace.into(),
            name.into(),
            Op::Merge,
            patch,
            true,
        )
    }

    /// What admission makes of a BrazeExport (pruned and defaulted), or its 422, without
    /// storing anything.
    pub fn admit(&self, object: Value) -> Result<Value, Rejection> {
        let crd = self.lock().crd.clone().expect("a CRD");
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        crd.admit(object, None, Scope::Whole, &name)
    }

    /// Deletes an object as `kubectl delete` would: with finalizers, it only gets its
    /// `deletionTimestamp` until they are removed.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut inner = self.lock();
        delete_object(
            &self.state,
            &mut inner,
            (resource.to_owned(), namespace.to_owned(), name.to_owned()),
            false,
        );
    }

    /// [`FakeApiServer::delete`] with `propagationPolicy: Foreground`: what the object owns is
    /// deleted first, while it still exists.
    pub fn delete_foreground(&self, resource: &str, namespace: &str, name: &str) {
        let mut inner = self.lock();
        delete_object(
            &self.state,
            &mut inner,
            (resource.to_owned(), namespace.to_owned(), name.to_owned()),
            true,
        );
    }

    /// The stored object.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every stored object of a resource.
    pub fn list(&self, resource: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Every write request so far (refused ones included), oldest first.
    pub fn writes(&self) -> Vec<Write> {
        self.lock().writes.clone()
    }

    /// The body of the last write request (POST, PUT or PATCH, main resource or status) to
    /// the object of this resource and name, in any namespace.
    pub fn last_body(&self, resource: &str, name: &str) -> Option<Value> {
        self.lock()
            .writes
            .iter()
            .rev()
            .find(|w| w.resource == resource && w.name == name)
            .map(|w| w.body.clone())
    }

    /// The managers of an object's fields: JSON pointer -> `manager (Apply)` or
    /// `manager (Update)` (lists are one field).
    pub fn managed_fields(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> BTreeMap<String, String> {
        self.lock()
            .owners
            .get(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let op = if v.apply { "Apply" } else { "Update" };
                        (k.clone(), format!("{} ({op})", v.manager))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every later watch event reaches watchers `lag` after the write that caused it (order
    /// kept); GETs and lists stay current. A busy apiserver's watch cache.
    pub fn set_watch_lag(&self, lag: Duration) {
        self.lock().watch_lag = lag;
    }

    /// Ends every open watch with a 410 Gone `ERROR` event (reason `Expired`), and from now
    /// on answers a watch from an older resourceVersion with that event at once, as a real
    /// apiserver does after compaction: kube-runtime's watcher must relist.
    pub fn expire_watches(&self) {
        let rv = {
            let mut inner = self.lock();
            inner.expired_at = inner.rv;
            inner.rv
        };
        self.state.expiry.send_replace(rv);
    }

    /// How many list requests (not watches) this resource got, in any namespace.
    pub fn list_count(&self, resource: &str) -> usize {
        self.lock().lists.get(resource).copied().unwrap_or(0)
    }

    /// Admits BrazeExports by this CustomResourceDefinition (JSON) from now on, e.g. a newer
    /// one with an extra field while the operator under test is older.
    pub fn set_crd(&self, crd: Value) {
        self.lock().crd = Some(Arc::new(Crd::new(&crd)));
    }

    /// Benchmarks: no schema admission and no record of write bodies (the fake's own CEL
    /// evaluation and bookkeeping are test machinery, not the controller's cost).
    pub fn lightweight(&self) {
        self.lock().no_admission = true;
    }
}

fn finalizers(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A DELETE: an object with finalizers only gets its `deletionTimestamp` (and a new
/// generation, as the apiserver gives it) until the last finalizer is removed; any other is
/// removed at once. `foreground` (`propagationPolicy: Foreground`, as `kubectl delete
/// --cascade=foreground` and Argo CD's prune send it) deletes the objects it owns first, while
/// it still exists; otherwise they are deleted once it is gone (background collection).
fn delete_object(state: &ApiState, inner: &mut Inner, key: Key, foreground: bool) -> Option<Value> {
    let object = inner.objects.get(&key)?;
    if foreground {
        let uid = object["metadata"]["uid"].clone();
        for dependent in dependents(inner, &uid) {
            delete_object(state, inner, dependent, false);
        }
    }
    let object = inner.objects.get(&key)?;
    if finalizers(object).is_empty() {
        return remove(state, inner, key);
    }
    if object.pointer("/metadata/deletionTimestamp").is_some() {
        return Some(object.clone());
    }
    let mut object = object.clone();
    let g = object
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    object["metadata"]["generation"] = json!(g + 1);
    object["metadata"]["deletionTimestamp"] = json!(
        jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap()
            .to_string()
    );
    object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    Some(store(state, inner, key, object))
}

/// The objects whose `ownerReferences` name `uid`.
fn dependents(inner: &Inner, uid: &Value) -> Vec<Key> {
    inner
        .objects
        .iter()
        .filter(|(_, o)| {
            o.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| &r["uid"] == uid))
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// Removes an object and tells the watchers.
fn remove(state: &ApiState, inner: &mut Inner, key: Key) -> Option<Value> {
    let object = inner.objects.remove(&key)?;
    // The garbage collector: what it owned goes too.
    for dependent in dependents(inner, &object["metadata"]["uid"]) {
        delete_object(state, inner, dependent, false);
    }
    inner.owners.remove(&key);
    inner.rv += 1;
    let mut object = object;
    object["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    let change = Change {
        rv: inner.rv,
        resource: key.0,
        namespace: key.1,
        kind: "DELETED",
        object: object.clone(),
        due: Instant::now() + inner.watch_lag,
    };
    inner.log.push(change.clone());
    let _ = state.changes.send(change);
    Some(object)
}

fn store(state: &ApiState, inner: &mut Inner, key: Key, mut object: Value) -> Value {
    inner.rv += 1;
    let rv = inner.rv;
    let existed = inner.objects.contains_key(&key);
    object["apiVersion"] = json!(api_version_of(&key.0));
    object["kind"] = json!(kind_of(&key.0));
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    let meta = object["metadata"].as_object_mut().expect("metadata");
    meta.insert("namespace".into(), json!(key.1));
    meta.insert("name".into(), json!(key.2));
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    meta.entry("uid")
        .or_insert_with(|| json!(format!("uid-{rv}")));
    meta.entry("creationTimestamp").or_insert_with(|| {
        json!(
            jiff::Timestamp::now()
                .round(jiff::Unit::Second)
                .unwrap()
                .to_string()
        )
    });
    meta.entry("generation").or_insert(json!(1));
    inner.objects.insert(key.clone(), object.clone());
    let change = Change {
        rv,
        resource: key.0,
        namespace: key.1,
        kind: if existed { "MODIFIED" } else { "ADDED" },
        object: object.clone(),
        due: Instant::now() + inner.watch_lag,
    };
    inner.log.push(change.clone());
    let _ = state.changes.send(change);
    object
}

/// Standard base64, as Secret data holds it.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct Target {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        other => (None, other),
    };
    let (plural, name, status) = match rest {
        [plural] => (*plural, None, false),
        [plural, name] => (*plural, Some((*name).to_owned()), false),
        [plural, name, "status"] => (*plural, Some((*name).to_owned()), true),
        _ => return None,
    };
    Some(Target {
        resource: format!("{gv}/{plural}"),
        namespace,
        name,
        status,
    })
}

/// 403 `Forbidden` in the apiserver's words when no rule allows the request (recorded for
/// [`FakeApiServer::denied`]).
fn forbidden(state: &ApiState, rules: &[Rule], method: &Method, uri: &Uri) -> Option<Response> {
    let t = parse_path(uri.path())?;
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let (verb, group, resource) = rbac_request(method, &t, &query);
    if rules
        .iter()
        .any(|r| r.allows(&group, &resource, &verb, t.name.as_deref()))
    {
        return None;
    }
    state
        .lock()
        .denied
        .push(format!("{verb} {group}/{resource}"));
    let scope = t
        .namespace
        .map(|ns| format!(" in the namespace \"{ns}\""))
        .unwrap_or_else(|| " at the cluster scope".into());
    Some(status_error(
        403,
        "Forbidden",
        format!(
            "{resource} is forbidden: User \"system:serviceaccount:operators:braze-export-operator\" cannot {verb} resource \"{resource}\" in API group \"{group}\"{scope}"
        ),
    ))
}

async fn handle(
    State(conn): State<Conn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(rules) = &conn.rules
        && let Some(denied) = forbidden(&conn.state, rules, &method, &uri)
    {
        return denied;
    }
    let Some(mut gate) = conn.gate.clone() else {
        return serve(&conn.state, method, uri, headers, body);
    };
    // A partitioned client's request waits for the network to come back (a dropped
    // `Partition` counts as healed).
    let _ = gate.wait_for(|cut| !*cut).await;
    let response = serve(&conn.state, method, uri, headers, body);
    let (parts, body) = response.into_parts();
    let mut data = body.into_data_stream();
    let gated = channel_stream(move |tx| async move {
        loop {
            let item = data.next().await;
            let _ = gate.wait_for(|cut| !*cut).await;
            let Some(item) = item else { return };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(gated))
}

fn serve(
    state: &Arc<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    state.lock().requests.push(format!("{method} {uri}"));
    let Some(t) = parse_path(uri.path()) else {
        return status_error(404, "NotFound", format!("no route {}", uri.path()));
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return status_error(400, "BadRequest", format!("the body is not JSON: {e}"));
            }
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if method == Method::GET
        && t.name.is_none()
        && let Some(e) = query
            .get("fieldSelector")
            .and_then(|f| field_selector_error(f))
    {
        return status_error(400, "BadRequest", e);
    }
    let namespace = t.namespace.clone().unwrap_or_default();
    let op = match method {
        Method::POST if t.name.is_none() => Some(Op::Create),
        Method::PUT if t.name.is_some() => Some(Op::Replace),
        Method::PATCH if t.name.is_some() => Some(if content_type.contains("apply-patch") {
            Op::Apply
        } else if content_type.contains("strategic-merge-patch") {
            Op::Strategic
        } else if content_type.contains("json-patch") {
            Op::Json
        } else {
            Op::Merge
        }),
        _ => None,
    };
    if let Some(op) = op {
        let name = t.name.clone().unwrap_or_else(|| {
            body.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        });
        let manager = query.get("fieldManager").cloned();
        let force = query.get("force").is_some_and(|f| f == "true");
        let mut inner = state.lock();
        if !inner.no_admission {
            inner.writes.push(Write {
                method: method.to_string(),
                resource: t.resource.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                status: t.status,
                content_type: content_type.clone(),
                query: uri.query().unwrap_or("").to_owned(),
                field_manager: manager.clone(),
                force,
                body: body.clone(),
            });
        }
        let options_error = if op == Op::Apply && manager.is_none() {
            Some("fieldManager: Required value: is required for apply patch")
        } else if method == Method::PATCH && op != Op::Apply && query.contains_key("force") {
            Some("force: Forbidden: may not be specified for non-apply patch")
        } else {
            None
        };
        if let Some(e) = options_error {
            return status_error(
                422,
                "Invalid",
                format!("PatchOptions.meta.k8s.io \"\" is invalid: {e}"),
            );
        }
        let result = apply_write(
            state,
            &mut inner,
            WriteRequest {
                resource: t.resource.clone(),
                namespace,
                name,
                scope: if t.status { Scope::Status } else { Scope::Main },
                op,
                body,
                manager: manager.unwrap_or_else(|| "unknown".into()),
                force,
                preconditions: true,
                from_client: true,
                admission: true,
            },
        );
        return match result {
            Ok((code, object)) => (
                code,
                [(header::CONTENT_TYPE, "application/json")],
                object.to_string(),
            )
                .into_response(),
            Err(rejection) => rejection.response(),
        };
    }
    match (method, &t.name) {
        (Method::GET, None)
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) =>
        {
            watch_stream(state, &t, &query)
        }
        (Method::GET, None) => list(state, &t, &query),
        (Method::GET, Some(name)) => {
            let inner = state.lock();
            match inner
                .objects
                .get(&(t.resource.clone(), namespace, name.clone()))
            {
                Some(o) => ok_json(o),
                None => status_error(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", qualified_resource(&t.resource)),
                ),
            }
        }
        (Method::DELETE, Some(name)) => {
            let key = (t.resource.clone(), namespace, name.clone());
            let foreground = body["propagationPolicy"] == "Foreground";
            let mut inner = state.lock();
            match delete_object(state, &mut inner, key, foreground) {
                Some(o) => ok_json(&o),
                None => status_error(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", qualified_resource(&t.resource)),
                ),
            }
        }
        (m, _) => status_error(
            405,
            "MethodNotAllowed",
            format!("{m} is not supported here"),
        ),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Create,
    Replace,
    Merge,
    Strategic,
    Json,
    Apply,
}

/// Which part of the object a write may change (and admission validates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// The main resource: everything but `status` (for a resource with a status subresource).
    Main,
    /// The `/status` subresource: only `status`.
    Status,
    /// A test-side helper: everything.
    Whole,
}

struct WriteRequest {
    resource: String,
    namespace: String,
    name: String,
    scope: Scope,
    op: Op,
    body: Value,
    manager: String,
    force: bool,
    /// Check `metadata.uid` and `metadata.resourceVersion` of the body.
    preconditions: bool,
    /// A request from a client (not a test-side helper): uids are the server's.
    from_client: bool,
    admission: bool,
}

/// Metadata fields that are never data a client sets (nor fields anyone owns).
fn system_path(path: &str) -> bool {
    [
        "/apiVersion",
        "/kind",
        "/metadata/name",
        "/metadata/namespace",
        "/metadata/uid",
        "/metadata/resourceVersion",
        "/metadata/generation",
        "/metadata/creationTimestamp",
        "/metadata/deletionTimestamp",
        "/metadata/deletionGracePeriodSeconds",
        "/metadata/managedFields",
    ]
    .iter()
    .any(|p| under(path, p))
        || path == "/metadata"
}

fn in_scope(path: &str, scope: Scope, has_status: bool) -> bool {
    !system_path(path)
        && match scope {
            Scope::Status => under(path, "/status"),
            Scope::Main if has_status => !under(path, "/status"),
            Scope::Main | Scope::Whole => true,
        }
}

fn scoped_leaves(v: &Value, scope: Scope, has_status: bool) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    leaves("", v, &mut out);
    out.retain(|(p, _)| !p.is_empty() && in_scope(p, scope, has_status));
    out
}

fn not_found(resource: &str, name: &str) -> Rejection {
    Rejection::new(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", qualified_resource(resource)),
    )
}

fn conflict(resource: &str, name: &str, why: &str) -> Rejection {
    Rejection::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": {why}",
            qualified_resource(resource)
        ),
    )
}

/// The uid and resourceVersion preconditions a body carries.
fn check_preconditions(req: &WriteRequest, body: &Value, stored: &Value) -> Result<(), Rejection> {
    let stored_uid = stored
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if let Some(uid) = body
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        && uid != stored_uid
    {
        let (group, plural) = group_plural(&req.resource);
        let key = if group.is_empty() || group.ends_with(".k8s.io") {
            format!("/registry/{plural}/{}/{}", req.namespace, req.name)
        } else {
            format!("/registry/{group}/{plural}/{}/{}", req.namespace, req.name)
        };
        return Err(conflict(
            &req.resource,
            &req.name,
            &format!(
                "StorageError: invalid object, Code: 4, Key: {key}, ResourceVersion: 0, AdditionalErrorMsg: Precondition failed: UID in precondition: {uid}, UID in object meta: {stored_uid}"
            ),
        ));
    }
    let stored_rv = stored
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if let Some(rv) = body
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        && rv != stored_rv
    {
        return Err(conflict(
            &req.resource,
            &req.name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    Ok(())
}

/// The status-subresource or main-resource part of a patch body.
fn scoped_patch(body: &Value, scope: Scope, has_status: bool) -> Value {
    match scope {
        Scope::Status => match body.get("status") {
            Some(s) => json!({"status": s}),
            None => json!({}),
        },
        Scope::Main if has_status => {
            let mut p = body.clone();
            if let Some(m) = p.as_object_mut() {
                m.remove("status");
            }
            p
        }
        Scope::Main | Scope::Whole => body.clone(),
    }
}

/// Keeps the parts of `old` that a write in `scope` may not change.
fn restore_out_of_scope(new: &mut Value, old: &Value, scope: Scope, has_status: bool) {
    match scope {
        Scope::Status => {
            let status = new.get("status").cloned();
            *new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        Scope::Main if has_status => match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        },
        Scope::Main | Scope::Whole => {}
    }
}

/// The one write path, for clients and for the test-side helpers.
fn apply_write(
    state: &ApiState,
    inner: &mut Inner,
    req: WriteRequest,
) -> Result<(StatusCode, Value), Rejection> {
    let key: Key = (
        req.resource.clone(),
        req.namespace.clone(),
        req.name.clone(),
    );
    let crd = inner.crd.clone().filter(|c| c.resource == req.resource);
    let has_status = crd.is_some();
    let old = inner.objects.get(&key).cloned();
    let kind = kind_of(&req.resource);
    match (req.op, &old) {
        (Op::Create, Some(_)) => {
            return Err(Rejection::new(
                409,
                "AlreadyExists",
                format!(
                    "{} \"{}\" already exists",
                    qualified_resource(&req.resource),
                    req.name
                ),
            ));
        }
        (Op::Create, None) if req.name.is_empty() => {
            return Err(Rejection::new(
                422,
                "Invalid",
                format!(
                    "{kind} \"\" is invalid: metadata.name: Required value: name or generateName is required"
                ),
            ));
        }
        (Op::Replace | Op::Merge | Op::Strategic | Op::Json, None) => {
            return Err(not_found(&req.resource, &req.name));
        }
        (Op::Apply, None) if req.scope == Scope::Status => {
            return Err(not_found(&req.resource, &req.name));
        }
        _ => {}
    }
    if crd.is_some() && req.op == Op::Strategic {
        return Err(Rejection::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".into(),
        ));
    }
    if req.preconditions && req.op != Op::Create {
        // An apply that creates the object checks its preconditions against nothing.
        let nothing = json!({"metadata": {}});
        check_preconditions(&req, &req.body, old.as_ref().unwrap_or(&nothing))?;
    }
    if let (Some(crd), Op::Replace, true) = (&crd, req.op, req.from_client)
        && req
            .body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return Err(crd.invalid(
            &req.name,
            vec![FieldError::invalid_raw(
                "metadata.resourceVersion",
                "0x0",
                "must be specified for an update",
            )],
        ));
    }
    let base = old.clone().unwrap_or_else(|| json!({"metadata": {}}));
    let mut owners = inner.owners.get(&key).cloned().unwrap_or_default();
    let mut object = match req.op {
        Op::Create => {
            let mut o = req.body.clone();
            if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
                if req.from_client {
                    m.remove("uid");
                }
            }
            if req.scope == Scope::Main
                && has_status
                && let Some(m) = o.as_object_mut()
            {
                // A create never sets the status of a resource with a status subresource.
                m.remove("status");
            }
            o
        }
        Op::Replace => {
            let mut o = req.body.clone();
            if req.scope == Scope::Whole
                && o.get("status").is_none()
                && let Some(s) = base.get("status")
            {
                o["status"] = s.clone();
            }
            restore_out_of_scope(&mut o, &base, req.scope, has_status);
            o
        }
        Op::Merge | Op::Strategic => {
            let mut o = base.clone();
            merge(&mut o, &scoped_patch(&req.body, req.scope, has_status));
            o
        }
        Op::Json => {
            let mut o = base.clone();
            json_patch(&mut o, &req.body).map_err(|e| {
                Rejection::new(
                    422,
                    "Invalid",
                    format!("the JSON patch cannot be applied: {e}"),
                )
            })?;
            restore_out_of_scope(&mut o, &base, req.scope, has_status);
            o
        }
        Op::Apply => {
            let touched = scoped_leaves(&req.body, req.scope, has_status);
            if !req.force {
                let mut conflicts = Vec::new();
                for (path, value) in &touched {
                    let owner = owners.get(path);
                    let current = base.pointer(path).filter(|v| !v.is_null());
                    if let Some(owner) = owner
                        && owner.manager != req.manager
                        && current.is_some()
                        && current != Some(value)
                    {
                        let using = if owner.apply {
                            String::new()
                        } else {
                            format!(" using {}", api_version_of(&req.resource))
                        };
                        conflicts.push(format!(
                            "conflict with \"{}\"{using}: {}",
                            owner.manager,
                            path.replace('/', ".")
                        ));
                    }
                }
                if !conflicts.is_empty() {
                    return Err(Rejection::new(
                        409,
                        "Conflict",
                        format!(
                            "Apply failed with {} conflict{}: {}",
                            conflicts.len(),
                            if conflicts.len() == 1 { "" } else { "s" },
                            conflicts.join("\n")
                        ),
                    ));
                }
            }
            let mut o = base.clone();
            // Fields this manager applied before and omits now are removed.
            let omitted: Vec<String> = owners
                .iter()
                .filter(|(p, o)| {
                    o.apply
                        && o.manager == req.manager
                        && in_scope(p, req.scope, has_status)
                        && !touched.iter().any(|(t, _)| under(t, p))
                })
                .map(|(p, _)| p.clone())
                .collect();
            for p in &omitted {
                owners.remove(p);
                if remove_pointer(&mut o, p).is_some() {
                    // Objects the removal emptied go too, unless the applied config has them.
                    let mut parent = p.rsplit_once('/').map(|(a, _)| a.to_owned());
                    while let Some(a) = parent.filter(|a| !a.is_empty()) {
                        let emptied = o
                            .pointer(&a)
                            .and_then(Value::as_object)
                            .is_some_and(Map::is_empty);
                        if !emptied || req.body.pointer(&a).is_some() {
                            break;
                        }
                        remove_pointer(&mut o, &a);
                        parent = a.rsplit_once('/').map(|(b, _)| b.to_owned());
                    }
                }
            }
            merge(&mut o, &scoped_patch(&req.body, req.scope, has_status));
            for (path, value) in touched {
                if value.is_null() {
                    owners.retain(|p, _| !under(p, &path));
                } else {
                    owners.retain(|p, _| !under(p, &path) || *p == path);
                    owners.insert(path, Owner::new(&req.manager, true));
                }
            }
            o
        }
    };
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    // Identity is the server's: preconditions were checked, they are not data.
    if let Some(old) = &old {
        for k in [
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old["metadata"].get(k) {
                Some(v) => object["metadata"][k] = v.clone(),
                None => {
                    if let Some(m) = object["metadata"].as_object_mut() {
                        m.remove(k);
                    }
                }
            }
        }
    }
    if req.op != Op::Apply {
        // An update owns the fields it changed.
        let mut new_leaves = scoped_leaves(&object, req.scope, has_status);
        new_leaves.retain(|(p, v)| old.as_ref().and_then(|o| o.pointer(p)) != Some(v));
        for (p, _) in new_leaves {
            owners.retain(|q, _| !under(q, &p) || *q == p);
            owners.insert(p, Owner::new(&req.manager, false));
        }
    }
    owners.retain(|p, _| object.pointer(p).is_some());
    if object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && let Some(m) = object["metadata"].as_object_mut()
    {
        // An empty list is not kept (omitempty).
        m.remove("finalizers");
    }
    if let Some(old) = &old
        && old.pointer("/metadata/deletionTimestamp").is_some()
    {
        let before = finalizers(old);
        let added: Vec<String> = finalizers(&object)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !added.is_empty() {
            return Err(Rejection::new(
                422,
                "Invalid",
                format!(
                    "{kind} \"{}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}",
                    req.name
                ),
            ));
        }
    }
    if let (Some(crd), true) = (&crd, req.admission && !inner.no_admission) {
        object = crd.admit(object, old.as_ref(), req.scope, &req.name)?;
    }
    if let Some(old) = &old
        && object.get("spec") != old.get("spec")
    {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        object["metadata"]["generation"] = json!(g + 1);
    }
    let stored = store(state, inner, key.clone(), object);
    inner.owners.insert(key.clone(), owners);
    if stored.pointer("/metadata/deletionTimestamp").is_some() && finalizers(&stored).is_empty() {
        // The last finalizer is gone: the deletion completes.
        remove(state, inner, key);
    }
    let code = if old.is_none() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, stored))
}

/// RFC 6902 JSON patch: add, remove, replace, move, copy and test.
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch is a list of operations")?;
    for op in ops {
        let path = op["path"].as_str().ok_or("an operation needs a path")?;
        let value = || op.get("value").cloned().ok_or("an operation needs a value");
        match op["op"].as_str().unwrap_or_default() {
            "add" => add_pointer(target, path, value()?)?,
            "remove" => {
                remove_pointer(target, path).ok_or(format!("no value at {path}"))?;
            }
            "replace" => {
                remove_pointer(target, path).ok_or(format!("no value at {path}"))?;
                add_pointer(target, path, value()?)?;
            }
            "test" => {
                if target.pointer(path) != Some(&value()?) {
                    return Err(format!("test failed at {path}"));
                }
            }
            "move" | "copy" => {
                let from = op["from"].as_str().ok_or("move and copy need from")?;
                let v = if op["op"] == "move" {
                    remove_pointer(target, from)
                } else {
                    target.pointer(from).cloned()
                }
                .ok_or(format!("no value at {from}"))?;
                add_pointer(target, path, v)?;
            }
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(())
}

fn add_pointer(target: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, last) = path.rsplit_once('/').ok_or(format!("bad path {path}"))?;
    let last = unescape_pointer(last);
    match target.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) if last == "-" => {
            a.push(value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
            if i > a.len() {
                return Err(format!("index out of range in {path}"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("no parent for {path}")),
    }
}

/// Label and field selectors of a list or watch.
#[derive(Clone, Default)]
struct Selectors {
    labels: Option<String>,
    fields: Option<String>,
}

impl Selectors {
    fn of(query: &HashMap<String, String>) -> Self {
        Self {
            labels: query.get("labelSelector").cloned(),
            fields: query.get("fieldSelector").cloned(),
        }
    }
}

fn visible(c_resource: &str, c_ns: &str, object: &Value, t: &Target, sel: &Selectors) -> bool {
    c_resource == t.resource
        && t.namespace.as_deref().is_none_or(|ns| ns == c_ns)
        && sel.labels.as_deref().is_none_or(|s| {
            selector_matches(
                s,
                object.pointer("/metadata/labels").unwrap_or(&Value::Null),
            )
        })
        && sel
            .fields
            .as_deref()
            .is_none_or(|f| fields_match(f, object))
}

fn list(state: &ApiState, t: &Target, query: &HashMap<String, String>) -> Response {
    let mut inner = state.lock();
    *inner.lists.entry(t.resource.clone()).or_default() += 1;
    let selectors = Selectors::of(query);
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|(k, v)| visible(&k.0, &k.1, v, t, &selectors))
        .map(|(_, v)| v.clone())
        .collect();
    ok_json(&json!({
        "apiVersion": api_version_of(&t.resource),
        "kind": format!("{}List", kind_of(&t.resource)),
        "metadata": {"resourceVersion": inner.rv.to_string()},
        "items": items,
    }))
}

fn gone(requested: u64, oldest: u64) -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("too old resource version: {requested} ({oldest})"), "reason": "Expired", "code": 410}})
}

fn watch_stream(state: &Arc<ApiState>, t: &Target, query: &HashMap<String, String>) -> Response {
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290),
    );
    let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let selectors = Selectors::of(query);
    let target = Target {
        resource: t.resource.clone(),
        namespace: t.namespace.clone(),
        name: None,
        status: false,
    };
    let line = |v: Value| Bytes::from(format!("{v}\n"));
    let respond = |stream: futures_util::stream::BoxStream<
        'static,
        Result<Bytes, std::convert::Infallible>,
    >| {
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .expect("response")
    };
    // Subscribing under the lock: the backlog and the live changes meet without a gap.
    let inner = state.lock();
    if since > 0 && since < inner.expired_at {
        let event = line(gone(since, inner.expired_at));
        return respond(futures_util::stream::iter([Ok(event)]).boxed());
    }
    let mut live = state.changes.subscribe();
    let mut expiry = state.expiry.subscribe();
    expiry.mark_unchanged();
    let now = Instant::now();
    let mut backlog: VecDeque<Change> = if since == 0 {
        // "Any" or "most recent" resourceVersion: synthetic ADDED events for the state now.
        inner
            .objects
            .iter()
            .filter(|(k, _)| k.0 == target.resource)
            .map(|(k, o)| Change {
                rv: inner.rv,
                resource: k.0.clone(),
                namespace: k.1.clone(),
                kind: "ADDED",
                object: o.clone(),
                due: now,
            })
            .collect()
    } else {
        inner.log.iter().filter(|c| c.rv > since).cloned().collect()
    };
    let bookmark = (since == 0 && initial_events).then(|| {
        json!({"type": "BOOKMARK", "object": {"kind": kind_of(&target.resource), "apiVersion": api_version_of(&target.resource), "metadata": {"resourceVersion": inner.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}}})
    });
    let last_backlog = if since == 0 {
        inner.rv
    } else {
        backlog.back().map_or(since, |c| c.rv)
    };
    drop(inner);
    let stream = channel_stream(
        move |tx: mpsc::Sender<Result<Bytes, std::convert::Infallible>>| async move {
            let deadline = Instant::now() + timeout;
            let mut sent = since;
            let mut bookmark = bookmark;
            loop {
                let change = match backlog.pop_front() {
                    Some(c) => c,
                    None => {
                        if let Some(b) = bookmark.take()
                            && tx.send(Ok(line(b))).await.is_err()
                        {
                            return;
                        }
                        tokio::select! {
                            next = live.recv() => match next {
                                Ok(c) if c.rv > last_backlog => c,
                                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                                Err(broadcast::error::RecvError::Closed) => return,
                            },
                            _ = expiry.changed() => {
                                let oldest = *expiry.borrow_and_update();
                                let _ = tx.send(Ok(line(gone(sent, oldest)))).await;
                                return;
                            }
                            () = tokio::time::sleep_until(deadline) => return,
                        }
                    }
                };
                if !visible(
                    &change.resource,
                    &change.namespace,
                    &change.object,
                    &target,
                    &selectors,
                ) {
                    continue;
                }
                // A lagging watch cache: the event leaves when it is due.
                tokio::select! {
                    () = tokio::time::sleep_until(change.due) => {}
                    _ = expiry.changed() => {
                        let oldest = *expiry.borrow_and_update();
                        let _ = tx.send(Ok(line(gone(sent, oldest)))).await;
                        return;
                    }
                    () = tokio::time::sleep_until(deadline) => return,
                }
                if tx
                    .send(Ok(line(
                        json!({"type": change.kind, "object": change.object}),
                    )))
                    .await
                    .is_err()
                {
                    return;
                }
                sent = change.rv;
            }
        },
    );
    respond(stream.boxed())
}

/// A stream fed by a task through a channel.
fn channel_stream<T, F, Fut>(f: F) -> impl futures_util::Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(f(tx));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

// ---------------------------------------------------------------------------------------
// Admission of custom resources from the CRD's openAPIV3Schema.

/// A CRD's admission: structural schema (pruning, defaulting, validation) and CEL rules.
struct Crd {
    group: String,
    kind: String,
    /// `group/version/plural`.
    resource: String,
    schema: Value,
    /// The schema without `status` (main-resource writes).
    main: Value,
    /// Only `status` (status-subresource writes).
    status: Value,
    main_cel: CompiledSchema,
    status_cel: CompiledSchema,
    whole_cel: CompiledSchema,
}

impl Crd {
    fn new(crd: &Value) -> Self {
        let group = crd["spec"]["group"].as_str().unwrap_or_default().to_owned();
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let plural = crd["spec"]["names"]["plural"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let versions = crd["spec"]["versions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let version = versions
            .iter()
            .find(|v| v["storage"] == true)
            .or_else(|| versions.first())
            .cloned()
            .expect("the CRD has a version");
        let schema = version["schema"]["openAPIV3Schema"].clone();
        let mut main = schema.clone();
        if let Some(p) = main.get_mut("properties").and_then(Value::as_object_mut) {
            p.remove("status");
        }
        let status = match schema.pointer("/properties/status") {
            Some(s) => json!({"type": "object", "properties": {"status": s}}),
            None => json!({"type": "object"}),
        };
        Self {
            resource: format!(
                "{group}/{}/{plural}",
                version["name"].as_str().unwrap_or_default()
            ),
            group,
            kind,
            main_cel: compile_schema(&main),
            status_cel: compile_schema(&status),
            whole_cel: compile_schema(&schema),
            schema,
            main,
            status,
        }
    }

    fn invalid(&self, name: &str, errors: Vec<FieldError>) -> Rejection {
        let listed: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let joined = if listed.len() == 1 {
            listed[0].clone()
        } else {
            format!("[{}]", listed.join(", "))
        };
        let mut r = Rejection::new(
            422,
            "Invalid",
            format!(
                "{}.{} \"{name}\" is invalid: {joined}",
                self.kind, self.group
            ),
        );
        r.details = Some(Box::new(json!({
            "name": name,
            "group": self.group,
            "kind": self.kind,
            "causes": errors.iter().map(|e| json!({"reason": e.reason, "message": e.body, "field": e.path})).collect::<Vec<_>>(),
        })));
        r
    }

    /// Prunes, defaults and validates; unchanged values that were already invalid pass
    /// (validation ratcheting).
    fn admit(
        &self,
        mut object: Value,
        old: Option<&Value>,
        scope: Scope,
        name: &str,
    ) -> Result<Value, Rejection> {
        let original = object.clone();
        prune(&self.schema, &mut object, true);
        default(&self.schema, &mut object);
        // Only what the request may change is pruned and defaulted (a status write leaves
        // the stored spec as it is).
        restore_out_of_scope(&mut object, &original, scope, true);
        let view = |o: &Value| -> Value {
            match scope {
                Scope::Main => {
                    let mut v = o.clone();
                    if let Some(m) = v.as_object_mut() {
                        m.remove("status");
                    }
                    v
                }
                Scope::Status => match o.get("status") {
                    Some(s) => json!({"status": s}),
                    None => json!({}),
                },
                Scope::Whole => o.clone(),
            }
        };
        let (schema, cel) = match scope {
            Scope::Main => (&self.main, &self.main_cel),
            Scope::Status => (&self.status, &self.status_cel),
            Scope::Whole => (&self.schema, &self.whole_cel),
        };
        let new_view = view(&object);
        let old_view = old.map(view);
        let mut errors = Vec::new();
        validate(schema, &new_view, "", &mut errors);
        let structural_ok = errors.is_empty();
        let cel_result: Result<(), ValidationErrors> =
            VALIDATOR.with(|v| v.validate_compiled(cel, &new_view, old_view.as_ref()));
        if let Err(cel_errors) = cel_result {
            for e in cel_errors {
                if e.kind != ErrorKind::ValidationFailure && !structural_ok {
                    // A rule that could not run on an ill-typed value: the type error says it.
                    continue;
                }
                let type_name = schema_at(schema, &e.field_path)
                    .and_then(|s| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("object")
                    .to_owned();
                errors.push(FieldError::cel(
                    &e.field_path,
                    &type_name,
                    &e.message,
                    e.reason.as_deref(),
                ));
            }
        }
        if let Some(old_view) = &old_view {
            errors.retain(|e| {
                let p = dotted_to_pointer(&e.ratchet);
                old_view.pointer(&p) != new_view.pointer(&p)
            });
        }
        if errors.is_empty() {
            Ok(object)
        } else {
            Err(self.invalid(name, errors))
        }
    }
}

thread_local! {
    static VALIDATOR: Validator = Validator::new();
}

/// One field error, as the apiserver's `field.Error` prints it.
#[derive(Clone, Debug)]
struct FieldError {
    /// `spec.braze.batchSize` (`<nil>` for the root).
    path: String,
    /// `FieldValueInvalid`, `FieldValueRequired`, ...
    reason: &'static str,
    /// What follows `path: `.
    body: String,
    /// The path whose unchanged value lets the error pass (ratcheting).
    ratchet: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.body)
    }
}

fn shown_path(path: &str) -> String {
    if path.is_empty() {
        "<nil>".to_owned()
    } else {
        path.to_owned()
    }
}

impl FieldError {
    fn new(path: &str, reason: &'static str, body: String) -> Self {
        Self {
            path: shown_path(path),
            reason,
            body,
            ratchet: path.to_owned(),
        }
    }

    fn required(path: &str) -> Self {
        let mut e = Self::new(path, "FieldValueRequired", "Required value".into());
        e.ratchet = path
            .rsplit_once('.')
            .map(|(p, _)| p.to_owned())
            .unwrap_or_default();
        e
    }

    fn invalid(path: &str, value: &Value, detail: &str) -> Self {
        Self::invalid_raw(path, &go_value(value), detail)
    }

    fn invalid_raw(path: &str, value: &str, detail: &str) -> Self {
        Self::new(
            path,
            "FieldValueInvalid",
            format!("Invalid value: {value}: {detail}"),
        )
    }

    fn type_invalid(path: &str, value: &Value, want: &str) -> Self {
        let actual = json_type(value);
        Self::new(
            path,
            "FieldValueTypeInvalid",
            format!(
                "Invalid value: \"{actual}\": {} in body must be of type {want}: \"{actual}\"",
                shown_path(path)
            ),
        )
    }

    fn not_supported(path: &str, value: &Value, allowed: &[Value]) -> Self {
        let values: Vec<String> = allowed
            .iter()
            .map(|v| match v {
                Value::String(s) => format!("{:?}", s),
                other => format!("{:?}", other.to_string()),
            })
            .collect();
        Self::new(
            path,
            "FieldValueNotSupported",
            format!(
                "Unsupported value: {}: supported values: {}",
                go_value(value),
                values.join(", ")
            ),
        )
    }

    fn too_long(path: &str, max: u64) -> Self {
        let unit = if max == 1 { "byte" } else { "bytes" };
        Self::new(
            path,
            "FieldValueTooLong",
            format!("Too long: may not be more than {max} {unit}"),
        )
    }

    fn too_many(path: &str, actual: usize, max: u64) -> Self {
        Self::new(
            path,
            "FieldValueTooMany",
            format!("Too many: {actual}: must have at most {max} items"),
        )
    }

    /// A failed CEL rule, as the apiserver reports it.
    fn cel(path: &str, type_name: &str, message: &str, reason: Option<&str>) -> Self {
        match reason {
            Some("FieldValueRequired") => Self::new(
                path,
                "FieldValueRequired",
                format!("Required value: {message}"),
            ),
            Some("FieldValueForbidden") => {
                Self::new(path, "FieldValueForbidden", format!("Forbidden: {message}"))
            }
            Some("FieldValueDuplicate") => Self::new(
                path,
                "FieldValueDuplicate",
                format!("Duplicate value: \"{type_name}\": {message}"),
            ),
            _ => Self::new(
                path,
                "FieldValueInvalid",
                format!("Invalid value: \"{type_name}\": {message}"),
            ),
        }
    }
}

/// A value as Go's `field.Error` prints it: strings quoted, numbers bare, the rest as JSON.
fn go_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "\"null\"".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => go_float(f),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// A float as Go's `%v` prints it (`75`, not `75.0`).
fn go_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e21 {
        format!("{f:.0}")
    } else {
        format!("{f}")
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_integer(v: &Value) -> bool {
    v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0)
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// `spec.x[0].y` -> `/spec/x/0/y`.
fn dotted_to_pointer(path: &str) -> String {
    let mut out = String::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, indexes) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            out.push('/');
            out.push_str(&escape_pointer(name));
        }
        for i in indexes.split('[').filter(|s| !s.is_empty()) {
            out.push('/');
            out.push_str(i.trim_end_matches(']'));
        }
    }
    out
}

/// The schema node at a dotted field path.
fn schema_at<'a>(schema: &'a Value, path: &str) -> Option<&'a Value> {
    let mut node = schema;
    for token in dotted_to_pointer(path).split('/').skip(1) {
        let token = unescape_pointer(token);
        node = if let Some(p) = node.pointer(&format!("/properties/{}", escape_pointer(&token))) {
            p
        } else if token.parse::<usize>().is_ok() && node.get("items").is_some() {
            &node["items"]
        } else {
            node.get("additionalProperties").filter(|a| a.is_object())?
        };
    }
    Some(node)
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool) == Some(true)
}

/// Drops the fields the schema does not know (kept: `apiVersion`, `kind` and `metadata` of
/// the root and of embedded resources, and anything under
/// `x-kubernetes-preserve-unknown-fields`).
fn prune(schema: &Value, v: &mut Value, root: bool) {
    match v {
        Value::Object(m) => {
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for c in m.values_mut() {
                    prune(additional, c, false);
                }
                return;
            }
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            let embedded = root || flag(schema, "x-kubernetes-embedded-resource");
            let props = schema.get("properties").and_then(Value::as_object);
            m.retain(|k, _| {
                preserve
                    || props.is_some_and(|p| p.contains_key(k))
                    || (embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
            });
            if let Some(props) = props {
                for (k, c) in m.iter_mut() {
                    if let Some(s) = props.get(k) {
                        prune(s, c, false);
                    }
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for c in a {
                    prune(items, c, false);
                }
            }
        }
        _ => {}
    }
}

/// Fills absent fields from `default`, recursively; a null where the schema is not nullable
/// is dropped first (then defaulted if it has a default).
fn default(schema: &Value, v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, s) in props {
                    if m.get(k).is_some_and(Value::is_null) && !flag(s, "nullable") {
                        m.remove(k);
                    }
                    if !m.contains_key(k)
                        && let Some(d) = s.get("default")
                    {
                        m.insert(k.clone(), d.clone());
                    }
                }
                for (k, c) in m.iter_mut() {
                    if let Some(s) = props.get(k) {
                        default(s, c);
                    }
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for c in m.values_mut() {
                    default(additional, c);
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for c in a {
                    default(items, c);
                }
            }
        }
        _ => {}
    }
}

/// OpenAPI v3 validation as the apiserver runs it on custom resources.
fn validate(schema: &Value, v: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if v.is_null() {
        if !flag(schema, "nullable") && schema.get("type").is_some() {
            errors.push(FieldError::type_invalid(
                path,
                v,
                schema["type"].as_str().unwrap_or("object"),
            ));
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(is_integer(v) || v.is_string()) {
            errors.push(FieldError::type_invalid(path, v, "integer,string"));
            return;
        }
    } else if let Some(want) = schema.get("type").and_then(Value::as_str) {
        let ok = match want {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "boolean" => v.is_boolean(),
            "integer" => is_integer(v),
            "number" => v.is_number(),
            _ => true,
        };
        if !ok {
            errors.push(FieldError::type_invalid(path, v, want));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        errors.push(FieldError::not_supported(path, v, allowed));
    }
    let shown = shown_path(path);
    if let Some(n) = v.as_f64() {
        let exclusive_max = flag(schema, "exclusiveMaximum");
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && (n > max || (exclusive_max && n == max))
        {
            let how = if exclusive_max {
                "less than"
            } else {
                "less than or equal to"
            };
            errors.push(FieldError::invalid(
                path,
                v,
                &format!("{shown} in body should be {how} {}", go_float(max)),
            ));
        }
        let exclusive_min = flag(schema, "exclusiveMinimum");
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && (n < min || (exclusive_min && n == min))
        {
            let how = if exclusive_min {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errors.push(FieldError::invalid(
                path,
                v,
                &format!("{shown} in body should be {how} {}", go_float(min)),
            ));
        }
        if let Some(m) = schema.get("multipleOf").and_then(Value::as_f64)
            && m > 0.0
            && (n / m).fract() != 0.0
        {
            errors.push(FieldError::invalid(
                path,
                v,
                &format!("{shown} in body should be a multiple of {}", go_float(m)),
            ));
        }
    }
    if let Some(s) = v.as_str() {
        let chars = s.chars().count() as u64;
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && chars > max
        {
            errors.push(FieldError::too_long(path, max));
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && chars < min
        {
            errors.push(FieldError::invalid(
                path,
                v,
                &format!("{shown} in body should be at least {min} chars long"),
            ));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            match regex::Regex::new(pattern) {
                Ok(re) if re.is_match(s) => {}
                _ => errors.push(FieldError::invalid(
                    path,
                    v,
                    &format!("{shown} in body should match '{pattern}'"),
                )),
            }
        }
    }
    if let Some(items) = v.as_array() {
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && items.len() as u64 > max
        {
            errors.push(FieldError::too_many(path, items.len(), max));
        }
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && (items.len() as u64) < min
        {
            errors.push(FieldError::invalid(
                path,
                v,
                &format!("{shown} in body should have at least {min} items"),
            ));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
        match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("map") => {
                let keys: Vec<&str> = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let mut seen = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Vec<(&str, Value)> = keys
                        .iter()
                        .map(|k| (*k, item.get(*k).cloned().unwrap_or(Value::Null)))
                        .collect();
                    if seen.contains(&key) {
                        let shown: Vec<String> =
                            key.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                        errors.push(FieldError::new(
                            &format!("{path}[{i}]"),
                            "FieldValueDuplicate",
                            format!(
                                "Duplicate value: map[string]interface {{}}{{{}}}",
                                shown.join(", ")
                            ),
                        ));
                    } else {
                        seen.push(key);
                    }
                }
            }
            Some("set") => {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        errors.push(FieldError::new(
                            &format!("{path}[{i}]"),
                            "FieldValueDuplicate",
                            format!("Duplicate value: {}", go_value(item)),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(m) = v.as_object() {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !m.contains_key(r) {
                errors.push(FieldError::required(&child_path(path, r)));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, s) in props {
                if let Some(c) = m.get(k) {
                    validate(s, c, &child_path(path, k), errors);
                }
            }
        }
        if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
            for (k, c) in m {
                validate(additional, c, &child_path(path, k), errors);
            }
        }
    }
}
