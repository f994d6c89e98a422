//! Namespaces and their deletion, as the apiserver and kube-controller-manager's namespace
//! controller do it: a namespace's DELETE puts it in `Terminating` (`deletionTimestamp`,
//! `status.phase: Terminating`); from then on nothing new may be created in it (403
//! `Forbidden`, in the NamespaceLifecycle admission plugin's words), while what is there can
//! still be read and written; every object of every kind in it is deleted at once (each
//! removed when its finalizers are gone), and the namespace is removed once it is empty.
//!
//! A namespace nobody created is there and `Active` (the tests create objects anywhere); a
//! DELETE of one creates it first, then terminates it.

use serde_json::{Value, json};

use crate::NAMESPACES;
use crate::storage::{ApiState, Inner, Key, delete_object, now, remove, store};
use crate::write::Rejection;

/// The namespace controller's finalizer, in `spec.finalizers`.
const KUBERNETES_FINALIZER: &str = "kubernetes";

fn key(name: &str) -> Key {
    (NAMESPACES.to_owned(), String::new(), name.to_owned())
}

/// What a create of a namespace stores: `spec.finalizers: [kubernetes]`, `status.phase:
/// Active`.
pub(crate) fn created(mut object: Value) -> Value {
    object["spec"]["finalizers"] = json!([KUBERNETES_FINALIZER]);
    object["status"] = json!({"phase": "Active"});
    object
}

/// Whether `namespace` is being terminated.
pub(crate) fn terminating(inner: &Inner, namespace: &str) -> bool {
    !namespace.is_empty()
        && inner
            .objects
            .get(&key(namespace))
            .is_some_and(|n| n.pointer("/metadata/deletionTimestamp").is_some())
}

/// The 403 a create in a terminating namespace gets (`resource` as the apiserver names it,
/// `brazeexports.looker-braze.dev`, `secrets`).
pub(crate) fn refused_create(
    resource: &str,
    kind: &str,
    group: &str,
    name: &str,
    namespace: &str,
) -> Rejection {
    let mut r = Rejection::new(
        403,
        "Forbidden",
        format!(
            "{resource} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated"
        ),
    );
    r.details = Some(Box::new(json!({
        "name": name,
        "group": group,
        "kind": kind,
        "causes": [{
            "reason": "NamespaceTerminating",
            "message": format!("namespace {namespace} is being terminated"),
            "field": "metadata.namespace",
        }],
    })));
    r
}

/// A namespace's DELETE: `Terminating`, then every object in it deleted at once (background
/// collection of what they own), then the namespace removed if nothing is left. Answers the
/// namespace as it is after that.
pub(crate) fn terminate(state: &ApiState, inner: &mut Inner, name: &str) -> Value {
    let k = key(name);
    let mut ns = inner.objects.get(&k).cloned().unwrap_or_else(|| {
        created(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
    });
    if ns.pointer("/metadata/deletionTimestamp").is_none() {
        ns["metadata"]["deletionTimestamp"] = now();
        ns["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        ns["status"]["phase"] = json!("Terminating");
        ns = store(state, inner, k, ns);
    }
    // Every kind at once, as the namespace controller does: nothing waits for anything else.
    let content: Vec<Key> = inner
        .objects
        .keys()
        .filter(|(_, namespace, _)| namespace == name)
        .cloned()
        .collect();
    for object in content {
        delete_object(state, inner, object, false);
    }
    finish(state, inner, name).unwrap_or(ns)
}

/// Removes a terminating namespace once nothing is left in it; the namespace while it stays.
pub(crate) fn finish(state: &ApiState, inner: &mut Inner, name: &str) -> Option<Value> {
    if !terminating(inner, name) {
        return None;
    }
    let k = key(name);
    if inner
        .objects
        .keys()
        .any(|(_, namespace, _)| namespace == name)
    {
        return inner.objects.get(&k).cloned();
    }
    remove(state, inner, k)
}
