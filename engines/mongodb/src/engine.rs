//! [`MongoEngine`]: the operator side of the MongoDB engine (validation,
//! topology, pod pieces, instance settings, routing; elections are native).
//! Pure, no IO; there is no instance driver yet, so `instances` shows as an
//! unsupported capability.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use operator_core::api::common::PodManagementPolicy;
use operator_core::engine::{
    Election, Engine, EngineManifest, EnginePort, ObservedMember, ReplicationModel, Routing,
    Topology, ValidatedCluster,
};
use operator_core::error::SpecError;
use operator_core::validate::typed_cluster;

use crate::api::{MongoCluster, MongoClusterSpec};
use crate::settings::{MongoInstanceSettings, secret_keys};
use crate::{mongod, replset};

/// The cluster kind.
pub const KIND: &str = "MongoCluster";
/// mongod port.
pub const PORT_MONGODB: u16 = 27017;
/// Where the data volume is mounted (the official image's data directory).
pub const DATA_MOUNT_PATH: &str = "/data/db";
/// UID/GID of the `mongodb` user in the official `mongo` image.
pub const RUN_AS_USER: i64 = 999;

static CRD: LazyLock<CustomResourceDefinition> = LazyLock::new(MongoCluster::crd);

/// The MongoDB replica set engine. Stateless: build it with
/// `Arc::new(MongoEngine)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MongoEngine;

/// Names of the arbiters, `<cluster>-arbiter-<n>`. They vote but are not
/// data instances, so they are not in `ValidatedCluster::instance_names`.
pub fn arbiter_names(cluster: &ValidatedCluster, arbiters: i32) -> Vec<String> {
    (0..arbiters.max(0))
        .map(|i| format!("{}-arbiter-{i}", cluster.meta.name))
        .collect()
}

