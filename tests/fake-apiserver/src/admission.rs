//! Admission of the custom resource, built from its CRD's `openAPIV3Schema` as the
//! apiserver runs it: pruning of unknown fields, defaulting, OpenAPI validation and the CEL
//! rules (`x-kubernetes-validations`, evaluated by kube's `cel` feature), each error in the
//! apiserver's words (`field.Error`), with ratcheting of unchanged values. A write admits
//! only what its scope may change (the main resource or the `/status` subresource). And the
//! one rule of the built-in validation a controller trips on: an events.k8s.io Event's `note`
//! is at most 1 KiB ([`check_event`]).

use kube::core::cel::{CompiledSchema, ErrorKind, ValidationErrors, Validator, compile_schema};
use serde_json::{Value, json};

use crate::write::{Rejection, Scope, escape_pointer, restore_out_of_scope, unescape_pointer};

/// A CRD's admission: structural schema (pruning, defaulting, validation) and CEL rules.
pub(crate) struct Crd {
    group: String,
    kind: String,
    /// `group/version/plural`.
    pub(crate) resource: String,
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
    pub(crate) fn new(crd: &Value) -> Self {
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

    /// 422 `Invalid` listing these errors.
    pub(crate) fn invalid(&self, name: &str, errors: Vec<FieldError>) -> Rejection {
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
    pub(crate) fn admit(
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
pub(crate) struct FieldError {
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

    pub(crate) fn invalid_raw(path: &str, value: &str, detail: &str) -> Self {
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
    if !validate_type(schema, v, path, errors) {
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        errors.push(FieldError::not_supported(path, v, allowed));
    }
    if let Some(n) = v.as_f64() {
        validate_number(schema, v, n, path, errors);
    }
    if let Some(s) = v.as_str() {
        validate_string(schema, v, s, path, errors);
    }
    if let Some(items) = v.as_array() {
        validate_array(schema, v, items, path, errors);
    }
    if let Some(m) = v.as_object() {
        validate_object(schema, m, path, errors);
    }
}

/// Null (unless nullable) and the type; false when the value has no more to check.
fn validate_type(schema: &Value, v: &Value, path: &str, errors: &mut Vec<FieldError>) -> bool {
    if v.is_null() {
        if !flag(schema, "nullable") && schema.get("type").is_some() {
            errors.push(FieldError::type_invalid(
                path,
                v,
                schema["type"].as_str().unwrap_or("object"),
            ));
        }
        return false;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(is_integer(v) || v.is_string()) {
            errors.push(FieldError::type_invalid(path, v, "integer,string"));
            return false;
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
            return false;
        }
    }
    true
}

/// `maximum`, `minimum` (either exclusive) and `multipleOf`.
fn validate_number(schema: &Value, v: &Value, n: f64, path: &str, errors: &mut Vec<FieldError>) {
    let shown = shown_path(path);
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

/// `maxLength`, `minLength` and `pattern`.
fn validate_string(schema: &Value, v: &Value, s: &str, path: &str, errors: &mut Vec<FieldError>) {
    let shown = shown_path(path);
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

/// `maxItems`, `minItems`, the items, and `x-kubernetes-list-type`.
fn validate_array(
    schema: &Value,
    v: &Value,
    items: &[Value],
    path: &str,
    errors: &mut Vec<FieldError>,
) {
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
            &format!(
                "{} in body should have at least {min} items",
                shown_path(path)
            ),
        ));
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate(item_schema, item, &format!("{path}[{i}]"), errors);
        }
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => validate_list_map(schema, items, path, errors),
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

/// A list of type `map`: no two items with the same `x-kubernetes-list-map-keys`.
fn validate_list_map(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
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
            let shown: Vec<String> = key.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
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

/// `required`, the properties, and `additionalProperties`.
fn validate_object(
    schema: &Value,
    m: &serde_json::Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
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

/// The apiserver's limit on an events.k8s.io Event's `note`, in bytes (`NoteLengthLimit`).
pub(crate) const EVENT_NOTE_MAX_BYTES: usize = 1024;

/// An events.k8s.io Event as the apiserver validates it on create and update: a `note` over
/// [`EVENT_NOTE_MAX_BYTES`] bytes (of UTF-8, not characters) is 422 `Invalid`, in its words.
pub(crate) fn check_event(name: &str, event: &Value) -> Result<(), Rejection> {
    let Some(note) = event.get("note").and_then(Value::as_str) else {
        return Ok(());
    };
    if note.len() <= EVENT_NOTE_MAX_BYTES {
        return Ok(());
    }
    let e = FieldError::too_long("note", EVENT_NOTE_MAX_BYTES as u64);
    let mut r = Rejection::new(
        422,
        "Invalid",
        format!("Event.events.k8s.io \"{name}\" is invalid: {e}"),
    );
    r.details = Some(Box::new(json!({
        "name": name,
        "group": "events.k8s.io",
        "kind": "Event",
        "causes": [{"reason": e.reason, "message": e.body, "field": e.path}],
    })));
    Err(r)
}
