//! mongod configuration from `spec.additionalMongodConfig`: dotted keys and
//! nested objects normalised into one nested document, options the
//! operator owns rejected by path. Pure, no IO.

use std::collections::BTreeMap;

use operator_core::error::SpecError;
use serde_json::{Map, Value};

/// The spec field, for error paths.
const FIELD: &str = "spec.additionalMongodConfig";

/// mongod options the operator sets itself, with the reason shown to the
/// user. A user option is rejected when its path is one of these or lies
/// beneath one.
pub const OPERATOR_OWNED: &[(&str, &str)] = &[
    ("net.port", "the operator assigns the port (27017 in pods)"),
    ("net.bindIp", "the operator sets the listen address"),
    ("net.bindIpAll", "the operator sets the listen address"),
    ("replication.replSetName", "set spec.replicaSetName instead"),
    (
        "storage.dbPath",
        "the data directory is on the instance's volume",
    ),
    (
        "security.keyFile",
        "the operator generates the replica set key file",
    ),
    (
        "processManagement.fork",
        "the instance manager supervises mongod in the foreground",
    ),
];

/// Every leaf of the config as (dotted path, value). Objects are walked;
/// arrays and scalars are leaves. Keys may themselves be dotted.
pub fn leaves(config: &BTreeMap<String, Value>) -> Vec<(String, Value)> {
    fn walk(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    walk(&format!("{prefix}.{k}"), v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut out = Vec::new();
    for (k, v) in config {
        walk(k, v, &mut out);
    }
    out
}

/// Check the user's config and expand it into one nested document.
/// Errors name the option path under `spec.additionalMongodConfig`: an
/// operator-owned option, an empty path segment, or one option set twice
/// (by a dotted key and a nested object) with different values.
pub fn normalize(config: &BTreeMap<String, Value>) -> Result<Map<String, Value>, SpecError> {
    let mut out = Map::new();
    for (path, value) in leaves(config) {
        let err = |message: String| SpecError::new(format!("{FIELD}.{path}"), message);
        if path.split('.').any(str::is_empty) {
            return Err(err(format!(
                "{path:?} has an empty segment; write options as a.b.c or as nested objects"
            )));
        }
        if let Some((owned, why)) = OPERATOR_OWNED
            .iter()
            .find(|(o, _)| path == *o || path.starts_with(&format!("{o}.")))
        {
            return Err(err(format!(
                "{owned} is managed by the operator ({why}); remove it"
            )));
        }
        insert(&mut out, &path, value).map_err(err)?;
    }
    Ok(out)
}

/// Put `value` at the dotted `path`, refusing to overwrite a different
/// value or to nest below a scalar.
fn insert(root: &mut Map<String, Value>, path: &str, value: Value) -> Result<(), String> {
    let mut segments: Vec<&str> = path.split('.').collect();
    let last = segments.pop().unwrap_or_default();
    let mut node = root;
    for (i, seg) in segments.iter().enumerate() {
        let entry = node
            .entry(seg.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        node = match entry {
            Value::Object(map) => map,
            _ => {
                return Err(format!(
                    "{} is set to a value, so {path} cannot be set below it",
                    segments[..=i].join(".")
                ));
            }
        };
    }
    match node.get(last) {
        Some(existing) if *existing != value => Err(format!(
            "{path} is set twice with different values ({existing} and {value})"
        )),
        _ => {
            node.insert(last.to_string(), value);
            Ok(())
        }
    }
}

/// The mongod settings shared by every member: the user's options
/// (normalised) plus the replica set name. Per-instance options (port,
/// bind address, paths, key file) are added by the instance side.
pub fn merged(
    config: &BTreeMap<String, Value>,
    replica_set_name: &str,
) -> Result<Value, SpecError> {
    let mut out = normalize(config)?;
    insert(
        &mut out,
        "replication.replSetName",
        Value::String(replica_set_name.to_string()),
    )
    .map_err(|m| SpecError::new(FIELD, m))?;
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn dotted_and_nested_keys_merge() {
        let c = cfg(json!({
            "storage.wiredTiger.engineConfig.journalCompressor": "zlib",
            "storage": {"wiredTiger": {"engineConfig": {"cacheSizeGB": 1}}},
            "setParameter": {"enableLocalhostAuthBypass": false},
            "net.compression.compressors": "snappy,zstd",
        }));
        let m = merged(&c, "rs0").unwrap();
        assert_eq!(
            m,
            json!({
                "storage": {"wiredTiger": {"engineConfig": {"journalCompressor": "zlib", "cacheSizeGB": 1}}},
                "setParameter": {"enableLocalhostAuthBypass": false},
                "net": {"compression": {"compressors": "snappy,zstd"}},
                "replication": {"replSetName": "rs0"},
            })
        );
    }

    #[test]
    fn rejects_owned_options_by_path() {
        for (c, field) in [
            (json!({"net": {"port": 27018}}), "net.port"),
            (json!({"net.bindIp": "0.0.0.0"}), "net.bindIp"),
            (
                json!({"replication": {"replSetName": "x"}}),
                "replication.replSetName",
            ),
            (
                json!({"storage": {"dbPath": "/x", "engine": "wiredTiger"}}),
                "storage.dbPath",
            ),
            (json!({"security.keyFile": "/k"}), "security.keyFile"),
            (
                json!({"processManagement": {"fork": true}}),
                "processManagement.fork",
            ),
        ] {
            let err = normalize(&cfg(c)).unwrap_err();
            assert_eq!(err.field, format!("spec.additionalMongodConfig.{field}"));
            assert!(err.message.contains(field), "{err}");
            assert!(err.message.contains("managed by the operator"), "{err}");
        }
    }

    #[test]
    fn rejects_conflicts_and_empty_segments() {
        let err = normalize(&cfg(json!({"a.b": 1, "a": {"b": 2}}))).unwrap_err();
        assert!(err.message.contains("set twice"), "{err}");
        let err = normalize(&cfg(json!({"a": 1, "a.b": 2}))).unwrap_err();
        assert!(err.message.contains("cannot be set below it"), "{err}");
        let err = normalize(&cfg(json!({"a..b": 1}))).unwrap_err();
        assert_eq!(err.field, "spec.additionalMongodConfig.a..b");
        // The same value twice is fine.
        normalize(&cfg(json!({"a.b": 1, "a": {"b": 1}}))).unwrap();
    }

    #[test]
    fn leaves_keep_arrays_and_empty_objects() {
        let l = leaves(&cfg(json!({"x": [1, 2], "y": {}})));
        assert_eq!(
            l,
            vec![
                ("x".to_string(), json!([1, 2])),
                ("y".to_string(), json!({}))
            ]
        );
    }
}
