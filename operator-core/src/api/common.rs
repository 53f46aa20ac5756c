//! Shared spec blocks: pure data, reused by every cluster kind.
//!
//! Field names follow CloudNativePG and the Percona operators where they
//! overlap, so users migrating from those recognise them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    NodeAffinity, PersistentVolumeClaimSpec, ResourceRequirements, Toleration,
    TopologySpreadConstraint,
};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The part of the spec that every cluster kind shares. Engine kinds embed it
/// with `#[serde(flatten)]`, so these fields sit directly under `spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpecCommon {
    /// Number of database instances (pods) in the cluster. For PostgreSQL one
    /// is the primary and the rest are streaming replicas; for Galera every
    /// instance is a writer-capable member; for MongoDB these are the replica
    /// set members.
    #[schemars(range(min = 1))]
    pub instances: i32,

    /// Container image of the database server. When unset, the engine's
    /// default image for `version` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Image pull policy for the database container (`Always`,
    /// `IfNotPresent`, `Never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,

    /// Names of Secrets used to pull the images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Persistent storage for each instance's data directory.
    pub storage: StorageSpec,

    /// What happens to the instances' PersistentVolumeClaims (their data)
    /// when the cluster is deleted or scaled down. Default: keep them, so
    /// that data is never lost by accident (as CloudNativePG and the
    /// Percona operators do); a cluster re-created with the same name, or
    /// scaled up again, reuses them.
    #[serde(default)]
    pub pvc_retention_policy: PvcRetentionPolicy,

    /// CPU and memory requests and limits of the database container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Scheduling: pod anti-affinity between instances, node selection and
    /// tolerations.
    #[serde(default)]
    pub affinity: AffinitySpec,

    /// Topology spread constraints applied to the instance pods, e.g. to
    /// spread instances across zones. The cluster's pod selector is added to
    /// each constraint when it has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,

    /// Metrics exporter and custom queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring: Option<MonitoringSpec>,

    /// Where and how backups of this cluster are stored. Required for
    /// `Backup`/`ScheduledBackup` objects that target this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupConfiguration>,

    /// How the StatefulSet creates pods: `OrderedReady` (one at a time, in
    /// ordinal order) or `Parallel` (all at once). Default: the engine's —
    /// `OrderedReady` for PostgresCluster, `Parallel` for PxcCluster and
    /// MongoCluster, whose members must all start to re-form a quorum after
    /// a full-cluster crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_management_policy: Option<PodManagementPolicy>,

    /// How changes that need a restart are rolled out. `SmartUpdate` (the
    /// default) lets the operator restart replicas first, one at a time, and
    /// the primary/writer last; `RollingUpdate` hands the rollout to the
    /// StatefulSet controller; `OnDelete` waits for pods to be deleted by hand.
    #[serde(default)]
    pub update_strategy: UpdateStrategy,

    /// Extra labels and annotations copied to every object the operator
    /// creates for this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inherited_metadata: Option<InheritedMetadata>,
}

/// A reference to an object in the same namespace, by name.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct LocalObjectReference {
    /// Name of the referent.
    pub name: String,
}

/// A key in a Secret in the cluster's namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct SecretKeySelector {
    /// Name of the Secret.
    pub name: String,
    /// Key inside the Secret.
    pub key: String,
}

/// A key in a ConfigMap in the cluster's namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct ConfigMapKeySelector {
    /// Name of the ConfigMap.
    pub name: String,
    /// Key inside the ConfigMap.
    pub key: String,
}

/// Persistent storage of one volume of each instance.
#[derive(Clone, Debug, Default, Deserialize, Serialize, KubeSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(oldSelf.size) || !has(self.size) || quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0"
).message("storage size cannot be decreased; keep the old size or grow it").reason(kube::core::Reason::FieldValueForbidden))]
pub struct StorageSpec {
    /// Size of the volume, as a Kubernetes quantity (e.g. `1Gi`). It can be
    /// grown (when the StorageClass allows expansion) but never shrunk.
    #[x_kube(validation = kube::core::Rule::new("isQuantity(self)").message("must be a Kubernetes quantity such as 1Gi or 500Mi"))]
    #[schemars(length(max = 32))]
    pub size: String,

