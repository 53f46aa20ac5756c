//! Reading and validating the cluster manifest, as the API server and the
//! controller would: YAML, kind, apiVersion, the CRD's structural schema
//! and CEL rules (with the previously accepted object for transition
//! rules), then `Engine::validate`. Pure apart from reading the given files.

use std::path::Path;
use std::sync::Arc;

use crate::engine::{Engine, ValidatedCluster};
use crate::error::SpecError;
use crate::registry::EngineRegistry;
use crate::validate::check_against_crd;

/// A manifest that was rejected. Its `Display` is one line per error,
/// `<file>: <field>: <message>`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.lines().join("\n"))]
pub struct InvalidCluster {
    /// The file, as the user named it.
    pub file: String,
    /// Every error found.
    pub errors: Vec<SpecError>,
}

impl InvalidCluster {
    fn one(file: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            errors: vec![SpecError::new(field, message)],
        }
    }

    /// The error lines.
    pub fn lines(&self) -> Vec<String> {
        self.errors
            .iter()
            .map(|e| format!("{}: {}: {}", self.file, e.field, e.message))
            .collect()
    }
}

/// A manifest that passed every check.
#[derive(Clone)]
pub struct Accepted {
    /// The file's text, saved verbatim as `cluster.yaml`.
    pub text: String,
    /// Its engine.
    pub engine: Arc<dyn Engine>,
    /// The validated cluster.
    pub cluster: ValidatedCluster,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("kind", &self.engine.kind())
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// Parse one YAML document into a JSON object. Errors name the line and
/// column.
pub fn parse_yaml(file: &str, text: &str) -> Result<serde_json::Value, InvalidCluster> {
    let value: serde_json::Value = serde_yaml::from_str(text).map_err(|e| {
        let field = match e.location() {
            Some(l) => format!("line {}, column {}", l.line(), l.column()),
            None => "yaml".to_string(),
        };
        // serde_yaml embeds " at line L column C"; the field says it.
        let mut message = e.to_string();
        if let Some(l) = e.location() {
            message = message.replace(&format!(" at line {} column {}", l.line(), l.column()), "");
        }
        InvalidCluster::one(file, field, format!("invalid YAML: {message}"))
    })?;
    if !value.is_object() {
        return Err(InvalidCluster::one(
            file,
            "(document)",
            "expected one cluster object (a mapping with apiVersion, kind, metadata and spec)",
        ));
    }
    Ok(value)
}

/// Validate `text` (the contents of `file`) against the engines of
/// `registry`. `old` is the previously accepted object, if any, for CEL
/// transition rules. Every error of a stage is reported, not only the
/// first.
pub fn accept(
    registry: &EngineRegistry,
    file: &str,
    text: &str,
    old: Option<&serde_json::Value>,
) -> Result<Accepted, InvalidCluster> {
    let object = parse_yaml(file, text)?;
    let engine = engine_for(registry, file, &object)?;
    let mut errors = Vec::new();
    check_api_version(engine.as_ref(), &object, &mut errors);
    // Schema then CEL (transition rules against `old`), as the API server
    // does; `Engine::validate` then checks the rest.
    if let Err(crd_errors) = check_against_crd(&engine.crd(), &object, old) {
        errors.extend(crd_errors);
    }
    // The controller only sees objects the API server admitted, so the
    // engine's own checks run only on an object that passed the CRD's.
    if errors.is_empty() {
        match engine.validate(&object) {
            Ok(cluster) => {
                return Ok(Accepted {
                    text: text.to_string(),
                    engine,
                    cluster,
                });
            }
            Err(e) => errors.push(e),
        }
    }
    Err(InvalidCluster {
        file: file.to_string(),
        errors,
    })
}

fn engine_for(
    registry: &EngineRegistry,
    file: &str,
    object: &serde_json::Value,
) -> Result<Arc<dyn Engine>, InvalidCluster> {
    let served = registry.kinds().join(", ");
    let Some(kind) = object.get("kind").and_then(|k| k.as_str()) else {
        return Err(InvalidCluster::one(
            file,
            "kind",
            format!("is required; this binary serves {served}"),
        ));
    };
    registry.get(kind).ok_or_else(|| {
        InvalidCluster::one(
            file,
            "kind",
            format!("unknown kind {kind:?}; this binary serves {served}"),
        )
    })
}

/// `apiVersion` must be one the CRD serves, as the API server requires.
fn check_api_version(engine: &dyn Engine, object: &serde_json::Value, errors: &mut Vec<SpecError>) {
    let crd = engine.crd();
    let served: Vec<String> = crd
        .spec
        .versions
        .iter()
        .filter(|v| v.served)
        .map(|v| format!("{}/{}", crd.spec.group, v.name))
        .collect();
    match object.get("apiVersion").and_then(|v| v.as_str()) {
        Some(v) if served.iter().any(|s| s == v) => {}
        Some(v) => errors.push(SpecError::new(
            "apiVersion",
            format!(
                "{v:?} is not served for {}; use {}",
                engine.kind(),
                served.join(" or ")
            ),
        )),
        None => errors.push(SpecError::new(
            "apiVersion",
            format!("is required; use {}", served.join(" or ")),
        )),
    }
}

/// Kind and name of an object, as written (empty when missing).
fn identity(object: &serde_json::Value) -> (&str, &str) {
    let kind = object.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    let name = object
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    (kind, name)
}

/// Refuse a manifest for another cluster than the one the state directory
/// holds (`saved`, its `cluster.yaml`). A manifest without kind or name is
/// left to [`accept`] to report.
pub fn check_same_cluster(
    state_dir: &Path,
    saved: &serde_json::Value,
    new: &serde_json::Value,
) -> anyhow::Result<()> {
    let (saved_kind, saved_name) = identity(saved);
    let (kind, name) = identity(new);
    if kind.is_empty() || name.is_empty() {
        return Ok(());
    }
    if (saved_kind, saved_name) != (kind, name) {
        anyhow::bail!(
            "{} holds {saved_kind} {saved_name:?}, not {kind} {name:?}; use another --state-dir, or delete that cluster with `stratum local down --purge --state-dir {}`",
            state_dir.display(),
            state_dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::common::ClusterSpecCommon;
    use crate::engine::{
        ClusterMeta, Election, EngineManifest, ObservedMember, ReplicationModel, Routing, Topology,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResource;
    use kube::CustomResourceExt;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    /// A test kind built from the shared blocks, so the shared CEL rules
    /// (storage shrink) apply.
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "test.stratum.dev",
        version = "v1",
        kind = "FakeCluster",
        namespaced
    )]
    pub struct FakeClusterSpec {
        #[serde(flatten)]
        pub common: ClusterSpecCommon,
    }

    /// An engine for [`FakeCluster`]: instances must be at least one.
    pub struct FakeEngine;

    #[async_trait::async_trait]
    impl Engine for FakeEngine {
        fn kind(&self) -> &'static str {
            "FakeCluster"
        }
        fn crd(&self) -> CustomResourceDefinition {
            FakeCluster::crd()
        }
        fn validate(&self, object: &serde_json::Value) -> Result<ValidatedCluster, SpecError> {
            let meta: ClusterMeta = crate::validate::cluster_meta(self.kind(), object)?;
            let spec = object.get("spec").cloned().unwrap_or_default();
            let typed: FakeClusterSpec = crate::validate::from_json(spec.clone(), "spec")?;
            if typed.common.instances < 1 {
                return Err(SpecError::new("spec.instances", "must be at least 1"));
            }
            Ok(ValidatedCluster {
                meta,
                common: typed.common,
                image: "fake".into(),
                spec,
            })
        }
        fn topology(&self, c: &ValidatedCluster, _: Option<&str>) -> Topology {
            Topology {
                model: ReplicationModel::PrimaryReplica,
                update_order: c.instance_names(),
                voters: vec![],
            }
        }
        fn manifest(&self, _: &ValidatedCluster) -> EngineManifest {
            EngineManifest {
                ports: vec![],
                data_mount_path: "/data".into(),
                extra_volumes: vec![],
                run_as_user: None,
                bin_dir: None,
                env: Default::default(),
                generated_secrets: vec!["app-password".into()],
            }
        }
        fn instance_settings(&self, _: &ValidatedCluster) -> Result<serde_json::Value, SpecError> {
            Ok(serde_json::json!({}))
        }
        fn elect(&self, _: &ValidatedCluster, _: &[ObservedMember]) -> Election {
            Election::Wait {
                reason: "fake".into(),
                retry_after: std::time::Duration::from_secs(1),
            }
        }
        fn route(&self, _: &[ObservedMember]) -> Routing {
            Routing::default()
        }
    }

    pub fn registry() -> EngineRegistry {
        EngineRegistry::new().with(Arc::new(FakeEngine))
    }

    pub fn manifest(instances: &str, size: &str) -> String {
        format!(
            "apiVersion: test.stratum.dev/v1\nkind: FakeCluster\nmetadata:\n  name: simple-fake\nspec:\n  instances: {instances}\n  storage:\n    size: {size}\n"
        )
    }

    fn fields(e: &InvalidCluster) -> Vec<&str> {
        e.errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn accepts_a_valid_manifest() {
        let a = accept(&registry(), "c.yaml", &manifest("1", "1Gi"), None).unwrap();
        assert_eq!(a.cluster.meta.name, "simple-fake");
        assert_eq!(a.cluster.instance_names(), ["simple-fake-0"]);
    }

    #[test]
    fn yaml_errors_name_file_line_and_column() {
        let e = accept(&registry(), "c.yaml", "kind: FakeCluster\nspec: [\n", None).unwrap_err();
        let line = e.to_string();
        assert!(line.starts_with("c.yaml: line "), "{line}");
        assert!(line.contains("column"), "{line}");
        assert!(!line.contains(" at line"), "{line}");
        let e = accept(&registry(), "c.yaml", "- a\n", None).unwrap_err();
        assert!(e.to_string().contains("expected one cluster object"), "{e}");
    }

    #[test]
    fn unknown_kind_lists_served_kinds() {
        let text = manifest("1", "1Gi").replace("kind: FakeCluster", "kind: Nope");
        let e = accept(&registry(), "c.yaml", &text, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.yaml: kind: unknown kind \"Nope\"; this binary serves FakeCluster"
        );
    }

    #[test]
    fn engine_and_type_errors_name_the_field() {
        let e = accept(&registry(), "c.yaml", &manifest("0", "1Gi"), None).unwrap_err();
        assert_eq!(fields(&e), ["spec.instances"]);
        let e = accept(&registry(), "c.yaml", &manifest("\"three\"", "1Gi"), None).unwrap_err();
        assert_eq!(fields(&e), ["spec.instances"]);
        assert!(e.to_string().starts_with("c.yaml: spec.instances: "), "{e}");
        let text = manifest("1", "1Gi").replace("test.stratum.dev/v1", "v1");
        let e = accept(&registry(), "c.yaml", &text, None).unwrap_err();
        assert_eq!(fields(&e), ["apiVersion"]);
    }

    #[test]
    fn cel_transition_rules_use_the_saved_object() {
        let old = parse_yaml("saved", &manifest("1", "2Gi")).unwrap();
        let e = accept(&registry(), "c.yaml", &manifest("1", "1Gi"), Some(&old)).unwrap_err();
        assert!(
            e.errors
                .iter()
                .any(|e| e.field.contains("storage") && e.message.contains("cannot be decreased")),
            "{e}"
        );
        accept(&registry(), "c.yaml", &manifest("1", "3Gi"), Some(&old)).unwrap();
        // Without a saved object the shrink is a create, not a shrink.
        accept(&registry(), "c.yaml", &manifest("1", "1Gi"), None).unwrap();
    }

    #[test]
    fn a_state_dir_keeps_its_cluster() {
        let saved = parse_yaml("s", &manifest("1", "1Gi")).unwrap();
        let other = parse_yaml("s", &manifest("1", "1Gi").replace("simple-fake", "other")).unwrap();
        let err = check_same_cluster(Path::new("/s"), &saved, &other)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FakeCluster \"simple-fake\", not FakeCluster \"other\""),
            "{err}"
        );
        check_same_cluster(Path::new("/s"), &saved, &saved).unwrap();
        let nameless = parse_yaml("s", "kind: FakeCluster\n").unwrap();
        check_same_cluster(Path::new("/s"), &saved, &nameless).unwrap();
    }
}
