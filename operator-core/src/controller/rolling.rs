//! rolling: the controller's rolling update of `updateStrategy:
//! SmartUpdate` clusters (the StatefulSet is `OnDelete`, so pods change
//! only when the operator replaces them), and the switchover that comes
//! before a PostgreSQL scale-down removing the primary's ordinal.
//!
//! [`plan`] is pure: the pods (their `controller-revision-hash` against
//! the StatefulSet's `status.updateRevision`), the managers' reports
//! (`pendingRestart`, role, readiness, streaming or Synced), the primary
//! or writer, the spec (`primaryUpdateMethod`, `primaryUpdateStrategy`)
//! and whether a change of primary runs → one next action. The rules are
//! the local runtime's (`local/ha.rs` roll step, `local/galera.rs`):
//! replicas first, highest ordinal first, one at a time, the next only
//! when every member is back ready and in sync (PostgreSQL: streaming
//! from the primary; Galera: Synced in a Primary component, the cluster
//! size back), never during a failover, switchover or Galera bootstrap;
//! the primary or writer last — PostgreSQL switches over to the most
//! advanced updated replica first by setting `status.targetPrimary`, as a
//! user does (the `ha` step carries it out), unless
//! `primaryUpdateMethod: restart` or `primaryUpdateStrategy: supervised`.
//!
//! IO (`step`): one GET of the StatefulSet when its generation changed
//! (the watch cache holds metadata only), pod deletions (with the pod's
//! UID as precondition, so a pod recreated meanwhile is never deleted by
//! mistake), the instance managers' `restart` action, Events; the status
//! fields it sets go out with the pipeline's status write.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Resource;
use kube::api::{Api, DeleteParams, DynamicObject, Preconditions};
use serde_json::json;

use super::ha::HaOutcome;
use super::observe::{Observation, reachable_endpoints};
use super::reconcile::KindContext;
use crate::api::common::UpdateStrategy;
use crate::api::status::{ClusterStatus, Phase, condition_type, set_condition};
use crate::build::{ChildKind, names, selector_labels};
use crate::engine::{
    EngineManifest, InstanceOps, ObservedMember, ReplicationModel, ValidatedCluster,
};
use crate::galera::wsrep_status;
use crate::instance::client::InstanceClient;
use crate::instance::protocol::{Position, Role, SECRET_KEY_API_TOKEN};
use crate::instance::server::ACTION_RESTART;
use crate::topology::streaming_replicas;

/// The pod label the StatefulSet controller sets to the revision a pod
/// was created from.
pub const LABEL_REVISION: &str = "controller-revision-hash";
/// How long an instance restarted in place (`restart` action) may take to
/// come back without its pending restart before the update stops waiting
/// for it specially (the general readiness checks still hold).
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// The Event action of what the step does to one instance.
pub const EVENT_ACTION: &str = "RollingUpdate";
/// Requeue while a rolling update runs: a manager's report (streaming
/// again, Synced) changes no Kubernetes object.
pub const REQUEUE_ROLLING: Duration = Duration::from_secs(2);
/// How long the `ha` step waits for a primary the update restarts on
/// purpose before it counts as failed (added to `failoverDelay`).
pub const PRIMARY_RESTART_ALLOWANCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------
// The plan (pure)
// ---------------------------------------------------------------------

/// How the PostgreSQL primary is updated (`spec.primaryUpdateMethod`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrimaryUpdateMethod {
    /// Switch over to an updated replica, then update the old primary.
    #[default]
    Switchover,
    /// Restart (or recreate) the primary in place.
    Restart,
}

/// A pod as the plan sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RollPod {
    /// Pod name (the instance name).
    pub name: String,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// The `controller-revision-hash` label.
    pub revision: Option<String>,
    /// The pod's `Ready` condition is `True`.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

/// The action the previous step took, until its instance is back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// The instance.
    pub instance: String,
    /// The UID of the pod that was deleted (`None`: restarted in place).
    pub deleted_uid: Option<String>,
    /// How long ago.
    pub age: Duration,
}

