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
    let Some(schema) = crd
        .spec
        .versions
        .iter()
        .find(|v| v.storage)
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
    else {
        return Ok(());
    };
    let schema = serde_json::to_value(schema).unwrap_or_default();
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
