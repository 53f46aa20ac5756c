//! `Backup` and `ScheduledBackup`: engine-neutral kinds; the engine of the
//! referenced cluster decides how a backup is taken. Pure data.

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::Condition;

/// The cluster a backup belongs to.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct ClusterReference {
    /// Kind of the cluster: `PostgresCluster`, `PxcCluster` or
    /// `MongoCluster`.
    #[schemars(regex(pattern = r"^(PostgresCluster|PxcCluster|MongoCluster)$"))]
    pub kind: String,
    /// Name of the cluster, in the same namespace.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// How a backup is taken.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum BackupMethod {
    /// The engine's native physical or logical tool to the object store
    /// (pgBackRest/barman-cloud, xtrabackup/mariabackup, mongodump).
    #[default]
    ObjectStore,
    /// A CSI VolumeSnapshot of each data volume.
    VolumeSnapshot,
}

/// An on-demand backup of a cluster, to the object store configured in the
/// cluster's `spec.backup`.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "stratum.dev",
    version = "v1alpha1",
    kind = "Backup",
    namespaced,
    status = "BackupStatus",
    shortname = "sbk",
    category = "stratum",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"Method","type":"string","jsonPath":".spec.method"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("a Backup's spec is immutable; create a new Backup instead").field_path(".spec")
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// The cluster to back up.
    pub cluster: ClusterReference,
    /// How the backup is taken. Default `objectStore`.
    #[serde(default)]
    pub method: BackupMethod,
    /// Override the cluster's `spec.backup.target` for this backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<super::common::BackupTarget>,
}

/// Progress and result of a backup.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// `Pending`, `Running`, `Completed` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Conditions of the backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Engine identifier of the backup (e.g. a pgBackRest label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Where the backup was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_path: Option<String>,
    /// Instance that took the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Start and end positions (LSN, GTID, optime) for point-in-time recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_position: Option<String>,
    /// See `beginPosition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_position: Option<String>,
    /// When the backup started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the backup finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<DateTime<Utc>>,
    /// Why the backup failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Backups of a cluster on a cron schedule.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "stratum.dev",
    version = "v1alpha1",
    kind = "ScheduledBackup",
    namespaced,
    status = "ScheduledBackupStatus",
    shortname = "ssbk",
    category = "stratum",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Last Backup","type":"date","jsonPath":".status.lastScheduleTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledBackupSpec {
    /// The cluster to back up.
    pub cluster: ClusterReference,
    /// Cron schedule in UTC: five fields (`minute hour day month weekday`)
    /// or six with leading seconds, as CloudNativePG accepts.
    #[schemars(length(min = 9, max = 128))]
    pub schedule: String,
    /// Take no new backups while true.
    #[serde(default)]
    pub suspend: bool,
    /// Take a backup as soon as the object is created, then follow the
    /// schedule.
    #[serde(default)]
    pub immediate: bool,
    /// How each backup is taken. Default `objectStore`.
    #[serde(default)]
    pub method: BackupMethod,
    /// Who owns the `Backup` objects created: `self` (deleted with this
    /// ScheduledBackup), `cluster` (deleted with the cluster) or `none`.
    #[serde(default)]
    pub backup_owner_reference: BackupOwnerReference,
}

/// Owner of generated `Backup` objects.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackupOwnerReference {
    /// No owner: backups outlive everything.
    #[default]
    None,
    /// This ScheduledBackup.
    #[serde(rename = "self")]
    SelfRef,
    /// The cluster.
    Cluster,
}

/// Schedule bookkeeping.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledBackupStatus {
    /// When the schedule was last evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<DateTime<Utc>>,
    /// When the last backup was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<DateTime<Utc>>,
    /// When the next backup is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<DateTime<Utc>>,
    /// Conditions of the schedule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