/// Everything [`plan`] looks at.
#[derive(Clone, Debug)]
pub struct RollView<'a> {
    /// Instance names, in ordinal order.
    pub instances: &'a [String],
    /// The cluster's pods.
    pub pods: &'a [RollPod],
    /// The StatefulSet's `status.updateRevision` once it is known for
    /// the current generation (`None`: pod templates are not compared).
    pub update_revision: Option<&'a str>,
    /// The managers' reports, one per instance.
    pub members: &'a [ObservedMember],
    /// `PrimaryReplica` (PostgreSQL) or `MultiWriter` (Galera).
    pub model: ReplicationModel,
    /// The recorded primary (PostgreSQL) or the member writes go to
    /// (Galera).
    pub primary: Option<&'a str>,
    /// `spec.primaryUpdateMethod`.
    pub method: PrimaryUpdateMethod,
    /// `spec.primaryUpdateStrategy: supervised`.
    pub supervised: bool,
    /// A change of primary (or a Galera bootstrap) in progress: why
    /// nothing moves.
    pub changing: Option<&'a str>,
    /// A scale-down in progress that removes ordinals from this one up
    /// (the spec's `instances`), while the primary is among them.
    pub keep: Option<usize>,
    /// The previous action, until its instance is back.
    pub in_flight: Option<&'a InFlight>,
}

/// Why a switchover is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchoverFor {
    /// The primary is the last instance to update.
    Update,
    /// The primary's ordinal is removed by a scale-down.
    ScaleDown,
}

/// The next step of a rolling update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RollAction {
    /// Every instance runs the current pod template and configuration.
    Done,
    /// Nothing to do now.
    Wait {
        /// Why (status, logs).
        reason: String,
    },
    /// Only the primary is left and `primaryUpdateStrategy` is
    /// `supervised`: the user switches over.
    AwaitUser {
        /// The primary.
        primary: String,
    },
    /// Delete the pod; the StatefulSet recreates it from the current
    /// template.
    DeletePod {
        /// The instance.
        instance: String,
        /// Precondition: only this pod, not one recreated meanwhile.
        uid: Option<String>,
        /// `replica`, `primary`, `member` or `writer`.
        role: &'static str,
    },
    /// Restart the server in place through the instance manager (its
    /// pod is current; its configuration needs a restart).
    Restart {
        /// The instance.
        instance: String,
        /// As for [`RollAction::DeletePod`].
        role: &'static str,
    },
    /// Set `status.targetPrimary`: the `ha` step switches over.
    Switchover {
        /// The primary.
        from: String,
        /// The replica to promote.
        to: String,
        /// Update or scale-down.
        why: SwitchoverFor,
    },
}

/// [`plan`]'s answer: the action and the progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollPlan {
    /// The next action.
    pub action: RollAction,
    /// Instances that need nothing.
    pub updated: usize,
    /// Instances in all.
    pub total: usize,
    /// The action is for a scale-down that removes the primary's ordinal.
    pub scale_down: bool,
}

impl RollPlan {
    /// The progress line for status, or `None` when nothing rolls.
    pub fn message(&self) -> Option<String> {
        let head = format!(
            "Rolling update: {} of {} instances updated",
            self.updated, self.total
        );
        if self.scale_down {
            return Some(match &self.action {
                RollAction::Switchover { from, to, .. } => format!(
                    "Scaling down: switching over from {from} to {to}, whose ordinal is kept"
                ),
                RollAction::Wait { reason } => format!("Scaling down: {reason}"),
                other => format!("Scaling down: {other:?}"),
            });
        }
        Some(match &self.action {
            RollAction::Done => return None,
            RollAction::Wait { reason } => format!("{head}, {reason}"),
            RollAction::AwaitUser { primary } => format!(
                "{head}, waiting for the user to request a switchover of the primary {primary} (primaryUpdateStrategy: supervised)"
            ),
            RollAction::DeletePod { instance, role, .. } => {
                format!("{head}, recreating {instance} ({role})")
            }
            RollAction::Restart { instance, role } => {
                format!("{head}, restarting {instance} ({role}) in place")
            }
            RollAction::Switchover { from, to, .. } => {
                format!("{head}, switching over from {from} to {to} before updating {from}")
            }
        })
    }
}

