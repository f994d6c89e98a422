//! Writes and server-side apply: the one write path ([`apply_write`]) that client requests
//! and the test-side helpers share. A write is checked (exists / not found, the media type,
//! the `uid` and `resourceVersion` preconditions), made (a create, a replace, an RFC 7386
//! merge patch, or a server-side apply with its conflicts and the removal of what its
//! manager no longer sets), kept to its scope (the main resource or the `/status`
//! subresource), admitted by the CRD, and stored, with the fields each manager owns. Nothing
//! new is created in a terminating namespace (`crate::namespaces`).

use std::collections::HashMap;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::admission::{Crd, FieldError, check_event};
use crate::storage::{
    ApiState, Inner, Key, api_version_of, finalizers, group_plural, kind_of, qualified_resource,
    remove, store,
};
use crate::{EVENTS, NAMESPACES, namespaces};

/// A write the server refused: the `Status` it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub code: u16,
    pub reason: String,
    pub message: String,
    /// `details` of the `Status` (with `causes` for a 422).
    pub(crate) details: Option<Box<Value>>,
}

impl Rejection {
    pub(crate) fn new(code: u16, reason: &str, message: String) -> Self {
        Self {
            code,
            reason: reason.to_owned(),
            message,
            details: None,
        }
    }

    /// The whole `Status` object the server answers.
    fn status(&self) -> Value {
        let mut status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code});
        if let Some(d) = &self.details {
            status["details"] = (**d).clone();
        }
        status
    }

    pub(crate) fn response(&self) -> Response {
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
pub(crate) struct Owner {
    pub(crate) manager: String,
    pub(crate) apply: bool,
}

impl Owner {
    fn new(manager: &str, apply: bool) -> Self {
        Self {
            manager: manager.to_owned(),
            apply,
        }
    }
}

/// What a write does with its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Create,
    Replace,
    Merge,
    Strategic,
    Apply,
}

/// Which part of the object a write may change (and admission validates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The main resource: everything but `status` (for a resource with a status subresource).
    Main,
    /// The `/status` subresource: only `status`.
    Status,
    /// A test-side helper: everything.
    Whole,
}

pub(crate) struct WriteRequest {
    pub(crate) resource: String,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) scope: Scope,
    pub(crate) op: Op,
    pub(crate) body: Value,
    pub(crate) manager: String,
    pub(crate) force: bool,
    /// Check `metadata.uid` and `metadata.resourceVersion` of the body.
    pub(crate) preconditions: bool,
    /// A request from a client (not a test-side helper): uids are the server's.
    pub(crate) from_client: bool,
    pub(crate) admission: bool,
}

/// The fields a write touches, as (JSON pointer, value).
type Leaves = Vec<(String, Value)>;

