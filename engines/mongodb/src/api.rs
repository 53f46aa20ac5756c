//! The `MongoCluster` kind: shared blocks from operator-core plus the
//! MongoDB block. Pure data, no IO. Field names follow the MongoDB
//! Community operator's `MongoDBCommunity` where they overlap, so users
//! migrating from it recognise them.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use operator_core::api::common::{ClusterSpecCommon, RecoverySpec};
use operator_core::api::status::ClusterStatus;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A MongoDB replica set: the members elect their primary themselves;
/// Stratum creates them, routes clients and rolls out changes secondaries
/// first.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, KubeSchema, PartialEq)]
#[kube(
    group = "stratum.dev",
    version = "v1alpha1",
    kind = "MongoCluster",
    namespaced,
    status = "ClusterStatus",
    shortname = "mgc",
    category = "stratum",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".status.currentPrimary"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.instances >= 1").message(
    "spec.instances must be at least 1 for MongoCluster"
).field_path(".instances"))]
#[x_kube(validation = kube::core::Rule::new(
    "self.instances < 1 || !has(self.arbiters) || self.arbiters < self.instances"
).message(
    "spec.arbiters must be less than spec.instances for MongoCluster (arbiters hold no data; most voters must)"
).field_path(".arbiters"))]
#[x_kube(validation = kube::core::Rule::new(
    "self.instances < 1 || (self.instances + (has(self.arbiters) ? self.arbiters : 0)) % 2 == 1 || (has(self.unsafeFlags) && has(self.unsafeFlags.replsetSize) && self.unsafeFlags.replsetSize)"
).message(
    "spec.instances + spec.arbiters (the voting members) must be odd for MongoCluster so that an election always has a majority; add or remove an instance or an arbiter, or set spec.unsafeFlags.replsetSize: true"
).field_path(".instances"))]
#[x_kube(validation = kube::core::Rule::new(
    "self.instances + (has(self.arbiters) ? self.arbiters : 0) <= 7"
).message(
    "spec.instances + spec.arbiters must be at most 7 for MongoCluster (a replica set has at most 7 voting members)"
).field_path(".instances"))]
pub struct MongoClusterSpec {
    /// Shared cluster settings.
    #[serde(flatten)]
    pub common: ClusterSpecCommon,

    /// MongoDB version, e.g. `7.0.12`, used to pick the default image
    /// (`mongo:<version>`) when `image` is unset. Default `7.0`.
    #[serde(default = "default_version")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+){0,2}$"), length(max = 16))]
    pub version: String,

    /// Deployment type. Only `ReplicaSet` for now.
    #[serde(default, rename = "type")]
    pub type_: MongoClusterType,

    /// Name of the replica set (`replication.replSetName`). Default: the
    /// cluster's `metadata.name`. It cannot be changed once the replica set
    /// is initiated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"), length(max = 63))]
    pub replica_set_name: Option<String>,

    /// Database users to create, with passwords from Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<MongoUser>,

    /// Extra mongod configuration, as in the mongod configuration file:
    /// nested objects (`storage: {wiredTiger: …}`) or dotted keys
    /// (`storage.wiredTiger.engineConfig.cacheSizeGB: 1`). Options the
    /// operator owns are rejected with their path: `net.port`,
    /// `net.bindIp`, `net.bindIpAll`, `replication.replSetName` (use
    /// `replicaSetName`), `storage.dbPath`, `security.keyFile`,
    /// `processManagement.fork`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub additional_mongod_config: BTreeMap<String, serde_json::Value>,

    /// Number of arbiters: voting members that hold no data. Default 0.
    /// Must be less than `instances`.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub arbiters: i32,

    /// Checks that can be switched off, at your own risk.
    #[serde(default)]
    pub unsafe_flags: MongoUnsafeFlags,

    /// How the cluster is created: `recovery` from a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<MongoBootstrap>,
}

fn default_version() -> String {
    "7.0".into()
}

/// `type: object` that keeps every field (`x-kubernetes-preserve-unknown-fields`).
fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

impl MongoClusterSpec {
    /// The database image: `spec.image` or `mongo:<version>`.
    pub fn effective_image(&self) -> String {
        self.common
            .image
            .clone()
            .unwrap_or_else(|| format!("mongo:{}", self.version))
    }

    /// The replica set name: `spec.replicaSetName` or the cluster name.
    pub fn effective_replica_set_name(&self, cluster_name: &str) -> String {
        self.replica_set_name
            .clone()
            .unwrap_or_else(|| cluster_name.to_string())
    }
}

/// Deployment type of a MongoDB cluster.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum MongoClusterType {
    /// A replica set.
    #[default]
    ReplicaSet,
}

/// A database user (`MongoDBCommunity`'s `users[]`).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MongoUser {
    /// User name.
    #[schemars(length(min = 1))]
    pub name: String,

    /// Authentication database of the user. Default `admin`.
    #[serde(default = "default_user_db")]
    #[schemars(length(min = 1))]
    pub db: String,

    /// The Secret key holding the user's password.
    pub password_secret_ref: PasswordSecretRef,

    /// Roles granted to the user; at least one.
    #[schemars(length(min = 1))]
    pub roles: Vec<MongoRole>,

    /// Name of the Secret the operator writes the user's SCRAM credentials
    /// to. Default `<cluster>-<user>-scram`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scram_credentials_secret_name: Option<String>,
}

fn default_user_db() -> String {
    "admin".into()
}

/// A key in a Secret in the cluster's namespace holding a password.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PasswordSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key inside the Secret. Default `password`.
    #[serde(default = "default_password_key")]
    pub key: String,
}

fn default_password_key() -> String {
    "password".into()
}

/// A role granted on a database.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MongoRole {
    /// Role name, e.g. `readWrite`, `clusterAdmin`.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Database the role applies to, e.g. `admin`.
    #[schemars(length(min = 1))]
    pub db: String,
}

/// Checks that can be switched off (the Percona Server for MongoDB
/// operator's `unsafeFlags` names).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MongoUnsafeFlags {
    /// Allow an even number of voting members (`instances + arbiters`).
    /// Such a replica set tolerates no more failures than one member
    /// smaller, and a partition into halves leaves no primary.
    #[serde(default)]
    pub replset_size: bool,
}

/// How the cluster is created.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MongoBootstrap {
    /// Create the cluster from a backup (point-in-time recovery to an
    /// oplog timestamp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoverySpec>,
}