impl RollView<'_> {
    fn pod(&self, name: &str) -> Option<&RollPod> {
        self.pods.iter().find(|p| p.name == name)
    }

    fn member(&self, name: &str) -> Option<&ObservedMember> {
        self.members.iter().find(|m| m.name == name)
    }

    /// The pod runs an older template than the StatefulSet's.
    fn outdated_pod(&self, name: &str) -> bool {
        match (self.pod(name), self.update_revision) {
            (Some(p), Some(want)) => p.revision.as_deref().is_some_and(|r| r != want),
            _ => false,
        }
    }

    fn pending_restart(&self, name: &str) -> bool {
        self.member(name)
            .and_then(|m| m.status.as_ref())
            .is_some_and(|s| s.pending_restart)
    }

    fn needs_update(&self, name: &str) -> bool {
        self.outdated_pod(name) || self.pending_restart(name)
    }

    fn is_primary(&self, name: &str) -> bool {
        self.primary == Some(name)
    }

    fn role_of(&self, name: &str) -> &'static str {
        match (self.model, self.is_primary(name)) {
            (ReplicationModel::MultiWriter, true) => "writer",
            (ReplicationModel::MultiWriter, false) => "member",
            (_, true) => "primary",
            (_, false) => "replica",
        }
    }

    fn update(&self, name: &str) -> RollAction {
        let role = self.role_of(name);
        if self.outdated_pod(name) {
            RollAction::DeletePod {
                instance: name.to_string(),
                uid: self.pod(name).and_then(|p| p.uid.clone()),
                role,
            }
        } else {
            RollAction::Restart {
                instance: name.to_string(),
                role,
            }
        }
    }
}

fn ordinal(name: &str) -> u32 {
    name.rsplit('-')
        .next()
        .and_then(|o| o.parse().ok())
        .unwrap_or(0)
}

fn wait(reason: impl Into<String>) -> RollAction {
    RollAction::Wait {
        reason: reason.into(),
    }
}

fn received_lsn(m: Option<&ObservedMember>) -> u64 {
    match m.and_then(|m| m.status.as_ref()).map(|s| &s.position) {
        Some(Position::Wal { received_lsn, .. }) => received_lsn.unwrap_or(0),
        _ => 0,
    }
}

/// Why the cluster is not ready for the next step (every pod there,
/// ready, and in sync), or `None`.
fn not_settled(view: &RollView<'_>) -> Option<String> {
    for name in view.instances {
        match view.pod(name) {
            None => return Some(format!("waiting for the pod {name} to be created")),
            Some(p) if p.deleting => return Some(format!("waiting for {name} to be recreated")),
            Some(p) if !p.ready => return Some(format!("waiting for {name} to be ready")),
            Some(_) => {}
        }
        if !view.member(name).is_some_and(|m| m.ready()) {
            return Some(format!("waiting for {name} to be ready"));
        }
    }
    match view.model {
        ReplicationModel::MultiWriter => {
            let size = view.instances.len() as i64;
            for name in view.instances {
                let w = view
                    .member(name)
                    .and_then(|m| m.status.as_ref())
                    .and_then(wsrep_status);
                let synced = w.as_ref().is_some_and(|w| {
                    w.state.eq_ignore_ascii_case("synced")
                        && w.cluster_status.as_deref() == Some("Primary")
                });
                if !synced {
                    return Some(format!(
                        "waiting for {name} to be Synced in a Primary component"
                    ));
                }
                if let Some(n) = w.and_then(|w| w.cluster_size)
                    && n < size
                {
                    return Some(format!(
                        "waiting for the cluster size to be back at {size} (now {n})"
                    ));
                }
            }
        }
        _ => {
            let Some(primary) = view.primary else {
                return Some("waiting for a primary to be recorded".into());
            };
            let Some(ps) = view.member(primary).and_then(|m| m.status.as_ref()) else {
                return Some(format!("waiting for the primary {primary} to answer"));
            };
            if ps.role != Role::Primary {
                return Some(format!("waiting for {primary} to run as the primary"));
            }
            let streaming = streaming_replicas(ps);
            for name in view.instances.iter().filter(|n| *n != primary) {
                if !streaming.contains(name) {
                    return Some(format!("waiting for {name} to be streaming"));
                }
            }
        }
    }
    None
}