/// The fields each manager owns: JSON pointer -> owner.
type Owners = HashMap<String, Owner>;

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
fn leaves(prefix: &str, v: &Value, out: &mut Leaves) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                leaves(&format!("{prefix}/{}", escape_pointer(k)), v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

pub(crate) fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

pub(crate) fn unescape_pointer(token: &str) -> String {
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

fn scoped_leaves(v: &Value, scope: Scope, has_status: bool) -> Leaves {
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

/// 415 for a patch in a media type the server does not take (a strategic merge patch of a
/// custom resource; a JSON patch, which this fake does not implement), in the apiserver's
/// words for a custom resource.
pub(crate) fn unsupported_media_type() -> Rejection {
    Rejection::new(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".into(),
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
pub(crate) fn restore_out_of_scope(new: &mut Value, old: &Value, scope: Scope, has_status: bool) {
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
pub(crate) fn apply_write(
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
    check_request(&req, old.as_ref(), crd.as_deref())?;
    if old.is_none() && namespaces::terminating(inner, &req.namespace) {
        let (group, _) = group_plural(&req.resource);
        return Err(namespaces::refused_create(
            &qualified_resource(&req.resource),
            kind_of(&req.resource),
            &group,
            &req.name,
            &req.namespace,
        ));
    }
    let base = old.clone().unwrap_or_else(|| json!({"metadata": {}}));
    let mut owners = inner.owners.get(&key).cloned().unwrap_or_default();
    let mut object = match req.op {
        Op::Create => created(&req, has_status),
        Op::Replace => replaced(&req, &base, has_status),
        Op::Merge | Op::Strategic => {
            let mut o = base.clone();
            merge(&mut o, &scoped_patch(&req.body, req.scope, has_status));
            o
        }
        Op::Apply => applied(&req, &base, &mut owners, has_status)?,
    };
    if old.is_none() && req.resource == NAMESPACES {
        object = namespaces::created(object);
    }
    keep_identity(&mut object, old.as_ref());
    if req.op != Op::Apply {
        own_updated(&mut owners, &req, &object, old.as_ref(), has_status);
    }
    owners.retain(|p, _| object.pointer(p).is_some());
    check_finalizers(&req, &mut object, old.as_ref())?;
    if let (Some(crd), true) = (&crd, req.admission && !inner.no_admission) {
        object = crd.admit(object, old.as_ref(), req.scope, &req.name)?;
    }
    if req.resource == EVENTS {
        check_event(&req.name, &object)?;
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

/// What refuses a write before it is made: a create of an existing object or without a
/// name, a change of a missing one, a strategic merge patch of a custom resource, failed
/// preconditions, a PUT of a custom resource without a resourceVersion.
fn check_request(
    req: &WriteRequest,
    old: Option<&Value>,
    crd: Option<&Crd>,
) -> Result<(), Rejection> {
    match (req.op, old) {
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
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    kind_of(&req.resource)
                ),
            ));
        }
        (Op::Replace | Op::Merge | Op::Strategic, None) => {
            return Err(not_found(&req.resource, &req.name));
        }
        (Op::Apply, None) if req.scope == Scope::Status => {
            return Err(not_found(&req.resource, &req.name));
        }
        _ => {}
    }
    if crd.is_some() && req.op == Op::Strategic {
        return Err(unsupported_media_type());
    }
    if req.preconditions && req.op != Op::Create {
        // An apply that creates the object checks its preconditions against nothing.
        let nothing = json!({"metadata": {}});
        check_preconditions(req, &req.body, old.unwrap_or(&nothing))?;
    }
    if let (Some(crd), Op::Replace, true) = (crd, req.op, req.from_client)
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
    Ok(())
}

/// The object a create makes: the body without a resourceVersion (nor, from a client, a
/// uid), and without the status of a resource with a status subresource.
fn created(req: &WriteRequest, has_status: bool) -> Value {
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

/// The object a replace makes: the body, with what its scope may not change kept from `base`
/// (and, from a test-side helper without a status, the stored status).
fn replaced(req: &WriteRequest, base: &Value, has_status: bool) -> Value {
    let mut o = req.body.clone();
    if req.scope == Scope::Whole
        && o.get("status").is_none()
        && let Some(s) = base.get("status")
    {
        o["status"] = s.clone();
    }
    restore_out_of_scope(&mut o, base, req.scope, has_status);
    o
}

/// The object a server-side apply makes, and the fields its manager owns then: 409 on
/// fields another manager set to other values (unless forced), the fields this manager
/// applied before and omits now removed, the applied config merged in.
fn applied(
    req: &WriteRequest,
    base: &Value,
    owners: &mut Owners,
    has_status: bool,
) -> Result<Value, Rejection> {
    let touched = scoped_leaves(&req.body, req.scope, has_status);
    if !req.force {
        check_apply_conflicts(req, base, owners, &touched)?;
    }
    let mut o = base.clone();
    remove_omitted(req, &mut o, owners, &touched, has_status);
    merge(&mut o, &scoped_patch(&req.body, req.scope, has_status));
    for (path, value) in touched {
        if value.is_null() {
            owners.retain(|p, _| !under(p, &path));
        } else {
            owners.retain(|p, _| !under(p, &path) || *p == path);
            owners.insert(path, Owner::new(&req.manager, true));
        }
    }
    Ok(o)
}

/// 409 `Conflict` when an apply would change fields another manager set.
fn check_apply_conflicts(
    req: &WriteRequest,
    base: &Value,
    owners: &Owners,
    touched: &Leaves,
) -> Result<(), Rejection> {
    let mut conflicts = Vec::new();
    for (path, value) in touched {
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
    if conflicts.is_empty() {
        return Ok(());
    }
    Err(Rejection::new(
        409,
        "Conflict",
        format!(
            "Apply failed with {} conflict{}: {}",
            conflicts.len(),
            if conflicts.len() == 1 { "" } else { "s" },
            conflicts.join("\n")
        ),
    ))
}

/// Removes the fields this manager applied before and omits now (and the objects the
/// removal emptied, unless the applied config has them).
fn remove_omitted(
    req: &WriteRequest,
    o: &mut Value,
    owners: &mut Owners,
    touched: &Leaves,
    has_status: bool,
) {
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
        if remove_pointer(o, p).is_some() {
            let mut parent = p.rsplit_once('/').map(|(a, _)| a.to_owned());
            while let Some(a) = parent.filter(|a| !a.is_empty()) {
                let emptied = o
                    .pointer(&a)
                    .and_then(Value::as_object)
                    .is_some_and(Map::is_empty);
                if !emptied || req.body.pointer(&a).is_some() {
                    break;
                }
                remove_pointer(o, &a);
                parent = a.rsplit_once('/').map(|(b, _)| b.to_owned());
            }
        }
    }
}

/// Identity is the server's: preconditions were checked, they are not data.
fn keep_identity(object: &mut Value, old: Option<&Value>) {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    let Some(old) = old else { return };
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

/// An update (any write but an apply) owns the fields it changed.
fn own_updated(
    owners: &mut Owners,
    req: &WriteRequest,
    object: &Value,
    old: Option<&Value>,
    has_status: bool,
) {
    let mut new_leaves = scoped_leaves(object, req.scope, has_status);
    new_leaves.retain(|(p, v)| old.and_then(|o| o.pointer(p)) != Some(v));
    for (p, _) in new_leaves {
        owners.retain(|q, _| !under(q, &p) || *q == p);
        owners.insert(p, Owner::new(&req.manager, false));
    }
}

/// Drops an empty finalizer list (omitempty), and refuses new finalizers on an object being
/// deleted.
fn check_finalizers(
    req: &WriteRequest,
    object: &mut Value,
    old: Option<&Value>,
) -> Result<(), Rejection> {
    if object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && let Some(m) = object["metadata"].as_object_mut()
    {
        m.remove("finalizers");
    }
    let Some(old) = old.filter(|o| o.pointer("/metadata/deletionTimestamp").is_some()) else {
        return Ok(());
    };
    let before = finalizers(old);
    let added: Vec<String> = finalizers(object)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    if added.is_empty() {
        return Ok(());
    }
    Err(Rejection::new(
        422,
        "Invalid",
        format!(
            "{} \"{}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}",
            kind_of(&req.resource),
            req.name
        ),
    ))
}
