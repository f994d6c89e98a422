//! A small in-process Kubernetes API server on a loopback port, enough for a real
//! kube-runtime `Controller`: list and watch (with resourceVersion), get, create, replace,
//! merge / strategic / apply patches (with server-side-apply conflicts and field removal), the
//! status subresource, label and field selectors, finalizers (a DELETE only sets
//! `deletionTimestamp` until the last one is removed), garbage collection of owned objects
//! (foreground or background), Secrets, events.k8s.io Events and coordination Leases.
//!
//! It is as hostile as a real apiserver where a controller can trip:
//! - `metadata.uid` and `metadata.resourceVersion` in a PUT or PATCH body are preconditions
//!   (409 `Conflict` when they differ from the stored object);
//! - a server-side apply removes the fields its manager set before and now omits;
//! - the custom resource of the CRD given to [`FakeApiServer::start_with_crd`] goes through
//!   admission built from the CRD's own `openAPIV3Schema`: pruning, defaulting, validation
//!   (422 `Invalid` in the apiserver's words, with ratcheting of unchanged values) and the CEL
//!   rules (`x-kubernetes-validations`, evaluated by kube's `cel` feature); a PUT of it must
//!   carry a resourceVersion; strategic merge patches of it are refused (415), as for every
//!   custom resource, and JSON patches (RFC 6902) of anything, which this fake does not take;
//! - knobs: [`FakeApiServer::set_watch_lag`] (a busy watch cache),
//!   [`FakeApiServer::expire_watches`] (410 Gone, forcing a relist),
//!   [`FakeApiServer::partitionable_client`] (a network partition for one client),
//!   [`FakeApiServer::client_with_rules`] (a client held to RBAC rules: 403 otherwise),
//!   [`FakeApiServer::set_crd`] (another CRD version), [`FakeApiServer::put_unchecked`] and
//!   [`FakeApiServer::refuse_status_writes`] (one export's status writes refused, 403 or 422);
//! - an events.k8s.io Event whose `note` is over 1,024 bytes is refused (422 `Invalid`), as
//!   the apiserver's own validation does;
//! - a namespace's deletion ([`FakeApiServer::delete_namespace`], or a DELETE of
//!   `/api/v1/namespaces/NAME`) is the namespace controller's: `Terminating`, creates in it
//!   refused (403), every object in it deleted at once, the namespace gone once empty.
//!
//! Where things are:
//! - this file: the public API, [`FakeApiServer`] with its test-side helpers and knobs;
//! - `routing`: listeners and clients, URL paths, RBAC, the partition, request dispatch;
//! - `write`: every write (create, replace, patches, server-side apply), preconditions and
//!   field ownership;
//! - `watch`: list and watch, with label and field selectors;
//! - `storage`: the stored objects and their change log, deletion with finalizers and
//!   garbage collection;
//! - `namespaces`: namespaces, their termination and the namespace controller;
//! - `admission`: the CRD's schema (pruning, defaulting, validation) and its CEL rules; the
//!   Event note's limit.

mod admission;
mod namespaces;
mod routing;
mod storage;
mod watch;
mod write;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use admission::Crd;
use routing::{Conn, bind, client_for};
use storage::{ApiState, Inner, delete_object};
use write::{Op, Scope, WriteRequest, apply_write};

pub use routing::{Partition, Rule};
pub use write::{Rejection, merge};

/// The BrazeExport resource path.
pub const EXPORTS: &str = "looker-braze.dev/v1alpha1/brazeexports";
/// Core Secrets.
pub const SECRETS: &str = "v1/secrets";
/// events.k8s.io Events.
pub const EVENTS: &str = "events.k8s.io/v1/events";
/// Leases.
pub const LEASES: &str = "coordination.k8s.io/v1/leases";
/// Namespaces (cluster-scoped: stored, read and deleted with the namespace `""`).
pub const NAMESPACES: &str = "v1/namespaces";

/// The field manager the test-side helpers ([`FakeApiServer::put`], [`FakeApiServer::patch`])
/// write as.
const TEST_MANAGER: &str = "test";

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