    /// StorageClass of the PersistentVolumeClaim; the cluster default when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,

    /// A PersistentVolumeClaim spec whose fields override the ones derived
    /// from `size` and `storageClass` (e.g. `accessModes`, `selector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc_template: Option<PersistentVolumeClaimSpec>,
}

/// The StatefulSet's `persistentVolumeClaimRetentionPolicy`, applied to
/// every volume of the instances (data and extra volumes).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PvcRetentionPolicy {
    /// When the cluster is deleted: `Retain` (default) keeps the claims and
    /// their volumes; `Delete` deletes them with the StatefulSet.
    #[serde(default)]
    pub when_deleted: PvcRetention,
    /// When `instances` decreases: `Retain` (default) keeps the claims of
    /// the removed instances, which a later scale-up reuses; `Delete`
    /// deletes them once their pods are gone.
    #[serde(default)]
    pub when_scaled: PvcRetention,
}

/// Keep or delete PersistentVolumeClaims.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum PvcRetention {
    /// Keep the claims (and so the data).
    #[default]
    Retain,
    /// Delete the claims; the volumes follow their reclaim policy.
    Delete,
}

impl PvcRetention {
    /// The StatefulSet API value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retain => "Retain",
            Self::Delete => "Delete",
        }
    }
}

/// Scheduling of the instance pods.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AffinitySpec {
    /// Add a pod anti-affinity rule so that two instances of the cluster are
    /// not scheduled in the same topology domain. Default true.
    #[serde(default = "default_true")]
    pub enable_pod_anti_affinity: bool,

    /// `preferred` (default: spread when possible) or `required` (refuse to
    /// schedule two instances in the same domain).
    #[serde(default)]
    pub pod_anti_affinity_type: PodAntiAffinityType,

    /// Node label that defines the anti-affinity domain. Default
    /// `kubernetes.io/hostname`.
    #[serde(default = "default_topology_key")]
    pub topology_key: String,

    /// Node labels that a node must carry to run an instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the instance pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Node affinity of the instance pods, passed through unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<NodeAffinity>,
}

impl Default for AffinitySpec {
    fn default() -> Self {
        Self {
            enable_pod_anti_affinity: true,
            pod_anti_affinity_type: PodAntiAffinityType::default(),
            topology_key: default_topology_key(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            node_affinity: None,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_topology_key() -> String {
    "kubernetes.io/hostname".to_string()
}

/// Strength of the anti-affinity between instances.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PodAntiAffinityType {
    /// Spread instances when possible (`preferredDuringScheduling…`).
    #[default]
    Preferred,
    /// Never co-locate two instances (`requiredDuringScheduling…`).
    Required,
}

/// How the StatefulSet creates pods: `OrderedReady` (one at a time, in
/// ordinal order) or `Parallel` (all at once). Default: the engine's —
/// `OrderedReady` for PostgresCluster, `Parallel` for PxcCluster and
/// MongoCluster, whose members must all start to re-form a quorum after a
/// full-cluster crash.
//
// This text is also the `spec.podManagementPolicy` description: kube's
// schema transform for `Option<enum>` keeps the enum's description.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum PodManagementPolicy {
    /// Create and delete pods one at a time, in ordinal order.
    #[default]
    OrderedReady,
    /// Create and delete pods all at once.
    Parallel,
}

impl PodManagementPolicy {
    /// The StatefulSet field value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrderedReady => "OrderedReady",
            Self::Parallel => "Parallel",
        }
    }
}

/// How restarts are rolled out.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum UpdateStrategy {
    /// The operator replaces instances itself (StatefulSet `OnDelete`
    /// underneath): a pod whose template is outdated is deleted and
    /// recreated, an instance whose configuration needs a restart is
    /// restarted in place; replicas first (highest ordinal first), one at
    /// a time, each back ready and in sync (streaming; Galera: Synced)
    /// before the next, never during a failover or switchover; the
    /// primary/writer last — PostgreSQL after a switchover to an updated
    /// replica (`primaryUpdateMethod`, `primaryUpdateStrategy`).
    #[default]
    SmartUpdate,
    /// The StatefulSet controller rolls pods in reverse ordinal order.
    RollingUpdate,
    /// Pods are only replaced when someone deletes them.
    OnDelete,
}

