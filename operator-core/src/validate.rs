//! Validation helpers: pure, no client. Typed deserialization that names the
//! failing field, the CRD's CEL rules evaluated client-side (so the local
//! runtime rejects what the API server would), and metadata checks.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;

use crate::engine::ClusterMeta;
use crate::error::SpecError;

/// Deserialize `value` into `T`; on failure the error names the JSON path
/// below `root` (e.g. `spec.storage.size`).
pub fn from_json<T: DeserializeOwned>(
    value: serde_json::Value,
    root: &str,
) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = match (root.is_empty(), path.as_str()) {
            (_, ".") => root.to_string(),
            (true, p) => p.to_string(),
            (false, p) => format!("{root}.{p}"),
        };
        let message = e.into_inner().to_string();
        SpecError::new(field, message)
    })
}

/// Evaluate the CRD's OpenAPI schema CEL rules (`x-kubernetes-validations`)
/// against an object, as the API server does on create (`old == None`) or
/// update. Returns every violation, each naming its field.
pub fn check_cel(
    crd: &CustomResourceDefinition,
    object: &serde_json::Value,
    old: Option<&serde_json::Value>,
) -> Result<(), Vec<SpecError>> {
    let Some(schema) = storage_schema(crd) else {
        return Ok(());
    };
    let Err(errors) = kube::core::cel::Validator::new().validate(&schema, object, old) else {
        return Ok(());
    };
    Err(errors
        .into_vec()
        .into_iter()
        .map(|e| {
            let field = if e.field_path.is_empty() {
                "spec".to_string()
            } else {
                e.field_path.clone()
            };
            SpecError::new(field, e.message.clone())
        })
        .collect())
}