impl FakeApiServer {
    /// Starts an empty server admitting the custom resource of this CustomResourceDefinition
    /// (JSON) by its schema and CEL rules.
    pub async fn start_with_crd(crd: Value) -> Self {
        let (changes, _) = broadcast::channel(100_000);
        let (expiry, _) = tokio::sync::watch::channel(0);
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
        let (cut, gate) = tokio::sync::watch::channel(false);
        let url = self.listen(Conn {
            state: Arc::clone(&self.state),
            gate: Some(gate),
            rules: None,
        });
        (client_for(&url), Partition { cut })
    }

    /// A kube client held to these RBAC rules, as a ServiceAccount is: any other request
    /// gets 403 `Forbidden` (and is recorded, see [`FakeApiServer::denied`]).
    pub fn client_with_rules(&self, rules: Vec<Rule>) -> kube::Client {
        let url = self.listen(Conn {
            state: Arc::clone(&self.state),
            gate: None,
            rules: Some(Arc::new(rules)),
        });
        client_for(&url)
    }

    /// A listener of its own for `conn`, stopped with the server; its URL.
    fn listen(&self, conn: Conn) -> String {
        let (url, task) = bind(conn);
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        url
    }

    /// The requests RBAC refused, as `verb group/resource` (and ` name` for one object).
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

    fn key_of(resource: &str, object: &Value) -> (String, String) {
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(if resource == NAMESPACES {
                ""
            } else {
                "default"
            })
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
        let (ns, name) = Self::key_of(resource, &object);
        self.helper_write(resource, ns, name, Op::Create, object, true)
    }

    /// Stores an object without admission (as an older or newer CRD may have let it in).
    pub fn put_unchecked(&self, resource: &str, object: Value) -> Value {
        let (ns, name) = Self::key_of(resource, &object);
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
    /// through admission, and this panics if it refuses.
    pub fn patch(&self, resource: &str, namespace: &str, name: &str, patch: Value) -> Value {
        self.helper_write(
            resource,
            namespace.into(),
            name.into(),
            Op::Merge,
            patch,
            true,
        )
        .unwrap_or_else(|r| panic!("the fake apiserver refused the patch: {r}"))
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

    /// Deletes namespace `name` as `kubectl delete namespace` would, and answers at once (the
    /// namespace controller's work goes on as finalizers are removed): it is `Terminating`,
    /// nothing new may be created in it, every object in it is deleted, and it is removed once
    /// empty. A namespace never created is created first.
    pub fn delete_namespace(&self, name: &str) {
        self.delete(NAMESPACES, "", name);
    }

    /// Every object removed so far (deletions completed), oldest first: its resource and the
    /// object as it was last stored.
    pub fn removed(&self) -> Vec<(String, Value)> {
        self.lock()
            .log
            .iter()
            .filter(|c| c.kind == "DELETED")
            .map(|c| (c.resource.clone(), c.object.clone()))
            .collect()
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

    /// From now on the status writes (`/status`, any method) of BrazeExport `namespace/name`
    /// from clients are refused with `code`: 403 `Forbidden` (RBAC changed under the
    /// operator) or 422 `Invalid` (the object cannot take the status). The refused writes
    /// are still recorded ([`FakeApiServer::writes`]).
    pub fn refuse_status_writes(&self, namespace: &str, name: &str, code: u16) {
        assert!(matches!(code, 403 | 422), "403 or 422, not {code}");
        self.lock()
            .refused_status
            .insert((namespace.to_owned(), name.to_owned()), code);
    }

    /// From now on `namespace` holds at most `max` objects of `resource` (`v1/secrets`), as
    /// a ResourceQuota's `count/secrets` does: a create beyond it is refused with 403 and
    /// the API server's words (`exceeded quota`).
    pub fn set_quota(&self, namespace: &str, resource: &str, max: usize) {
        self.lock()
            .quotas
            .insert((namespace.to_owned(), resource.to_owned()), max);
    }

    /// Lifts [`FakeApiServer::refuse_status_writes`] for `namespace/name`.
    pub fn accept_status_writes(&self, namespace: &str, name: &str) {
        self.lock()
            .refused_status
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Benchmarks: no schema admission and no record of write bodies (the fake's own CEL
    /// evaluation and bookkeeping are test machinery, not the controller's cost).
    pub fn lightweight(&self) {
        self.lock().no_admission = true;
    }
}
