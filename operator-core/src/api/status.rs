//! Cluster status shared by every cluster kind: pure data plus the condition
//! bookkeeping (transition time changes only when a condition flips).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a cluster. The operator writes intent
/// (`targetPrimary`); instances report fact (`currentPrimary`, positions).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// Coarse state: `Creating`, `Healthy`, `Degraded`, `Failed`,
    /// `Failover`, `Switchover`, `Upgrading`, `Deleting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Human readable detail of the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_reason: Option<String>,

    /// Standard conditions: `Ready`, `Progressing`, `Degraded`, and
    /// engine-neutral ones such as `ContinuousArchiving`,
    /// `LastBackupSucceeded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Number of instances the spec asks for.
    #[serde(default)]
    pub instances: i32,

    /// Number of instances that are ready to serve.
    #[serde(default)]
    pub ready_instances: i32,

    /// `ready/instances`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// The instance that is primary (writer) now. Engines with the
    /// failover capability: the primary the operator promoted or adopted
    /// (and grants the write lease to); others: the writer the instances
    /// report. Empty for engines without a single primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary: Option<String>,

    /// The instance the operator wants as primary. Differs from
    /// `currentPrimary` during a failover or switchover. Setting it to a
    /// ready replica asks for a switchover (engines with the failover
    /// capability): `kubectl patch KIND NAME --subresource=status
    /// --type=merge -p '{"status":{"targetPrimary":"NAME-2"}}'`. A target
    /// that is not a ready replica is refused (Event `SwitchoverRefused`,
    /// condition `Switchover=False` naming it) and reset to
    /// `currentPrimary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_primary: Option<String>,

    /// Term of the write lease the operator grants the primary (engines
    /// with the failover capability): 1 once the first primary is
    /// adopted, then incremented, and written here, before each
    /// promotion. Instance managers refuse a lease of an older
    /// term, so an operator that lost track cannot renew a deposed
    /// primary.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lease_term: u64,

    /// A change of primary in progress (failover or switchover), written
    /// before each of its steps so that a restarted operator continues the
    /// same change instead of deciding again. Absent when none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_change: Option<PrimaryChange>,

    /// Timeline (PostgreSQL) of the current primary, as it last reported
    /// it; a promotion starts a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,

    /// When `currentPrimary` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary_timestamp: Option<DateTime<Utc>>,

    /// Per-instance role and replication position.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances_status: Vec<InstanceStatus>,

    /// Service that routes to the primary/writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_service: Option<String>,

    /// Service that routes to the replicas/readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_service: Option<String>,

    /// Operations this engine does not support, so that "unsupported" is
    /// visible rather than silently skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsupported_capabilities: Vec<String>,

    /// Multi-writer (Galera) clusters: the bootstrap the operator decided
    /// after a full crash (or for a new cluster) and has not seen complete
    /// yet. Written *before* the member is ordered to bootstrap, so a
    /// restarted operator orders the same member again and never another
    /// one; removed once a member is Synced in a Primary component again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapStatus>,
}

/// A bootstrap of a multi-writer (Galera) group decided by the operator:
/// the member that starts a new Primary component (`--wsrep-new-cluster`)
/// from its own data, which the other members then join.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapStatus {
    /// The member ordered to bootstrap (only ever this one while the
    /// decision stands).
    pub instance: String,
    /// The cluster UUID of its recovered position, when it reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Its recovered seqno (the highest of the majority's cluster UUID,
    /// unless `spec.bootstrap.forceBootstrapFrom` chose it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seqno: Option<i64>,
    /// Why it was chosen (the election's words).
    #[serde(default)]
    pub reason: String,
    /// When the operator decided it.
    pub decided_at: DateTime<Utc>,
    /// When its instance manager last accepted the order; unset until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered_at: Option<DateTime<Utc>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A change of primary in progress (`status.primaryChange`).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PrimaryChange {
    /// `Failover` (the primary failed) or `Switchover` (asked for by
    /// setting `status.targetPrimary` to a ready replica).
    pub reason: PrimaryChangeReason,
    /// The primary being replaced.
    pub from: String,
    /// When the change started.
    pub started_at: DateTime<Utc>,
}

/// Why the primary changes.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum PrimaryChangeReason {
    /// The primary failed; the most advanced replica replaces it.
    Failover,
    /// A planned move to `targetPrimary`.
    Switchover,
}

/// Coarse state of a cluster.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Phase {
    /// Instances are being created.
    Creating,
    /// All instances ready.
    Healthy,
    /// Serving, but some instances are not ready.
    Degraded,
    /// The spec is invalid or the cluster cannot serve.
    Failed,
    /// A primary is being replaced after a failure.
    Failover,
    /// A planned change of primary.
    Switchover,
    /// A rolling update is in progress.
    Upgrading,
    /// The cluster is being deleted.
    Deleting,
}