/// Check an object against the CRD's structural OpenAPI schema as the API
/// server does before CEL: types, required fields, enums, numeric bounds,
/// string lengths and patterns. Unlike the API server, which silently
/// prunes them, unknown fields are reported (they are usually typos). Every
/// error names its field path (`spec.storage.size`).
pub fn check_schema(
    crd: &CustomResourceDefinition,
    object: &serde_json::Value,
) -> Result<(), Vec<SpecError>> {
    let Some(schema) = storage_schema(crd) else {
        return Ok(());
    };
    let mut errors = Vec::new();
    // Only the user's parts: apiVersion/kind/metadata are the API server's.
    if let (Some(props), Some(obj)) = (schema.get("properties"), object.as_object()) {
        for key in ["spec"] {
            match (props.get(key), obj.get(key)) {
                (Some(s), Some(v)) => check_value(s, v, key, &mut errors),
                (Some(_), None) if required(&schema, key) => {
                    errors.push(SpecError::new(key, "is required"))
                }
                _ => {}
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Schema checks then CEL rules: everything the API server enforces on a
/// create (`old == None`) or update.
pub fn check_against_crd(
    crd: &CustomResourceDefinition,
    object: &serde_json::Value,
    old: Option<&serde_json::Value>,
) -> Result<(), Vec<SpecError>> {
    check_schema(crd, object)?;
    check_cel(crd, object, old)
}

fn storage_schema(crd: &CustomResourceDefinition) -> Option<serde_json::Value> {
    crd.spec
        .versions
        .iter()
        .find(|v| v.storage)
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
}

fn required(schema: &serde_json::Value, key: &str) -> bool {
    schema
        .get("required")
        .and_then(|r| r.as_array())
        .is_some_and(|r| r.iter().any(|k| k == key))
}

fn type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn check_value(
    schema: &serde_json::Value,
    value: &serde_json::Value,
    path: &str,
    errors: &mut Vec<SpecError>,
) {
    use serde_json::Value;
    let flag = |k: &str| schema.get(k).and_then(Value::as_bool).unwrap_or(false);
    if value.is_null() {
        if !flag("nullable") {
            errors.push(SpecError::new(
                path,
                "must not be null; remove the field or give it a value",
            ));
        }
        return;
    }
    if flag("x-kubernetes-int-or-string") {
        if !(value.is_string() || type_name(value) == "integer") {
            errors.push(SpecError::new(
                path,
                format!("must be an integer or a string; got {}", type_name(value)),
            ));
        }
        return;
    }
    let preserve = flag("x-kubernetes-preserve-unknown-fields");
    if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(value);
        let ok = actual == expected || (expected == "number" && actual == "integer");
        if !ok {
            errors.push(SpecError::new(
                path,
                format!("must be of type {expected}; got {actual} {value}"),
            ));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let list = options
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        errors.push(SpecError::new(
            path,
            format!("must be one of {list}; got {value}"),
        ));
    }
    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or_default();
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                errors.push(SpecError::new(
                    path,
                    format!("must be at least {min}; got {n}"),
                ));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                errors.push(SpecError::new(
                    path,
                    format!("must be at most {max}; got {n}"),
                ));
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                errors.push(SpecError::new(
                    path,
                    format!("must be at least {min} characters"),
                ));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                errors.push(SpecError::new(
                    path,
                    format!("must be at most {max} characters"),
                ));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
                && let Ok(re) = regex::Regex::new(pattern)
                && !re.is_match(s)
            {
                errors.push(SpecError::new(
                    path,
                    format!("{s:?} does not match the pattern {pattern}"),
                ));
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_value(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(req) = schema.get("required").and_then(Value::as_array) {
                for key in req.iter().filter_map(Value::as_str) {
                    if !map.contains_key(key) {
                        errors.push(SpecError::new(format!("{path}.{key}"), "is required"));
                    }
                }
            }
            for (key, v) in map {
                let child = format!("{path}.{key}");
                match (
                    props.and_then(|p| p.get(key)),
                    schema.get("additionalProperties"),
                ) {
                    (Some(s), _) => check_value(s, v, &child, errors),
                    (None, Some(Value::Object(s))) => {
                        check_value(&Value::Object(s.clone()), v, &child, errors)
                    }
                    (None, Some(Value::Bool(true))) => {}
                    _ if preserve => {}
                    _ => {
                        let known = props
                            .map(|p| p.keys().cloned().collect::<Vec<_>>().join(", "))
                            .unwrap_or_default();
                        errors.push(SpecError::new(
                            child,
                            format!(
                                "unknown field; check the spelling (known fields here: {known})"
                            ),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
}

/// The common first steps of every engine's `Engine::validate`: the
/// object's `kind` is `kind`, its metadata is valid, it passes the CRD's
/// schema and CEL rules (as on create), and its `spec` deserializes into
/// `T`. Returns the identity, the typed spec and the raw `spec` JSON.
pub fn typed_cluster<T: DeserializeOwned>(
    kind: &str,
    crd: &CustomResourceDefinition,
    object: &serde_json::Value,
) -> Result<(ClusterMeta, T, serde_json::Value), SpecError> {
    if let Some(found) = object.get("kind").and_then(|k| k.as_str())
        && found != kind
    {
        return Err(SpecError::new(
            "kind",
            format!("expected {kind}, got {found}"),
        ));
    }
    let meta = cluster_meta(kind, object)?;
    // The API server has run these already; the local runtime has not.
    check_against_crd(crd, object, None).map_err(SpecError::combine)?;
    let raw = object
        .get("spec")
        .cloned()
        .ok_or_else(|| SpecError::new("spec", "is required"))?;
    let spec = from_json(raw.clone(), "spec")?;
    Ok((meta, spec, raw))
}

/// Check `metadata` of a cluster object and extract its identity. Names must
/// be DNS labels short enough for the `-rw`/`-ro` Services and pod names.
pub fn cluster_meta(kind: &str, object: &serde_json::Value) -> Result<ClusterMeta, SpecError> {
    let meta = object
        .get("metadata")
        .ok_or_else(|| SpecError::new("metadata", "is required"))?;
    let name = meta
        .get("name")
        .and_then(|v| v.as_str())
        .ok_or_else(|| SpecError::new("metadata.name", "is required"))?;
    check_dns_label(name).map_err(|m| SpecError::new("metadata.name", m))?;
    let namespace = meta
        .get("namespace")
        .and_then(|v| v.as_str())
        .unwrap_or("default")
        .to_string();
    Ok(ClusterMeta {
        kind: kind.to_string(),
        name: name.to_string(),
        namespace,
        uid: meta.get("uid").and_then(|v| v.as_str()).map(str::to_string),
        generation: meta.get("generation").and_then(|v| v.as_i64()),
    })
}

/// Longest cluster name: pod names `<name>-<ordinal>` and Service names
/// `<name>-headless` must stay DNS labels (63) and StatefulSet pods add a
/// controller-revision-hash label of `<name>-<10 chars>`.
pub const MAX_CLUSTER_NAME: usize = 50;

fn check_dns_label(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
        || name.as_bytes()[0].is_ascii_digit()
    {
        return Err(format!(
            "{name:?} must be a DNS label: lower-case letters, digits and '-', starting with a letter"
        ));
    }
    if name.len() > MAX_CLUSTER_NAME {
        return Err(format!(
            "{name:?} is {} characters; use at most {MAX_CLUSTER_NAME} so that pod and Service names fit",
            name.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct S {
        storage: Inner,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        size: String,
    }

    #[test]
    fn from_json_names_nested_field() {
        let err = from_json::<S>(json!({"storage": {"size": 5}}), "spec").unwrap_err();
        assert_eq!(err.field, "spec.storage.size");
        assert!(err.message.contains("expected a string"), "{err}");
    }

    #[test]
    fn meta_rejects_bad_names() {
        let long = "a".repeat(51);
        for bad in ["Upper", "-x", "1abc", "a_b", long.as_str()] {
            let err = cluster_meta("K", &json!({"metadata": {"name": bad}})).unwrap_err();
            assert_eq!(err.field, "metadata.name");
        }
        let m = cluster_meta("K", &json!({"metadata": {"name": "simple-pg"}})).unwrap();
        assert_eq!(m.namespace, "default");
    }
}
