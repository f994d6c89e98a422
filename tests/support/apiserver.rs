//! A small in-process Kubernetes API server on a loopback port, enough for a real
//! kube-runtime `Controller`: list and watch (with resourceVersion), get, create, replace,
//! merge / strategic / apply patches (with server-side-apply conflicts), the status
//! subresource, label and field selectors, Secrets, events.k8s.io Events and coordination
//! Leases.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

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

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    owners: HashMap<Key, HashMap<String, String>>,
    log: Vec<Change>,
    requests: Vec<String>,
}

struct ApiState {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
}

/// A running fake API server.
pub struct FakeApiServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<ApiState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
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

fn status_error(code: u16, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
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

fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                leaves(&format!("{prefix}/{k}"), v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
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

impl FakeApiServer {
    /// Starts an empty server.
    pub async fn start() -> Self {
        let (changes, _) = broadcast::channel(100_000);
        let state = Arc::new(ApiState {
            inner: Mutex::new(Inner::default()),
            changes,
        });
        let router = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { url, state, task }
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        braze_export_operator::http::install_crypto_provider();
        let config = kube::Config::new(self.url.parse().expect("url"));
        kube::Client::try_from(config).expect("client")
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
        self.state.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object as a client would (with watch events).
    pub fn put(&self, resource: &str, mut object: Value) -> Value {
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
        let mut inner = self.lock();
        let key = (resource.to_owned(), ns, name);
        if let Some(old) = inner.objects.get(&key).cloned() {
            let spec_changed = old.get("spec") != object.get("spec");
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1)
                + i64::from(spec_changed);
            for k in ["uid", "creationTimestamp"] {
                object["metadata"][k] = old["metadata"][k].clone();
            }
            object["metadata"]["generation"] = json!(generation);
            if object.get("status").is_none() && old.get("status").is_some() {
                object["status"] = old["status"].clone();
            }
        }
        store(&self.state, &mut inner, key, object)
    }

    /// A Secret with these string keys.
    pub fn put_secret(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        let data: Map<String, Value> = data
            .iter()
            .map(|(k, v)| ((*k).into(), json!(base64(v.as_bytes()))))
            .collect();
        self.put(SECRETS, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": data}));
    }

    /// Merge-patches an object (metadata, spec or status) as a client would.
    pub fn patch(&self, resource: &str, namespace: &str, name: &str, patch: Value) -> Value {
        let mut object = self.get(resource, namespace, name).expect("object exists");
        let old_spec = object.get("spec").cloned();
        merge(&mut object, &patch);
        let mut inner = self.lock();
        if object.get("spec") != old_spec.as_ref() {
            let g = object
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            object["metadata"]["generation"] = json!(g + 1);
        }
        store(
            &self.state,
            &mut inner,
            (resource.into(), namespace.into(), name.into()),
            object,
        )
    }

    /// Removes an object.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut inner = self.lock();
        remove(
            &self.state,
            &mut inner,
            (resource.to_owned(), namespace.to_owned(), name.to_owned()),
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
}

/// Removes an object and tells the watchers.
fn remove(state: &ApiState, inner: &mut Inner, key: Key) -> Option<Value> {
    let object = inner.objects.remove(&key)?;
    inner.rv += 1;
    let change = Change {
        rv: inner.rv,
        resource: key.0,
        namespace: key.1,
        kind: "DELETED",
        object: object.clone(),
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

async fn handle(
    State(state): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    state
        .inner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .requests
        .push(format!("{method} {uri}"));
    let Some(t) = parse_path(uri.path()) else {
        return status_error(404, "NotFound", format!("no route {}", uri.path()));
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
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
    match (method, &t.name) {
        (Method::GET, None)
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) =>
        {
            watch(&state, &t, &query)
        }
        (Method::GET, None) => list(&state, &t, &query),
        (Method::GET, Some(name)) => {
            let inner = state.inner.lock().unwrap_or_else(|e| e.into_inner());
            match inner.objects.get(&(
                t.resource.clone(),
                t.namespace.clone().unwrap_or_default(),
                name.clone(),
            )) {
                Some(o) => ok_json(o),
                None => status_error(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", kind_of(&t.resource)),
                ),
            }
        }
        (Method::POST, None) => write(
            &state,
            &t,
            body.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            body,
            "create",
            &query,
        ),
        (Method::PUT, Some(name)) => write(&state, &t, name.clone(), body, "replace", &query),
        (Method::PATCH, Some(name)) => {
            let kind = if content_type.contains("apply-patch") {
                "apply"
            } else {
                "merge"
            };
            write(&state, &t, name.clone(), body, kind, &query)
        }
        (Method::DELETE, Some(name)) => {
            let key = (
                t.resource.clone(),
                t.namespace.clone().unwrap_or_default(),
                name.clone(),
            );
            let mut inner = state.inner.lock().unwrap_or_else(|e| e.into_inner());
            match remove(&state, &mut inner, key) {
                Some(o) => ok_json(&o),
                None => status_error(404, "NotFound", format!("\"{name}\" not found")),
            }
        }
        (m, _) => status_error(
            405,
            "MethodNotAllowed",
            format!("{m} is not supported here"),
        ),
    }
}

fn write(
    state: &ApiState,
    t: &Target,
    name: String,
    body: Value,
    kind: &str,
    query: &HashMap<String, String>,
) -> Response {
    let ns = t.namespace.clone().unwrap_or_default();
    let key = (t.resource.clone(), ns, name.clone());
    let manager = query
        .get("fieldManager")
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let force = query.get("force").is_some_and(|f| f == "true");
    let mut inner = state.inner.lock().unwrap_or_else(|e| e.into_inner());
    let existing = inner.objects.get(&key).cloned();
    let has_status = t.resource == EXPORTS;
    let mut object = match (kind, existing) {
        ("create", Some(_)) => {
            return status_error(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind_of(&t.resource)),
            );
        }
        ("create", None) => body.clone(),
        ("replace", None) | ("merge", None) => {
            return status_error(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind_of(&t.resource)),
            );
        }
        (_, None) => Value::Object(Map::new()),
        (_, Some(o)) => o,
    };
    if kind == "apply" && !force {
        let mut touched = Vec::new();
        leaves("", &body, &mut touched);
        let owners = inner.owners.get(&key);
        for (path, value) in &touched {
            let owner = owners.and_then(|o| o.get(path));
            let current = object.pointer(path).filter(|v| !v.is_null());
            if owner.is_some_and(|o| *o != manager) && current.is_some() && current != Some(value) {
                return status_error(
                    409,
                    "Conflict",
                    format!(
                        "Apply failed with 1 conflict: conflict with \"{}\": {path}",
                        owner.expect("owner")
                    ),
                );
            }
        }
    }
    if matches!(kind, "apply" | "merge") {
        let mut touched = Vec::new();
        leaves("", &body, &mut touched);
        let owners = inner.owners.entry(key.clone()).or_default();
        for (path, value) in touched {
            if value.is_null() {
                // A removed field has no owner any more.
                owners.retain(|p, _| !(p == &path || p.starts_with(&format!("{path}/"))));
            } else {
                owners.insert(path, manager.clone());
            }
        }
    }
    let old_spec = object.get("spec").cloned();
    match kind {
        "replace" if t.status => {
            object["status"] = body.get("status").cloned().unwrap_or(Value::Null)
        }
        "replace" => {
            let status = object.get("status").cloned();
            object = body;
            if let (true, Some(s)) = (has_status, status) {
                object["status"] = s;
            }
        }
        "create" => {}
        _ if t.status => merge(
            &mut object,
            &json!({"status": body.get("status").cloned().unwrap_or(Value::Null)}),
        ),
        _ => {
            let mut patch = body;
            if has_status && let Some(p) = patch.as_object_mut() {
                p.remove("status");
            }
            merge(&mut object, &patch);
        }
    }
    if object.get("metadata").is_none() {
        object["metadata"] = json!({});
    }
    if kind != "create" && object.get("spec") != old_spec.as_ref() {
        let g = object
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        object["metadata"]["generation"] = json!(g + 1);
    }
    let stored = store(state, &mut inner, key, object);
    let code = if kind == "create" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        stored.to_string(),
    )
        .into_response()
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
    let inner = state.inner.lock().unwrap_or_else(|e| e.into_inner());
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

fn watch(state: &ApiState, t: &Target, query: &HashMap<String, String>) -> Response {
    let mut live = state.changes.subscribe();
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
    let selectors = Selectors::of(query);
    let target = Target {
        resource: t.resource.clone(),
        namespace: t.namespace.clone(),
        name: None,
        status: false,
    };
    let backlog: Vec<Change> = {
        let inner = state.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.log.iter().filter(|c| c.rv > since).cloned().collect()
    };
    let last_backlog = backlog.last().map_or(since, |c| c.rv);
    let line =
        |c: &Change| Bytes::from(format!("{}\n", json!({"type": c.kind, "object": c.object})));
    let replay: Vec<Result<Bytes, Infallible>> = backlog
        .iter()
        .filter(|c| visible(&c.resource, &c.namespace, &c.object, &target, &selectors))
        .map(|c| Ok(line(c)))
        .collect();
    let live = async_stream(move |tx| async move {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, live.recv()).await;
            match next {
                Ok(Ok(c))
                    if c.rv > last_backlog
                        && visible(&c.resource, &c.namespace, &c.object, &target, &selectors) =>
                {
                    if tx.send(Ok(line(&c))).await.is_err() {
                        break;
                    }
                }
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                _ => break,
            }
        }
    });
    let stream = futures_util::stream::iter(replay).chain(live);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