impl Phase {
    /// The name shown in status and `kubectl get`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "Creating",
            Self::Healthy => "Healthy",
            Self::Degraded => "Degraded",
            Self::Failed => "Failed",
            Self::Failover => "Failover",
            Self::Switchover => "Switchover",
            Self::Upgrading => "Upgrading",
            Self::Deleting => "Deleting",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one instance reports about itself.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Instance (pod) name.
    pub name: String,
    /// `primary`, `replica`, `writer`, `reader`, `secondary`, `arbiter` or
    /// `unknown`.
    pub role: String,
    /// Whether the instance serves traffic.
    pub ready: bool,
    /// Engine position, e.g. `tl 2 lsn 0/3000060`, `seqno 1234`, an optime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// Why the instance is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Galera members: wsrep state, cluster UUID and seqno, cluster size
    /// and status, flow control, last state transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wsrep: Option<WsrepStatus>,
    /// The instance runs with older settings than the cluster's
    /// configuration and takes them at its next restart (a changed
    /// parameter that cannot be reloaded), as its instance manager reports.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending_restart: bool,
}

/// One Galera member's facts, as its instance manager reports them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WsrepStatus {
    /// `wsrep_local_state_comment` (`Synced`, `Joining`, `Donor/Desynced`,
    /// …), `Recovered` when the server is down with a known position,
    /// `Starting` when it runs but does not answer yet.
    pub state: String,
    /// `wsrep_cluster_state_uuid` (or the recovered one).
    pub cluster_uuid: String,
    /// Last committed (or recovered) seqno; -1 unknown.
    pub seqno: i64,
    /// `wsrep_cluster_size`, while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<i64>,
    /// `wsrep_cluster_status` (`Primary`, `non-Primary`), while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_status: Option<String>,
    /// `wsrep_flow_control_paused`: the fraction of time replication was
    /// paused by flow control.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_control_paused: Option<f64>,
    /// How the member last received state: `ist` (missing write-sets) or
    /// `sst` (a full copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_state_transfer: Option<String>,
    /// `safe_to_bootstrap` of its `grastate.dat`, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_to_bootstrap: Option<bool>,
}

// Statuses are compared whole (`Eq` in the local runtime's snapshot); the
// one float, a fraction reported by the server, is never NaN.
impl Eq for WsrepStatus {}

/// A standard Kubernetes condition.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// PascalCase reason.
    pub reason: String,
    /// Human readable detail.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: DateTime<Utc>,
    /// Generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Well-known condition types.
pub mod condition_type {
    /// All instances ready and the write endpoint routed.
    pub const READY: &str = "Ready";
    /// The operator is working towards the spec.
    pub const PROGRESSING: &str = "Progressing";
    /// Something needs attention: invalid spec, lost instances.
    pub const DEGRADED: &str = "Degraded";
    /// WAL/binlog/oplog archiving works.
    pub const CONTINUOUS_ARCHIVING: &str = "ContinuousArchiving";
    /// The last backup succeeded.
    pub const LAST_BACKUP_SUCCEEDED: &str = "LastBackupSucceeded";
    /// Multi-writer (Galera) clusters: a member runs in a Primary
    /// component. False with the reason while the operator waits to
    /// bootstrap the group (positions missing, a bootstrap decided or
    /// ordered, no safe candidate).
    pub const PRIMARY_COMPONENT: &str = "PrimaryComponent";
    /// The last switchover asked for through `status.targetPrimary` was
    /// carried out (`True`) or refused (`False`, the message names the
    /// instance and why).
    pub const SWITCHOVER: &str = "Switchover";
}

/// Set or update a condition in place. `last_transition_time` changes only
/// when `status` flips; reason, message and generation always follow.
/// Returns true when the status flipped (or the condition is new).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> bool {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let flipped = c.status != status;
            if flipped {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
            flipped
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status,
                reason: reason.to_string(),
                message,
                last_transition_time: now,
                observed_generation: generation,
            });
            true
        }
    }
}

/// The condition of this type, if set.
pub fn get_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_flip() {
        let t0 = DateTime::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::from_timestamp(2_000, 0).unwrap();
        let t2 = DateTime::from_timestamp(3_000, 0).unwrap();
        let mut cs = Vec::new();
        assert!(set_condition(
            &mut cs,
            "Ready",
            false,
            "Creating",
            "",
            Some(1),
            t0
        ));
        assert!(!set_condition(
            &mut cs,
            "Ready",
            false,
            "Waiting",
            "x",
            Some(2),
            t1
        ));
        assert_eq!(cs[0].last_transition_time, t0);
        assert_eq!(cs[0].reason, "Waiting");
        assert_eq!(cs[0].observed_generation, Some(2));
        assert!(set_condition(
            &mut cs,
            "Ready",
            true,
            "AllReady",
            "",
            Some(2),
            t2
        ));
        assert_eq!(cs[0].last_transition_time, t2);
        assert_eq!(cs.len(), 1);
    }
}
