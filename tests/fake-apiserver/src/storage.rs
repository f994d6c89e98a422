//! Storage and garbage collection: the stored objects (keyed by resource, namespace and
//! name), the resourceVersion counter and the change log that watches replay; storing and
//! removing an object (each a watch event); a DELETE, which only marks an object with
//! finalizers (`deletionTimestamp`) until the last one is removed; and the garbage collector,
//! which deletes what an object owns (`ownerReferences`), before it (foreground) or after it
//! (background). A namespace's deletion is `namespaces`'.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::admission::Crd;
use crate::write::Owner;
use crate::{NAMESPACES, Write, namespaces};

/// (resource, namespace, name); resource is `group/version/plural` (`v1/secrets` for core).
pub(crate) type Key = (String, String, String);

/// One watch event in the making: a stored or removed object at a resourceVersion.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) resource: String,
    pub(crate) namespace: String,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub(crate) kind: &'static str,
    pub(crate) object: Value,
    /// When watchers may see it (the write's time plus the watch lag then in force).
    pub(crate) due: Instant,
}

/// Everything the server holds, behind one lock.
#[derive(Default)]
pub(crate) struct Inner {
    pub(crate) rv: u64,
    pub(crate) objects: BTreeMap<Key, Value>,
    /// Field path (`/spec/braze/batchSize`; lists are atomic) -> its manager.
    pub(crate) owners: HashMap<Key, HashMap<String, Owner>>,
    pub(crate) log: Vec<Change>,
    pub(crate) requests: Vec<String>,
    pub(crate) lists: HashMap<String, usize>,
    pub(crate) writes: Vec<Write>,
    pub(crate) watch_lag: Duration,
    /// The resourceVersion of the last `expire_watches` (0: never).
    pub(crate) expired_at: u64,
    pub(crate) crd: Option<Arc<Crd>>,
    /// Benchmarks: skip schema admission and write records.
    pub(crate) no_admission: bool,
    /// Requests refused by RBAC.
    pub(crate) denied: Vec<String>,
    /// (namespace, name) of BrazeExports whose status writes are refused, with the code
    /// (403 or 422); see `FakeApiServer::refuse_status_writes`.
    pub(crate) refused_status: HashMap<(String, String), u16>,
    /// (namespace, resource) -> how many objects of it the namespace may hold (a
    /// ResourceQuota's `count/<resource>`); see `FakeApiServer::set_quota`.
    pub(crate) quotas: HashMap<(String, String), usize>,
}

/// The state every listener shares.
pub(crate) struct ApiState {
    pub(crate) inner: Mutex<Inner>,
    pub(crate) changes: broadcast::Sender<Change>,
    /// Bumped by `expire_watches`: every open watch ends with 410 Gone.
    pub(crate) expiry: watch::Sender<u64>,
}

impl ApiState {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) fn kind_of(resource: &str) -> &'static str {
    match resource.rsplit('/').next().unwrap_or_default() {
        "brazeexports" => "BrazeExport",
        "secrets" => "Secret",
        "events" => "Event",
        "leases" => "Lease",
        "namespaces" => "Namespace",
        _ => "Unknown",
    }
}

pub(crate) fn api_version_of(resource: &str) -> String {
    resource
        .rsplit_once('/')
        .map(|(gv, _)| gv.to_owned())
        .unwrap_or_default()
}

/// (group, plural) of a resource path; the group is empty for core resources.
pub(crate) fn group_plural(resource: &str) -> (String, String) {
    let parts: Vec<&str> = resource.split('/').collect();
    match parts.as_slice() {
        [group, _, plural] => ((*group).to_owned(), (*plural).to_owned()),
        [_, plural] => (String::new(), (*plural).to_owned()),
        _ => (String::new(), resource.to_owned()),
    }
}

/// `brazeexports.looker-braze.dev`, `secrets`: how the apiserver names a resource in errors.
pub(crate) fn qualified_resource(resource: &str) -> String {
    match group_plural(resource) {
        (g, p) if g.is_empty() => p,
        (g, p) => format!("{p}.{g}"),
    }
}

/// Now, to the second, as metadata timestamps are written.
pub(crate) fn now() -> Value {
    json!(
        jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap()
            .to_string()
    )
}

pub(crate) fn finalizers(object: &Value) -> Vec<String> {
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
pub(crate) fn delete_object(
    state: &ApiState,
    inner: &mut Inner,
    key: Key,
    foreground: bool,
) -> Option<Value> {
    if key.0 == NAMESPACES {
        return Some(namespaces::terminate(state, inner, &key.2));
    }
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
    object["metadata"]["deletionTimestamp"] = now();
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

/// Removes an object and tells the watchers; then the garbage collector deletes what it
/// owned, and a terminating namespace goes with its last object.
pub(crate) fn remove(state: &ApiState, inner: &mut Inner, key: Key) -> Option<Value> {
    let mut object = inner.objects.remove(&key)?;
    inner.owners.remove(&key);
    inner.rv += 1;
    object["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    let (resource, namespace, _) = key;
    let change = Change {
        rv: inner.rv,
        resource,
        namespace: namespace.clone(),
        kind: "DELETED",
        object: object.clone(),
        due: Instant::now() + inner.watch_lag,
    };
    inner.log.push(change.clone());
    let _ = state.changes.send(change);
    for dependent in dependents(inner, &object["metadata"]["uid"]) {
        delete_object(state, inner, dependent, false);
    }
    namespaces::finish(state, inner, &namespace);
    Some(object)
}

/// Stores an object at the next resourceVersion (the server's metadata filled in) and tells
/// the watchers.
pub(crate) fn store(state: &ApiState, inner: &mut Inner, key: Key, mut object: Value) -> Value {
    inner.rv += 1;
    let rv = inner.rv;
    let existed = inner.objects.contains_key(&key);
    object["apiVersion"] = json!(api_version_of(&key.0));
    object["kind"] = json!(kind_of(&key.0));
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    let meta = object["metadata"].as_object_mut().expect("metadata");
    if key.1.is_empty() {
        // Cluster-scoped (a Namespace).
        meta.remove("namespace");
    } else {
        meta.insert("namespace".into(), json!(key.1));
    }
    meta.insert("name".into(), json!(key.2));
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    meta.entry("uid")
        .or_insert_with(|| json!(format!("uid-{rv}")));
    meta.entry("creationTimestamp").or_insert_with(now);
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