/// The most suitable replica to switch over to among `names`: ready,
/// streaming, the most WAL received (lowest ordinal on a tie).
fn switchover_target<'a>(
    view: &RollView<'_>,
    names: impl Iterator<Item = &'a String>,
) -> Option<String> {
    let streaming = view
        .primary
        .and_then(|p| view.member(p))
        .and_then(|m| m.status.as_ref())
        .map(streaming_replicas)
        .unwrap_or_default();
    names
        .filter(|n| !view.is_primary(n) && streaming.contains(n))
        .filter(|n| view.member(n).is_some_and(|m| m.ready()))
        .max_by_key(|n| (received_lsn(view.member(n)), std::cmp::Reverse(ordinal(n))))
        .cloned()
}

/// Whether the instance of the previous action is up again: its pod
/// recreated (another UID) and ready, its manager ready without a pending
/// restart. Pure.
fn up_again(view: &RollView<'_>, f: &InFlight) -> bool {
    let pod_back = view.pod(&f.instance).is_some_and(|p| {
        p.ready && !p.deleting && (f.deleted_uid.is_none() || p.uid != f.deleted_uid)
    });
    let member_back = view
        .member(&f.instance)
        .and_then(|m| m.status.as_ref())
        .is_some_and(|s| s.ready && !s.pending_restart);
    pod_back && member_back
}

/// Whether the instance of the previous action is back: up again (see
/// above) and the cluster settled (every member ready and in sync:
/// streaming, or Synced with the cluster size back). Pure.
pub fn back(view: &RollView<'_>, f: &InFlight) -> bool {
    up_again(view, f) && not_settled(view).is_none()
}

/// The next step of the rolling update (or of a scale-down that must
/// move the primary first). Pure.
pub fn plan(view: &RollView<'_>) -> RollPlan {
    let total = view.instances.len();
    let away = view.in_flight.filter(|f| !back(view, f));
    let updated = view
        .instances
        .iter()
        .filter(|n| {
            view.pod(n).is_some()
                && !view.needs_update(n)
                && away.is_none_or(|f| f.instance != **n || up_again(view, f))
        })
        .count();
    let done = |action| RollPlan {
        action,
        updated,
        total,
        scale_down: false,
    };

    // A scale-down removing the primary's ordinal: move it first.
    if let (Some(keep), Some(primary), ReplicationModel::PrimaryReplica) =
        (view.keep, view.primary, view.model)
        && ordinal(primary) as usize >= keep
    {
        let scaling = |action| RollPlan {
            scale_down: true,
            ..done(action)
        };
        let head = format!("{keep} instances remove the primary {primary}");
        if let Some(why) = view
            .changing
            .map(str::to_string)
            .or_else(|| not_settled(view))
        {
            return scaling(wait(format!("{head}; {why}")));
        }
        let kept = view
            .instances
            .iter()
            .filter(|n| (ordinal(n) as usize) < keep);
        return scaling(match switchover_target(view, kept) {
            Some(to) => RollAction::Switchover {
                from: primary.to_string(),
                to,
                why: SwitchoverFor::ScaleDown,
            },
            None => wait(format!(
                "{head}; waiting for a kept replica streaming from it"
            )),
        });
    }

    // The previous action's instance first comes back (a restart in
    // place that keeps its pending restart is not waited for forever).
    if let Some(f) = away {
        let restart_stuck = f.deleted_uid.is_none()
            && f.age >= RESTART_TIMEOUT
            && view.member(&f.instance).is_some_and(|m| m.ready());
        if restart_stuck {
            return done(wait(format!(
                "{} still needs a restart {}s after it was restarted; the rolling update stopped (see its instance manager's log)",
                f.instance,
                f.age.as_secs()
            )));
        }
        if up_again(view, f)
            && let Some(why) = not_settled(view)
        {
            return done(wait(why));
        }
        let what = match &f.deleted_uid {
            Some(_) if view.pod(&f.instance).is_none() => "to be recreated",
            Some(_) => "to be back ready",
            None => "to restart",
        };
        return done(wait(format!("waiting for {} {what}", f.instance)));
    }
    if !view.instances.iter().any(|n| view.needs_update(n)) {
        return done(RollAction::Done);
    }
    if let Some(why) = view.changing {
        return done(wait(why));
    }
    if let Some(why) = not_settled(view) {
        return done(wait(why));
    }

    // A pending restart that lowers a hot-standby parameter: the primary
    // restarts first and in place (a switchover would make primary a
    // replica still running the higher value, which the old primary could
    // then not follow with the lower one); the replicas take the new
    // settings only after it (controller/reconfigure.rs holds them).
    if let Some(primary) = view.primary.filter(|p| {
        view.pending_restart(p)
            && view
                .member(p)
                .and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.restart_primary_first)
    }) {
        return done(RollAction::Restart {
            instance: primary.to_string(),
            role: view.role_of(primary),
        });
    }

    // Replicas (non-writers) first, the highest ordinal first.
    let mut others: Vec<&String> = view
        .instances
        .iter()
        .filter(|n| !view.is_primary(n) && view.needs_update(n))
        .collect();
    others.sort_by_key(|n| std::cmp::Reverse(ordinal(n)));
    if let Some(next) = others.first() {
        return done(view.update(next));
    }

    // Only the primary / writer is left.
    let Some(primary) = view.primary.filter(|p| view.needs_update(p)) else {
        return done(wait("waiting for a primary to be recorded"));
    };
    if view.model == ReplicationModel::MultiWriter {
        return done(view.update(primary));
    }
    if view.supervised {
        return done(RollAction::AwaitUser {
            primary: primary.to_string(),
        });
    }
    if view.method == PrimaryUpdateMethod::Switchover
        && let Some(to) = switchover_target(view, view.instances.iter())
    {
        return done(RollAction::Switchover {
            from: primary.to_string(),
            to,
            why: SwitchoverFor::Update,
        });
    }
    // `restart`, or no replica to switch over to: in place.
    done(view.update(primary))
}

