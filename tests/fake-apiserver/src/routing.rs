//! Routing and RBAC: the loopback listeners and the kube clients for them, a network
//! [`Partition`] for one client, RBAC [`Rule`]s (403 `Forbidden` otherwise), the URL paths
//! (`/api/v1/...`, `/apis/group/version/...`), and the dispatch of a request to a write
//! (`crate::write`), a list or watch (`crate::watch`), a GET or a DELETE.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::storage::{ApiState, Inner, delete_object, qualified_resource};
use crate::watch::{field_selector_error, list, watch_stream};
use crate::write::{Op, Rejection, Scope, WriteRequest, apply_write, unsupported_media_type};
use crate::{EXPORTS, Write};

/// Routes requests to the shared state; `gate` is set on a partitionable client's listener,
/// `rules` on a client held to RBAC rules.
#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) state: Arc<ApiState>,
    pub(crate) gate: Option<watch::Receiver<bool>>,
    pub(crate) rules: Option<Arc<Vec<Rule>>>,
}

/// A network partition between one client (from
/// [`FakeApiServer::partitionable_client`](crate::FakeApiServer::partitionable_client)) and
/// the server.
pub struct Partition {
    pub(crate) cut: watch::Sender<bool>,
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

/// What a URL path names: a resource collection, or one object (or its status).
#[derive(Clone)]
pub(crate) struct Target {
    /// `group/version/plural`.
    pub(crate) resource: String,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    /// The `/status` subresource.
    pub(crate) status: bool,
}

pub(crate) fn status_error(code: u16, reason: &str, message: String) -> Response {
    Rejection::new(code, reason, message).response()
}

pub(crate) fn ok_json(v: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Whether a list or watch query asks for a watch.
pub(crate) fn is_watch(query: &HashMap<String, String>) -> bool {
    matches!(query.get("watch").map(String::as_str), Some("true" | "1"))
}

/// The RBAC verb, group and resource of a request.
fn rbac_request(
    method: &Method,
    t: &Target,
    query: &HashMap<String, String>,
) -> (String, String, String) {
    let verb = match (method, &t.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if is_watch(query) => "watch",
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

/// A listener on a free loopback port serving `conn`: its URL and task.
pub(crate) fn bind(conn: Conn) -> (String, tokio::task::JoinHandle<()>) {
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

/// A kube client for a listener's URL.
pub(crate) fn client_for(url: &str) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::new(url.parse().expect("url"));
    kube::Client::try_from(config).expect("client")
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

fn parse_query(uri: &Uri) -> HashMap<String, String> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// 403 `Forbidden` in the apiserver's words when no rule allows the request (recorded for
/// [`FakeApiServer::denied`](crate::FakeApiServer::denied)).
fn forbidden(state: &ApiState, rules: &[Rule], method: &Method, uri: &Uri) -> Option<Response> {
    let t = parse_path(uri.path())?;
    let (verb, group, resource) = rbac_request(method, &t, &parse_query(uri));
    if rules
        .iter()
        .any(|r| r.allows(&group, &resource, &verb, t.name.as_deref()))
    {
        return None;
    }
    state.lock().denied.push(match t.name.as_deref() {
        Some(name) => format!("{verb} {group}/{resource} {name}"),
        None => format!("{verb} {group}/{resource}"),
    });
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

/// Every request of every listener: RBAC, the partition gate, then [`serve`].
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

/// A request as [`serve`] parsed it.
struct Request {
    method: Method,
    target: Target,
    /// The raw query string.
    raw_query: String,
    query: HashMap<String, String>,
    content_type: String,
    /// The JSON body (null when empty).
    body: Value,
    /// `Accept: …;as=PartialObjectMetadata` (or `…List`): a GET of an object or a list answers
    /// the objects' metadata alone, as the real apiserver does (a Secret's data never leaves
    /// it).
    metadata_only: bool,
}

/// Parses a request: 404 for a path that names no resource, 400 for a body that is not JSON
/// or a field selector the apiserver does not support.
fn parse_request(
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Request, Rejection> {
    let query = parse_query(uri);
    let Some(target) = parse_path(uri.path()) else {
        return Err(Rejection::new(
            404,
            "NotFound",
            format!("no route {}", uri.path()),
        ));
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .map_err(|e| Rejection::new(400, "BadRequest", format!("the body is not JSON: {e}")))?
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if method == Method::GET
        && target.name.is_none()
        && let Some(e) = query
            .get("fieldSelector")
            .and_then(|f| field_selector_error(f))
    {
        return Err(Rejection::new(400, "BadRequest", e));
    }
    Ok(Request {
        method,
        target,
        raw_query: uri.query().unwrap_or("").to_owned(),
        query,
        content_type,
        body,
        metadata_only: asks_metadata_only(headers),
    })
}

fn asks_metadata_only(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadata"))
}

/// The answer to a metadata-only GET: `PartialObjectMetadata` with the object's metadata.
pub(crate) fn partial_metadata(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object["metadata"],
    })
}

/// One request, answered from the shared state. A metadata-only read is recorded with
/// ` (metadata)` after it.
fn serve(state: &ApiState, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let marker = if asks_metadata_only(&headers) {
        " (metadata)"
    } else {
        ""
    };
    state
        .lock()
        .requests
        .push(format!("{method} {uri}{marker}"));
    match parse_request(method, &uri, &headers, &body) {
        Err(refused) => refused.response(),
        Ok(req) => match (&req.method, &req.target.name) {
            (&Method::POST, None) | (&Method::PUT | &Method::PATCH, Some(_)) => {
                serve_write(state, req)
            }
            _ => serve_read_or_delete(state, req),
        },
    }
}

/// The write a PATCH asks for by its media type (`None`: one the fake does not take).
fn patch_op(content_type: &str) -> Option<Op> {
    if content_type.contains("apply-patch") {
        Some(Op::Apply)
    } else if content_type.contains("strategic-merge-patch") {
        Some(Op::Strategic)
    } else if content_type.contains("merge-patch") {
        Some(Op::Merge)
    } else {
        None
    }
}

/// The answer to a status write that
/// [`FakeApiServer::refuse_status_writes`](crate::FakeApiServer::refuse_status_writes)
/// refuses: 403 as RBAC words it (a Role changed), or 422 as admission does (the object
/// cannot take the status).
fn refused_status_write(code: u16, namespace: &str, name: &str) -> Rejection {
    if code == 403 {
        return Rejection::new(
            403,
            "Forbidden",
            format!(
                "brazeexports.looker-braze.dev \"{name}\" is forbidden: User \"system:serviceaccount:operators:braze-export-operator\" cannot patch resource \"brazeexports/status\" in API group \"looker-braze.dev\" in the namespace \"{namespace}\""
            ),
        );
    }
    Rejection::new(
        422,
        "Invalid",
        format!(
            "BrazeExport.looker-braze.dev \"{name}\" is invalid: status: Invalid value: \"object\": refused by the test (refuse_status_writes)"
        ),
    )
}

/// The answer to a create beyond the namespace's quota of the resource
/// ([`FakeApiServer::set_quota`](crate::FakeApiServer::set_quota)), worded as the quota
/// admission plugin does.
fn over_quota(inner: &Inner, resource: &str, namespace: &str, name: &str) -> Option<Rejection> {
    let max = *inner
        .quotas
        .get(&(namespace.to_owned(), resource.to_owned()))?;
    let used = inner
        .objects
        .keys()
        .filter(|(r, ns, _)| r == resource && ns == namespace)
        .count();
    let plural = resource.rsplit('/').next().unwrap_or(resource);
    (used >= max).then(|| {
        Rejection::new(
            403,
            "Forbidden",
            format!(
                "{plural} \"{name}\" is forbidden: exceeded quota: test-quota, requested: count/{plural}=1, used: count/{plural}={used}, limited: count/{plural}={max}"
            ),
        )
    })
}

/// A POST, PUT or PATCH: recorded (see [`FakeApiServer::writes`](crate::FakeApiServer::writes)),
/// its options checked, then written.
fn serve_write(state: &ApiState, req: Request) -> Response {
    let t = req.target;
    let namespace = t.namespace.clone().unwrap_or_default();
    let name = t.name.clone().unwrap_or_else(|| {
        req.body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    });
    let manager = req.query.get("fieldManager").cloned();
    let force = req.query.get("force").is_some_and(|f| f == "true");
    let mut inner = state.lock();
    if !inner.no_admission {
        inner.writes.push(Write {
            method: req.method.to_string(),
            resource: t.resource.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
            status: t.status,
            content_type: req.content_type.clone(),
            query: req.raw_query.clone(),
            field_manager: manager.clone(),
            force,
            body: req.body.clone(),
        });
    }
    if t.status
        && t.resource == EXPORTS
        && let Some(code) = inner.refused_status.get(&(namespace.clone(), name.clone()))
    {
        return refused_status_write(*code, &namespace, &name).response();
    }
    if req.method == Method::POST
        && let Some(refused) = over_quota(&inner, &t.resource, &namespace, &name)
    {
        return refused.response();
    }
    let op = match req.method {
        Method::POST => Op::Create,
        Method::PUT => Op::Replace,
        _ => match patch_op(&req.content_type) {
            Some(op) => op,
            None => return unsupported_media_type().response(),
        },
    };
    let options_error = if op == Op::Apply && manager.is_none() {
        Some("fieldManager: Required value: is required for apply patch")
    } else if req.method == Method::PATCH && op != Op::Apply && req.query.contains_key("force") {
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
            resource: t.resource,
            namespace,
            name,
            scope: if t.status { Scope::Status } else { Scope::Main },
            op,
            body: req.body,
            manager: manager.unwrap_or_else(|| "unknown".into()),
            force,
            preconditions: true,
            from_client: true,
            admission: true,
        },
    );
    match result {
        Ok((code, object)) => (
            code,
            [(header::CONTENT_TYPE, "application/json")],
            object.to_string(),
        )
            .into_response(),
        Err(rejection) => rejection.response(),
    }
}

/// A GET (of an object, a list or a watch) or a DELETE; 405 for anything else.
fn serve_read_or_delete(state: &ApiState, req: Request) -> Response {
    let t = &req.target;
    let namespace = t.namespace.clone().unwrap_or_default();
    let not_found = |name: &str| {
        status_error(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified_resource(&t.resource)),
        )
    };
    match (&req.method, &t.name) {
        (&Method::GET, None) if is_watch(&req.query) => watch_stream(state, t, &req.query),
        (&Method::GET, None) => list(state, t, &req.query, req.metadata_only),
        (&Method::GET, Some(name)) => {
            let inner = state.lock();
            match inner
                .objects
                .get(&(t.resource.clone(), namespace, name.clone()))
            {
                Some(o) if req.metadata_only => ok_json(&partial_metadata(o)),
                Some(o) => ok_json(o),
                None => not_found(name),
            }
        }
        (&Method::DELETE, Some(name)) => {
            let key = (t.resource.clone(), namespace, name.clone());
            let foreground = req.body["propagationPolicy"] == "Foreground";
            let mut inner = state.lock();
            match delete_object(state, &mut inner, key, foreground) {
                Some(o) => ok_json(&o),
                None => not_found(name),
            }
        }
        (m, _) => status_error(
            405,
            "MethodNotAllowed",
            format!("{m} is not supported here"),
        ),
    }
}

/// A stream fed by a task through a channel.
pub(crate) fn channel_stream<T, F, Fut>(
    f: F,
) -> impl futures_util::Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(f(tx));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