/// Labels and annotations for every object the operator creates.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct InheritedMetadata {
    /// Labels to add.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations to add.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Metrics of the instances.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Serve database metrics in Prometheus format on each instance
    /// manager's `/metrics` endpoint (container port `api`, 8000), and
    /// annotate the pods for Prometheus scraping.
    #[serde(default)]
    pub enabled: bool,

    /// ConfigMaps holding extra queries to export as metrics, in the
    /// CloudNativePG/postgres_exporter query-file format.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_queries_config_map: Vec<ConfigMapKeySelector>,
}

/// Where backups, WAL/binlog/oplog archives are stored.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupConfiguration {
    /// An S3-compatible object store.
    pub object_store: ObjectStoreConfiguration,

    /// Compression of base backups and archived logs.
    #[serde(default)]
    pub compression: Compression,

    /// How long backups are kept, as a number of days (`30d`), weeks (`4w`)
    /// or months (`3m`). Older backups, and the archived logs only they
    /// need, are deleted. Unset keeps everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*[dwm]$"))]
    pub retention_policy: Option<String>,

    /// Which instance takes base backups: `prefer-standby` (default) or
    /// `primary`.
    #[serde(default)]
    pub target: BackupTarget,
}

/// An S3-compatible object store destination.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStoreConfiguration {
    /// Bucket and path prefix, e.g. `s3://backups/pg-ha`.
    #[schemars(regex(pattern = r"^s3://[^/]+(/.*)?$"))]
    pub destination_path: String,

    /// Endpoint URL of the object store; the AWS default when unset.
    #[serde(
        default,
        rename = "endpointURL",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_url: Option<String>,

    /// CA bundle that signs the endpoint's certificate.
    #[serde(
        default,
        rename = "endpointCA",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_ca: Option<SecretKeySelector>,

    /// Region of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,

    /// Credentials to the object store.
    pub s3_credentials: S3Credentials,
}

/// S3 access keys, from Secrets.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Credentials {
    /// The access key id.
    pub access_key_id: SecretKeySelector,
    /// The secret access key.
    pub secret_access_key: SecretKeySelector,
}

/// Compression algorithm for backups and archived logs.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression.
    None,
    /// gzip.
    #[default]
    Gzip,
    /// lz4.
    Lz4,
    /// zstd.
    Zstd,
}

/// Which instance takes backups.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackupTarget {
    /// A healthy replica when there is one, else the primary.
    #[default]
    PreferStandby,
    /// Always the primary.
    Primary,
}

/// Bootstrap of a new cluster from an existing backup (point-in-time
/// recovery). Shared by every engine; the engine decides how to restore.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySpec {
    /// Restore from this `Backup` object (same namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<LocalObjectReference>,

    /// Restore from an object store written by another cluster, when there
    /// is no `Backup` object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectStoreConfiguration>,

    /// Stop replaying at this point; the end of the archive when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_target: Option<RecoveryTarget>,
}

/// A point in time to recover to. Set exactly one field.
#[derive(Clone, Debug, Default, Deserialize, Serialize, KubeSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "[has(self.targetTime), has(self.targetLSN), has(self.targetXID), has(self.targetGTID), has(self.targetOplogTimestamp)].filter(x, x).size() <= 1"
).message("set at most one of targetTime, targetLSN, targetXID, targetGTID, targetOplogTimestamp"))]
pub struct RecoveryTarget {
    /// RFC 3339 timestamp (all engines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_time: Option<String>,
    /// PostgreSQL WAL position, e.g. `0/3000060`.
    #[serde(default, rename = "targetLSN", skip_serializing_if = "Option::is_none")]
    pub target_lsn: Option<String>,
    /// PostgreSQL transaction id.
    #[serde(default, rename = "targetXID", skip_serializing_if = "Option::is_none")]
    pub target_xid: Option<String>,
    /// MySQL/Galera GTID set.
    #[serde(
        default,
        rename = "targetGTID",
        skip_serializing_if = "Option::is_none"
    )]
    pub target_gtid: Option<String>,
    /// MongoDB oplog timestamp (`seconds:increment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_oplog_timestamp: Option<String>,
    /// Stop just before the target instead of just after it.
    #[serde(default)]
    pub exclusive: bool,
}