/// A PostgreSQL scale-down whose removed ordinals hold the primary: the
/// cluster is taken as if `instances` were the primary's ordinal + 1, so
/// that the StatefulSet keeps its pod and the reconcile still observes
/// it, until the switchover to a kept replica is done. Returns the spec's
/// `instances` when it raised the count. Pure.
pub fn hold_scale_down(
    cluster: &mut ValidatedCluster,
    model: ReplicationModel,
    failover: bool,
    previous: Option<&ClusterStatus>,
) -> Option<usize> {
    if model != ReplicationModel::PrimaryReplica || !failover {
        return None;
    }
    let status = previous.filter(|s| s.lease_term > 0)?;
    let primary = status.current_primary.as_deref()?;
    let o = super::decide::ordinal(&cluster.meta.name, primary)? as i32;
    let wanted = cluster.common.instances;
    if o < wanted {
        return None;
    }
    cluster.common.instances = o + 1;
    if let Some(spec) = cluster.spec.as_object_mut() {
        spec.insert("instances".into(), json!(o + 1));
    }
    Some(wanted.max(0) as usize)
}

// ---------------------------------------------------------------------
// Carrying it out
// ---------------------------------------------------------------------

/// What this process remembers per cluster between reconciles (lost on
/// restart: the plan then waits on readiness alone).
#[derive(Default)]
pub(crate) struct Memory {
    clusters: Mutex<HashMap<(String, String), ClusterRoll>>,
}

#[derive(Default)]
struct ClusterRoll {
    /// StatefulSet metadata version → its `updateRevision`.
    revision: Option<(u64, String)>,
    /// The last action, until its instance is back: (instance, deleted
    /// pod UID, when).
    in_flight: Option<(String, Option<String>, Instant)>,
    /// A rolling update ran (an Event when it ends).
    rolling: bool,
    /// The last progress line logged.
    last: Option<String>,
}

impl Memory {
    /// Keep the clusters `keep(namespace, name)` accepts.
    pub(crate) fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut c = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|(ns, name), _| keep(ns, name));
    }

    fn with<T>(&self, ns: &str, name: &str, f: impl FnOnce(&mut ClusterRoll) -> T) -> T {
        let mut c = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        f(c.entry((ns.to_string(), name.to_string())).or_default())
    }
}

/// What the step leaves for status and the requeue.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RollOutcome {
    /// The progress line (phase `Upgrading`, `Progressing`).
    message: Option<String>,
    /// Waiting for the user's switchover.
    awaiting_user: bool,
    /// `status.targetPrimary` to write (a switchover for the update or a
    /// scale-down; the `ha` step carries it out).
    target_primary: Option<String>,
    /// Look again this soon.
    pub(crate) requeue: Option<Duration>,
}