/// Check a MongoCluster spec beyond its CRD schema and CEL rules.
fn check_spec(spec: &MongoClusterSpec) -> Result<(), SpecError> {
    let v = &spec.version;
    let version_ok = !v.is_empty()
        && v.split('.').count() <= 3
        && v.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !version_ok {
        return Err(SpecError::new(
            "spec.version",
            format!("{v:?} must be a version such as \"7.0\" or \"7.0.12\""),
        ));
    }
    if let Some(name) = &spec.replica_set_name {
        let ok = name.len() <= 63
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok {
            return Err(SpecError::new(
                "spec.replicaSetName",
                format!(
                    "{name:?} must start with a letter or digit and use only letters, digits, '_', '.' and '-' (at most 63)"
                ),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, user) in spec.users.iter().enumerate() {
        let field = |f: &str| format!("spec.users[{i}].{f}");
        if user.name.is_empty() {
            return Err(SpecError::new(field("name"), "must not be empty"));
        }
        if !seen.insert((user.db.as_str(), user.name.as_str())) {
            return Err(SpecError::new(
                field("name"),
                format!("user {} in database {} is listed twice", user.name, user.db),
            ));
        }
        if user.password_secret_ref.name.is_empty() {
            return Err(SpecError::new(
                field("passwordSecretRef.name"),
                "must name the Secret holding the user's password",
            ));
        }
        if user.roles.is_empty() {
            return Err(SpecError::new(
                field("roles"),
                format!(
                    "give user {} at least one role, e.g. {{name: readWrite, db: app}}",
                    user.name
                ),
            ));
        }
    }
    mongod::normalize(&spec.additional_mongod_config)?;
    Ok(())
}

impl MongoEngine {
    fn spec(cluster: &ValidatedCluster) -> Result<MongoClusterSpec, SpecError> {
        cluster.engine_spec()
    }
}

impl Engine for MongoEngine {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn crd(&self) -> CustomResourceDefinition {
        CRD.clone()
    }

    /// `Parallel`: a replica set needs a majority of members up to elect a primary;
    /// `OrderedReady` would wait for ordinal 0 to be ready first.
    fn default_pod_management_policy(&self) -> PodManagementPolicy {
        PodManagementPolicy::Parallel
    }

    /// Metadata, then the CRD's CEL rules (as on create: arbiters fewer
    /// than instances, an odd number of voters, at most 7), then typed
    /// deserialization, then [`check_spec`]: version, replica set name,
    /// users, and operator-owned options in `additionalMongodConfig`.
    fn validate(&self, object: &serde_json::Value) -> Result<ValidatedCluster, SpecError> {
        let (meta, spec, _): (_, MongoClusterSpec, _) = typed_cluster(KIND, &CRD, object)?;
        check_spec(&spec)?;
        let spec_json = serde_json::to_value(&spec)
            .map_err(|e| SpecError::new("spec", format!("failed to serialize: {e}")))?;
        Ok(ValidatedCluster {
            meta,
            image: spec.effective_image(),
            common: spec.common,
            spec: spec_json,
        })
    }

    /// A replica set with a native election: every data member and every
    /// arbiter votes; the primary is restarted last.
    fn topology(&self, cluster: &ValidatedCluster, current_primary: Option<&str>) -> Topology {
        let names = cluster.instance_names();
        let arbiters = Self::spec(cluster).map(|s| s.arbiters).unwrap_or(0);
        let mut voters = names.clone();
        voters.extend(arbiter_names(cluster, arbiters));
        Topology {
            model: ReplicationModel::NativeElection,
            update_order: replset::update_order(&names, current_primary),
            voters,
        }
    }

    fn manifest(&self, _cluster: &ValidatedCluster) -> EngineManifest {
        EngineManifest {
            ports: vec![EnginePort {
                name: "mongodb".to_string(),
                port: PORT_MONGODB,
                client: true,
            }],
            data_mount_path: DATA_MOUNT_PATH.to_string(),
            extra_volumes: Vec::new(),
            run_as_user: Some(RUN_AS_USER),
            bin_dir: None,
            env: BTreeMap::new(),
            generated_secrets: [
                secret_keys::KEYFILE,
                secret_keys::ADMIN_PASSWORD,
                secret_keys::API_TOKEN,
            ]
            .map(str::to_string)
            .to_vec(),
        }
    }

    fn instance_settings(
        &self,
        cluster: &ValidatedCluster,
    ) -> Result<serde_json::Value, SpecError> {
        let spec = Self::spec(cluster)?;
        let repl_set_name = spec.effective_replica_set_name(&cluster.meta.name);
        let settings = MongoInstanceSettings {
            version: spec.version.clone(),
            mongod_config: mongod::merged(&spec.additional_mongod_config, &repl_set_name)?,
            repl_set_name,
        };
        serde_json::to_value(settings).map_err(|e| {
            SpecError::new(
                "spec",
                format!("failed to serialize instance settings: {e}"),
            )
        })
    }

    /// MongoDB elects its primary itself.
    fn elect(&self, _cluster: &ValidatedCluster, _members: &[ObservedMember]) -> Election {
        Election::Native
    }

    /// See [`replset::route`].
    fn route(&self, members: &[ObservedMember]) -> Routing {
        replset::route(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MongoClusterType;
    use operator_core::engine::capability;
    use serde_json::json;

    const SIMPLE: &str = r#"
apiVersion: stratum.dev/v1alpha1
kind: MongoCluster
metadata:
  name: simple-rs
  namespace: db
spec:
  instances: 3
  storage:
    size: 1Gi
"#;

    fn object(yaml: &str) -> serde_json::Value {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn with_spec(patch: &str) -> serde_json::Value {
        let mut obj = object(SIMPLE);
        let patch: serde_json::Value = serde_yaml::from_str(patch).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            obj["spec"][k] = v.clone();
        }
        obj
    }

    fn rejected(patch: &str) -> SpecError {
        MongoEngine.validate(&with_spec(patch)).unwrap_err()
    }

    #[test]
    fn crd_has_names_columns_and_cel_rules() {
        let crd = MongoEngine.crd();
        assert_eq!(crd.spec.group, "stratum.dev");
        assert_eq!(crd.spec.names.kind, "MongoCluster");
        assert_eq!(crd.spec.names.short_names, Some(vec!["mgc".to_string()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["stratum".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Ready", "Primary", "Phase", "Age"]);
        let schema = serde_json::to_value(v.schema.as_ref().unwrap()).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        let rules: Vec<&str> = spec["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["rule"].as_str().unwrap())
            .collect();
        assert_eq!(rules.len(), 4, "{rules:?}");
        assert!(rules[0].contains("self.instances >= 1"));
        assert!(rules[1].contains("self.arbiters < self.instances"));
        assert!(rules[2].contains("unsafeFlags.replsetSize"));
        assert!(rules[3].contains("<= 7"));
        let extra = &spec["properties"]["additionalMongodConfig"];
        assert_eq!(extra["type"], "object");
        assert_eq!(extra["x-kubernetes-preserve-unknown-fields"], true);
        assert!(extra["description"].as_str().unwrap().contains("net.port"));
        for field in [
            "version",
            "type",
            "replicaSetName",
            "users",
            "arbiters",
            "unsafeFlags",
            "bootstrap",
        ] {
            let d = spec["properties"][field]["description"]
                .as_str()
                .unwrap_or("");
            assert!(!d.is_empty(), "spec.{field} has no description");
        }
    }

    #[test]
    fn accepts_minimal_fixture_with_defaults() {
        let c = MongoEngine.validate(&object(SIMPLE)).unwrap();
        assert_eq!(c.meta.name, "simple-rs");
        assert_eq!(c.meta.kind, "MongoCluster");
        assert_eq!(c.image, "mongo:7.0");
        let spec: MongoClusterSpec = c.engine_spec().unwrap();
        assert_eq!(spec.type_, MongoClusterType::ReplicaSet);
        assert_eq!(spec.arbiters, 0);
        let s: MongoInstanceSettings =
            serde_json::from_value(MongoEngine.instance_settings(&c).unwrap()).unwrap();
        assert_eq!(s.repl_set_name, "simple-rs");
        assert_eq!(s.version, "7.0");
        assert_eq!(
            s.mongod_config,
            json!({"replication": {"replSetName": "simple-rs"}})
        );
    }

    #[test]
    fn accepts_full_fixture() {
        let obj = object(
            r#"
apiVersion: stratum.dev/v1alpha1
kind: MongoCluster
metadata:
  name: simple-rs
spec:
  instances: 4
  arbiters: 1
  version: "7.0.12"
  type: ReplicaSet
  replicaSetName: rs0
  storage:
    size: 1Gi
  users:
    - name: app
      db: admin
      passwordSecretRef:
        name: app-password
      roles:
        - {name: readWrite, db: app}
      scramCredentialsSecretName: app-scram
    - name: app
      db: reporting
      passwordSecretRef: {name: report-password, key: pw}
      roles: [{name: read, db: reporting}]
  additionalMongodConfig:
    storage.wiredTiger.engineConfig.journalCompressor: zlib
    setParameter:
      enableLocalhostAuthBypass: false
"#,
        );
        let c = MongoEngine.validate(&obj).unwrap();
        assert_eq!(c.image, "mongo:7.0.12");
        let spec: MongoClusterSpec = c.engine_spec().unwrap();
        assert_eq!(spec.users[0].password_secret_ref.key, "password");
        assert_eq!(spec.users[1].password_secret_ref.key, "pw");
        let s = MongoEngine.instance_settings(&c).unwrap();
        assert_eq!(
            s,
            json!({
                "version": "7.0.12",
                "replSetName": "rs0",
                "mongodConfig": {
                    "storage": {"wiredTiger": {"engineConfig": {"journalCompressor": "zlib"}}},
                    "setParameter": {"enableLocalhostAuthBypass": false},
                    "replication": {"replSetName": "rs0"},
                },
            })
        );
        let t = MongoEngine.topology(&c, Some("simple-rs-0"));
        assert_eq!(t.model, ReplicationModel::NativeElection);
        assert_eq!(
            t.voters,
            [
                "simple-rs-0",
                "simple-rs-1",
                "simple-rs-2",
                "simple-rs-3",
                "simple-rs-arbiter-0"
            ]
        );
        assert_eq!(
            t.update_order,
            ["simple-rs-3", "simple-rs-2", "simple-rs-1", "simple-rs-0"]
        );
    }

    #[test]
    fn rejects_reserved_mongod_options() {
        let err = rejected("additionalMongodConfig: {net: {port: 27018}}");
        assert_eq!(err.field, "spec.additionalMongodConfig.net.port");
        assert!(err.message.contains("net.port"), "{err}");
        let err = rejected("additionalMongodConfig: {replication.replSetName: other}");
        assert_eq!(
            err.field,
            "spec.additionalMongodConfig.replication.replSetName"
        );
        assert!(err.message.contains("spec.replicaSetName"), "{err}");
        let err = rejected("additionalMongodConfig: [1]");
        assert_eq!(err.field, "spec.additionalMongodConfig", "{err}");
    }

    #[test]
    fn rejects_bad_member_counts() {
        let err = rejected("{instances: 3, arbiters: 3, unsafeFlags: {replsetSize: true}}");
        assert_eq!(err.field, "spec.arbiters", "{err}");
        assert!(err.message.contains("less than spec.instances"), "{err}");
        for patch in ["{instances: 2}", "{instances: 3, arbiters: 1}"] {
            let err = rejected(patch);
            assert_eq!(err.field, "spec.instances", "{patch}: {err}");
            assert!(err.message.contains("must be odd"), "{err}");
            assert!(
                err.message.contains("spec.unsafeFlags.replsetSize"),
                "{err}"
            );
        }
        let err = rejected("{instances: 9}");
        assert_eq!(err.field, "spec.instances", "{err}");
        assert!(err.message.contains("at most 7"), "{err}");
        MongoEngine
            .validate(&with_spec(
                "{instances: 2, unsafeFlags: {replsetSize: true}}",
            ))
            .unwrap();
        MongoEngine.validate(&with_spec("{instances: 1}")).unwrap();
        let err = rejected("{instances: 0}");
        assert_eq!(err.field, "spec.instances", "{err}");
        assert!(err.message.contains("must be at least 1"), "{err}");
    }

    #[test]
    fn rejects_bad_users_and_names() {
        let user = |name: &str, db: &str, roles: &str| {
            format!("{{name: {name}, db: {db}, passwordSecretRef: {{name: s}}, roles: {roles}}}")
        };
        let err = rejected(&format!(
            "users: [{}, {}]",
            user("app", "admin", "[{name: read, db: app}]"),
            user("app", "admin", "[{name: read, db: app}]")
        ));
        assert_eq!(err.field, "spec.users[1].name", "{err}");
        let err = rejected(&format!("users: [{}]", user("app", "admin", "[]")));
        assert_eq!(err.field, "spec.users[0].roles", "{err}");
        let err = rejected("users: [{name: app, roles: []}]");
        assert_eq!(err.field, "spec.users[0].passwordSecretRef", "{err}");
        assert!(err.message.contains("is required"), "{err}");
        assert_eq!(
            rejected("replicaSetName: \"rs/0\"").field,
            "spec.replicaSetName"
        );
        assert_eq!(rejected("version: latest").field, "spec.version");
        assert_eq!(rejected("type: Sharded").field, "spec.type");
    }

    #[test]
    fn manifest_ports_volume_and_secrets() {
        let c = MongoEngine.validate(&object(SIMPLE)).unwrap();
        let m = MongoEngine.manifest(&c);
        assert_eq!(
            m.ports,
            [EnginePort {
                name: "mongodb".into(),
                port: 27017,
                client: true
            }]
        );
        assert_eq!(m.data_mount_path, "/data/db");
        assert_eq!(m.run_as_user, Some(999));
        assert_eq!(
            m.generated_secrets,
            ["keyfile", "admin-password", "api-token"]
        );
    }

    #[test]
    fn election_is_native_and_instances_unsupported() {
        let c = MongoEngine.validate(&object(SIMPLE)).unwrap();
        assert_eq!(MongoEngine.elect(&c, &[]), Election::Native);
        assert!(MongoEngine.instance_driver().is_none());
        assert!(
            MongoEngine
                .unsupported_capabilities()
                .contains(&capability::INSTANCES)
        );
    }
}
