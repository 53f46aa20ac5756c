//! The `PostgresCluster` kind: shared blocks from operator-core plus the
//! PostgreSQL block. Pure data. Field names follow CloudNativePG's `Cluster`.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use operator_core::api::common::{ClusterSpecCommon, RecoverySpec, StorageSpec};
use operator_core::api::status::ClusterStatus;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A PostgreSQL cluster: one primary and streaming replicas, failover and
/// switchover driven by Stratum.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, KubeSchema, PartialEq)]
#[kube(
    group = "stratum.dev",
    version = "v1alpha1",
    kind = "PostgresCluster",
    namespaced,
    status = "ClusterStatus",
    shortname = "pgc",
    category = "stratum",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".status.currentPrimary"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.postgresql) || !has(self.postgresql.synchronous) || self.postgresql.synchronous.number < self.instances"
).message("spec.postgresql.synchronous.number must be less than spec.instances (the primary cannot be its own synchronous standby)").field_path(".postgresql.synchronous.number"))]
pub struct PostgresClusterSpec {
    /// Shared cluster settings.
    #[serde(flatten)]
    pub common: ClusterSpecCommon,

    /// PostgreSQL major version, used to pick the default image
    /// (`postgres:<version>`) when `image` is unset. Default 17.
    #[serde(default = "default_version")]
    #[schemars(range(min = 13, max = 18))]
    pub version: u32,

    /// A separate volume for the write-ahead log (`pg_wal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_storage: Option<StorageSpec>,

    /// PostgreSQL settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgresql: Option<PostgresConfiguration>,

    /// How the first instance is created: a new database (`initdb`) or a
    /// restore (`recovery`). Default: `initdb` of database `app` owned by
    /// `app`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<PostgresBootstrap>,

    /// Seconds to wait after the primary is found failed before failing
    /// over. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub failover_delay: i32,

    /// How the primary is restarted in a rolling update: `switchover` (move
    /// the primary to an updated replica first, the default) or `restart`.
    #[serde(default)]
    pub primary_update_method: PrimaryUpdateMethod,

    /// `unsupervised` (default): the operator updates the primary itself;
    /// `supervised`: it waits for a manual switchover.
    #[serde(default)]
    pub primary_update_strategy: PrimaryUpdateStrategy,
}

fn default_version() -> u32 {
    17
}

/// PostgreSQL server settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostgresConfiguration {
    /// `postgresql.conf` parameters, e.g. `max_connections: "200"`.
    /// Parameters the operator owns (listen addresses, ports, replication
    /// and archive settings) are rejected with the name of the parameter.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,

    /// Extra `pg_hba.conf` lines, placed before the operator's own rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pg_hba: Vec<String>,

    /// Synchronous replication. Asynchronous when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous: Option<SynchronousReplication>,
}

/// Synchronous replication, rendered into `synchronous_standby_names`
/// (CloudNativePG semantics).
#[derive(Clone, Debug, Default, Deserialize, Serialize, KubeSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.maxSyncReplicas) || !has(self.minSyncReplicas) || self.minSyncReplicas <= self.maxSyncReplicas"
).message("minSyncReplicas must not exceed maxSyncReplicas").field_path(".minSyncReplicas"))]
pub struct SynchronousReplication {
    /// `any` (quorum commit: any `number` standbys) or `first` (priority:
    /// the first `number` standbys in the list).
    pub method: SyncMethod,
    /// How many standbys must confirm each commit.
    #[schemars(range(min = 1))]
    pub number: i32,
    /// How far the number of standbys a commit waits for may drop while
    /// replicas are missing (default `number`: never). With fewer replicas
    /// streaming than `number`, commits wait for all that stream but never
    /// fewer than this; 0 lets a primary without streaming replicas commit
    /// asynchronously. Must not exceed `number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_sync_replicas: Option<i32>,
    /// Most standbys named in `synchronous_standby_names` (streaming ones
    /// first); at least `number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_sync_replicas: Option<i32>,
}

/// Synchronous commit method.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncMethod {
    /// Quorum: `ANY n (…)`.
    #[default]
    Any,
    /// Priority: `FIRST n (…)`.
    First,
}

/// How the first instance is created.
#[derive(Clone, Debug, Default, Deserialize, Serialize, KubeSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!(has(self.initdb) && has(self.recovery))").message("set only one of bootstrap.initdb and bootstrap.recovery"))]
pub struct PostgresBootstrap {
    /// Create a new, empty cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initdb: Option<InitDb>,
    /// Restore from a backup (point-in-time recovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoverySpec>,
}

/// `initdb` bootstrap.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InitDb {
    /// Application database to create. Default `app`.
    #[serde(default = "default_app")]
    pub database: String,
    /// Owner of the application database. Default `app`.
    #[serde(default = "default_app")]
    pub owner: String,
    /// A `kubernetes.io/basic-auth` Secret with the owner's `username` and
    /// `password`. Generated (and kept) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<operator_core::api::common::LocalObjectReference>,
    /// Enable data page checksums. Default true.
    #[serde(default = "default_true")]
    pub data_checksums: bool,
    /// Locale/encoding passed to initdb. Default `UTF8` with the C locale.
    #[serde(default = "default_encoding")]
    pub encoding: String,
}

impl Default for InitDb {
    fn default() -> Self {
        Self {
            database: default_app(),
            owner: default_app(),
            secret: None,
            data_checksums: true,
            encoding: default_encoding(),
        }
    }
}

fn default_app() -> String {
    "app".into()
}
fn default_true() -> bool {
    true
}
fn default_encoding() -> String {
    "UTF8".into()
}

/// How the primary is restarted during a rolling update.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PrimaryUpdateMethod {
    /// Switch over to an updated replica, then restart the old primary.
    #[default]
    Switchover,
    /// Restart the primary in place.
    Restart,
}

/// Whether the operator updates the primary by itself.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PrimaryUpdateStrategy {
    /// Automatically.
    #[default]
    Unsupervised,
    /// Wait for a manual switchover.
    Supervised,
}