impl RollOutcome {
    /// Put the progress into the computed status: phase `Upgrading`
    /// (unless a failover or switchover phase is shown), the
    /// `Progressing` condition, and the switchover request.
    pub(crate) fn apply(&self, status: &mut ClusterStatus) {
        if let Some(to) = &self.target_primary {
            status.target_primary = Some(to.clone());
        }
        let Some(message) = &self.message else {
            return;
        };
        if !matches!(
            status.phase,
            Some(Phase::Failover | Phase::Switchover | Phase::Failed | Phase::Deleting)
        ) {
            status.phase = Some(Phase::Upgrading);
            status.phase_reason = Some(message.clone());
        }
        set_condition(
            &mut status.conditions,
            condition_type::PROGRESSING,
            true,
            if self.awaiting_user {
                "WaitingForUser"
            } else {
                "RollingUpdate"
            },
            message.clone(),
            status.observed_generation,
            chrono::Utc::now(),
        );
    }
}

fn roll_pod(pod: &Pod) -> RollPod {
    let info = super::decide::PodInfo::from_pod(pod);
    RollPod {
        name: info.name,
        uid: pod.metadata.uid.clone(),
        revision: info.labels.get(LABEL_REVISION).cloned(),
        ready: info.ready,
        deleting: info.deleting,
    }
}

/// The StatefulSet's `status.updateRevision` for its current generation:
/// fetched once per change of the StatefulSet's metadata version (the
/// watch cache holds metadata only) and remembered; `None` while the
/// StatefulSet controller has not observed the current generation.
async fn update_revision(ctx: &KindContext, cluster: &ValidatedCluster) -> Option<String> {
    let (ns, name) = (&cluster.meta.namespace, &cluster.meta.name);
    let sts_name = names::stateful_set(name);
    let child = ctx.caches.child(ChildKind::StatefulSet, ns, &sts_name)?;
    if let Some(rev) = ctx.rolling.with(ns, name, |m| {
        m.revision
            .as_ref()
            .filter(|(v, _)| *v == child.version)
            .map(|(_, r)| r.clone())
    }) {
        return Some(rev);
    }
    let api: Api<StatefulSet> = Api::namespaced(ctx.shared.client.clone(), ns);
    let sts = match api.get(&sts_name).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(statefulset = %sts_name, error = %e, "cannot read the update revision");
            return None;
        }
    };
    let status = sts.status.as_ref()?;
    if status.observed_generation != sts.metadata.generation {
        return None;
    }
    let rev = status.update_revision.clone().filter(|r| !r.is_empty())?;
    ctx.rolling.with(ns, name, |m| {
        m.revision = Some((child.version, rev.clone()))
    });
    Some(rev)
}

fn instance_client(
    ctx: &KindContext,
    cluster: &ValidatedCluster,
    manifest: &EngineManifest,
    seen: &Observation,
    timeout: Duration,
) -> Option<InstanceClient> {
    let token = ctx
        .caches
        .secret(
            &cluster.meta.namespace,
            &names::credentials_secret(&cluster.meta.name),
        )
        .and_then(|s| s.data.as_ref()?.get(SECRET_KEY_API_TOKEN).cloned())
        .and_then(|b| String::from_utf8(b.0).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())?;
    let members = reachable_endpoints(
        &crate::plan::kubernetes_members(cluster, manifest),
        &seen.pods,
    );
    Some(InstanceClient::new(
        token,
        cluster.meta.uid.clone().unwrap_or_default(),
        members,
        timeout,
    ))
}

/// The rolling-update step of a reconcile, after the Galera bootstrap and
/// `ha` steps (`ha`: that step's outcome; `status`: the status as the
/// bootstrap step left it; `keep`: a scale-down held back by
/// [`hold_scale_down`]): plans and carries out at most one action. `None` for
/// clusters it does not apply to (another update strategy, engines
/// without a single primary under the operator's failover and not
/// multi-writer).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn step(
    ctx: &KindContext,
    obj: &DynamicObject,
    cluster: &ValidatedCluster,
    manifest: &EngineManifest,
    seen: &Observation,
    ha: Option<&HaOutcome>,
    status: Option<&ClusterStatus>,
    keep: Option<usize>,
) -> Option<RollOutcome> {
    let engine = &*ctx.engine;
    let model = engine.topology(cluster, None).model;
    let applies = match model {
        ReplicationModel::PrimaryReplica => engine.failover().is_some(),
        ReplicationModel::MultiWriter => true,
        ReplicationModel::NativeElection => false,
    };
    if !applies || cluster.common.update_strategy != UpdateStrategy::SmartUpdate {
        return None;
    }
    let (ns, name) = (cluster.meta.namespace.clone(), cluster.meta.name.clone());
    let object_ref: ObjectReference = obj.object_ref(&ctx.resource);
    let note = |warning: bool, reason: &str, text: String| {
        ctx.shared.reporter.note(&object_ref, warning, reason, text)
    };
    // About one instance: a series of its own (the same reason for
    // another instance is another happening).
    let note_about = |instance: &str, reason: &str, text: String| {
        ctx.shared
            .reporter
            .note_about(&object_ref, instance, EVENT_ACTION, false, reason, text)
    };
    let instances = cluster.instance_names();
    let pods: Vec<RollPod> = ctx
        .caches
        .pods(&ns, &selector_labels(&name, engine.kind()))
        .iter()
        .map(|p| roll_pod(p))
        .filter(|p| instances.contains(&p.name))
        .collect();
    let update_revision = update_revision(ctx, cluster).await;
    let spec = &cluster.spec;
    let galera_writer;
    let primary = match model {
        ReplicationModel::MultiWriter => {
            // The member writes go to. HAProxy pods (`spec.proxy.type:
            // haproxy`, the default) prefer the first member while it is
            // healthy, as the engine's routing does; without a proxy the
            // `-rw` Service follows the writer label, which stays where it
            // is while that member is routable (the decide step's rule).
            let engine_rw = engine.route(&seen.members);
            let proxy = spec.pointer("/proxy/type").and_then(|v| v.as_str());
            galera_writer = if proxy == Some("none") {
                super::decide::decide_routing(
                    &name,
                    engine_rw,
                    &seen.members,
                    &seen.pods,
                    status.and_then(|s| s.current_primary.as_deref()),
                    true,
                )
                .rw
            } else {
                engine_rw.rw
            };
            galera_writer.as_deref()
        }
        _ => ha.and_then(HaOutcome::current_primary),
    };
    let changing = match model {
        ReplicationModel::MultiWriter => status.and_then(|s| s.bootstrap.as_ref()).map(|b| {
            format!(
                "waiting for the bootstrap of the group from {} to finish",
                b.instance
            )
        }),
        _ => ha.and_then(HaOutcome::changing),
    };
    let method = match spec.get("primaryUpdateMethod").and_then(|v| v.as_str()) {
        Some("restart") => PrimaryUpdateMethod::Restart,
        _ => PrimaryUpdateMethod::Switchover,
    };
    let supervised =
        spec.get("primaryUpdateStrategy").and_then(|v| v.as_str()) == Some("supervised");
    let now = Instant::now();
    let in_flight = ctx.rolling.with(&ns, &name, |m| {
        m.in_flight.as_ref().map(|(i, uid, at)| InFlight {
            instance: i.clone(),
            deleted_uid: uid.clone(),
            age: now.duration_since(*at),
        })
    });
    let view = RollView {
        instances: &instances,
        pods: &pods,
        update_revision: update_revision.as_deref(),
        members: &seen.members,
        model,
        primary,
        method,
        supervised,
        changing: changing.as_deref(),
        keep,
        in_flight: in_flight.as_ref(),
    };
    let plan = plan(&view);

    // The previous action's instance is back, updated.
    if let Some(f) = &in_flight
        && back(&view, f)
        && !view.needs_update(&f.instance)
    {
        note_about(
            &f.instance,
            "InstanceUpdated",
            format!(
                "{} runs the current pod template and configuration ({} of {} instances updated)",
                f.instance, plan.updated, plan.total
            ),
        );
        ctx.rolling.with(&ns, &name, |m| m.in_flight = None);
    }

    let mut out = RollOutcome {
        message: plan.message(),
        awaiting_user: matches!(plan.action, RollAction::AwaitUser { .. }),
        ..Default::default()
    };
    let message = out.message.clone();
    let logged = ctx.rolling.with(&ns, &name, |m| {
        let same = m.last == message;
        m.last = message.clone();
        same
    });
    if let Some(text) = &message
        && !logged
    {
        tracing::info!(cluster = %name, "{text}");
    }
    match plan.action {
        RollAction::Done => {
            let was = ctx.rolling.with(&ns, &name, |m| {
                m.in_flight = None;
                std::mem::take(&mut m.rolling)
            });
            if was {
                note(
                    false,
                    "RollingUpdateDone",
                    format!(
                        "every instance ({}) runs the current pod template and configuration",
                        plan.total
                    ),
                );
            }
            return Some(out);
        }
        RollAction::Wait { .. } => {}
        RollAction::AwaitUser { primary } => {
            if !logged {
                note(
                    false,
                    "WaitingForUser",
                    format!(
                        "every replica is updated; waiting for the user to request a switchover of the primary {primary} (primaryUpdateStrategy: supervised)"
                    ),
                );
            }
        }
        RollAction::DeletePod {
            instance,
            uid,
            role,
        } => {
            let started = ctx
                .rolling
                .with(&ns, &name, |m| !std::mem::replace(&mut m.rolling, true));
            if started {
                note(
                    false,
                    "RollingUpdateStarted",
                    format!(
                        "{} of {} instances run an outdated pod template or need a restart; updating one at a time, the {} last",
                        plan.total - plan.updated,
                        plan.total,
                        if model == ReplicationModel::MultiWriter {
                            "writer"
                        } else {
                            "primary"
                        }
                    ),
                );
            }
            if role == "primary" {
                ctx.ha
                    .expect_restart(&ns, &name, &instance, PRIMARY_RESTART_ALLOWANCE)
                    .await;
            }
            let api: Api<Pod> = Api::namespaced(ctx.shared.client.clone(), &ns);
            let params = DeleteParams {
                preconditions: uid.clone().map(|uid| Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&instance, &params).await {
                Ok(_) => {
                    note_about(
                        &instance,
                        "RollingUpdate",
                        format!(
                            "deleted pod {instance} ({role}) to recreate it from the current template ({} of {} instances updated)",
                            plan.updated, plan.total
                        ),
                    );
                    ctx.rolling.with(&ns, &name, |m| {
                        m.in_flight = Some((instance.clone(), uid.clone(), Instant::now()))
                    });
                }
                // Gone or recreated meanwhile: the next plan sees it.
                Err(kube::Error::Api(s)) if s.is_not_found() || s.code == 409 => {}
                Err(e) => note(
                    true,
                    "RollingUpdateFailed",
                    format!("failed to delete pod {instance}: {e}"),
                ),
            }
        }
        RollAction::Restart { instance, role } => {
            ctx.rolling.with(&ns, &name, |m| m.rolling = true);
            if role == "primary" {
                ctx.ha
                    .expect_restart(&ns, &name, &instance, PRIMARY_RESTART_ALLOWANCE)
                    .await;
            }
            ctx.rolling.with(&ns, &name, |m| {
                m.in_flight = Some((instance.clone(), None, Instant::now()))
            });
            note_about(
                &instance,
                "InstanceRestart",
                format!(
                    "restarting {instance} ({role}) in place: its configuration needs a restart ({} of {} instances updated)",
                    plan.updated, plan.total
                ),
            );
            match instance_client(ctx, cluster, manifest, seen, Duration::from_secs(90)) {
                Some(client) => {
                    if let Err(e) = client.action(&instance, ACTION_RESTART, json!({})).await {
                        note(
                            true,
                            "RollingUpdateFailed",
                            format!("failed to restart {instance}: {e}"),
                        );
                    }
                }
                None => tracing::debug!("no instance API token yet"),
            }
        }
        RollAction::Switchover { from, to, why } => {
            ctx.rolling
                .with(&ns, &name, |m| m.rolling |= why == SwitchoverFor::Update);
            note(
                false,
                match why {
                    SwitchoverFor::Update => "SwitchoverForUpdate",
                    SwitchoverFor::ScaleDown => "SwitchoverForScaleDown",
                },
                match why {
                    SwitchoverFor::Update => format!(
                        "every replica is updated; switching over from {from} to {to} before updating {from}"
                    ),
                    SwitchoverFor::ScaleDown => format!(
                        "scaling down to {} removes the primary {from}: switching over to {to} first",
                        keep.unwrap_or_default()
                    ),
                },
            );
            out.target_primary = Some(to);
        }
    }
    out.requeue = Some(REQUEUE_ROLLING);
    Some(out)
}

#[cfg(test)]
mod tests;
