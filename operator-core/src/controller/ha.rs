//! ha: failover, switchover and fencing on Kubernetes, for engines with the
//! failover capability (PostgreSQL) — the controller's side of the rule in
//! `docs/failover.md`, the same rule as the local runtime's
//! (`local/ha.rs`). [`decide`] is pure (observed members, pods, the
//! previous status, the time things were seen → one decision). Carrying a
//! decision out talks to instance managers (HTTP), writes the intent into
//! the cluster's status subresource *before* acting, deletes a failed
//! primary's pod (the host-side fence on Kubernetes) and reports Events.
//! A background task per cluster ([`LeaseTask`]) renews the primary's
//! write lease and wakes the cluster's reconcile when the primary looks
//! unwell.
//!
//! - The operator names the primary (`status.currentPrimary`) and renews
//!   its write lease (TTL [`LEASE_TTL`]) every TTL/4. A manager stops a
//!   writer whose lease expired, and never starts one without a lease once
//!   its volume has held one.
//! - Failover: primary down (after `failoverDelay` and a grace that
//!   depends on how it failed) → `primaryChange` recorded, lease no longer
//!   renewed, writes unrouted → the old primary is fenced through its
//!   manager, or, when that does not answer, the replicas are revoked (no
//!   more failsafe acknowledgements for its term), its lease and their
//!   last acknowledgements are waited out and its pod deleted → the
//!   replicas are detached from it (unreachable case)
//!   → the engine elects → `targetPrimary` and the new lease term recorded
//!   → promote (the lease rides along) → `currentPrimary` → the others
//!   follow.
//! - Switchover: `status.targetPrimary` set to a ready replica → the
//!   primary stops cleanly (fence) → the target catches up → promote →
//!   the others follow (the old primary as a standby).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::apply::FIELD_MANAGER;
use super::decide::PodInfo;
use super::error::DecideError;
use super::observe::{Observation, reachable_endpoints};
use super::reconcile::KindContext;
use crate::api::status::{
    ClusterStatus, Phase, PrimaryChange, PrimaryChangeReason, condition_type, set_condition,
};
use crate::build::{LABEL_ROLE, LABEL_ROUTE, ROUTE_RW, names};
use crate::engine::{
    Election, EngineManifest, InstanceOps, ObservedMember, ReplicationModel, Routing,
    ValidatedCluster,
};
use crate::instance::client::InstanceClient;
use crate::instance::config::PeerEndpoint;
use crate::instance::failsafe::{self, RevokeOutcome, SentLists};
use crate::instance::protocol::{
    ACTION_FENCE, ACTION_FOLLOW, ACTION_LEASE, ACTION_PROMOTE, ACTION_REVOKE, ACTION_SLOTS,
    ACTION_SYNC_STANDBYS, ACTION_UNFENCE, BODY_LEASE, LeaseGrant, Position, ProcessState,
    RevokeReply, RevokeRequest, Role, SECRET_KEY_API_TOKEN,
};
use crate::local::apply::{FENCED_ANNOTATION, fenced_instances};
use crate::local::ha::switchover_refusal;
use crate::topology::{streaming_replicas, sync_standbys};

/// Write-lease TTL granted to the primary (the local runtime's default).
pub const LEASE_TTL: Duration = crate::local::ha::DEFAULT_LEASE_TTL;
/// Added to the TTL before the lease of an unreachable primary is taken as
/// expired (clock rates, the manager's watchdog period, stopping the
/// server).
pub const LEASE_MARGIN: Duration = crate::local::ha::LEASE_MARGIN;
/// How long a primary's manager may not answer before it counts as failed.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(5);
/// How long a primary may run without being ready.
const NOT_READY_GRACE: Duration = Duration::from_secs(3);
/// How long a restarting primary may wait for its lease.
const AWAITING_LEASE_GRACE: Duration = Duration::from_secs(10);
/// A replica not streaming from the primary this long is told to follow…
const NOT_STREAMING_GRACE: Duration = Duration::from_secs(2);
/// … and this long (or failing to start this long), through pg_rewind.
const REWIND_AFTER: Duration = Duration::from_secs(5);
/// Least time between two `follow` requests naming the same primary.
const FOLLOW_EVERY: Duration = Duration::from_secs(3);
/// How often the primary's replication slots are ensured again.
const SLOTS_EVERY: Duration = Duration::from_secs(10);
/// How long a switchover waits for the target to hold the old primary's
/// last WAL.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of the calls that keep a fit primary right (`slots`,
/// `syncStandbys`).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a primary this process promoted keeps the synchronous
/// standbys it started with while none of its replicas streams yet
/// ([`sync_standbys_due`]).
const SYNC_SETTLE: Duration = Duration::from_secs(5);
/// Requeue while a change of primary waits.
const STEP_RETRY: Duration = Duration::from_millis(500);
/// Requeue of a cluster that has no primary yet (a new one: its pods
/// trigger reconciles as they become ready).
const NO_PRIMARY_RETRY: Duration = Duration::from_secs(10);
/// Decisions carried out in one reconcile at most (each re-observes).
const MAX_STEPS: usize = 8;

// ---------------------------------------------------------------------
// The decision (pure)
// ---------------------------------------------------------------------

/// Everything [`decide`] looks at.
#[derive(Clone, Debug)]
pub struct HaView<'a> {
    /// Instance names the spec asks for.
    pub instances: &'a [String],
    /// The managers' reports.
    pub members: &'a [ObservedMember],
    /// The cluster's pods.
    pub pods: &'a [PodInfo],
    /// `status.currentPrimary`.
    pub current_primary: Option<&'a str>,
    /// `status.targetPrimary` (the operator's intent, or a user's request).
    pub target_primary: Option<&'a str>,
    /// `status.primaryChange`.
    pub change: Option<&'a PrimaryChange>,
    /// Instances fenced by the user (`stratum.dev/fencedInstances`).
    pub fenced: &'a BTreeSet<String>,
    /// `spec.failoverDelay`.
    pub failover_delay: Duration,
    /// How long the current primary has been seen unfit (zero when first
    /// seen so now).
    pub primary_down_for: Duration,
    /// The current primary's server exited unexpectedly since it was last
    /// seen fit (its manager restarts it; a crash still fails over).
    pub primary_crashed: bool,
    /// The failed primary's write lease has certainly expired: last
    /// confirmed renewal (or this process's first look at the cluster)
    /// plus [`LEASE_TTL`] plus [`LEASE_MARGIN`] is past, and so is the
    /// last failsafe acknowledgement any revoked replica gave (plus the
    /// margin).
    pub lease_expired: bool,
    /// The replicas were revoked in this change (failsafe: they no longer
    /// acknowledge the failed primary's term), at least one confirmed.
    pub revoked: bool,
    /// Who may be promoted as far as failsafe goes, once revoked: the
    /// revoked replicas that were in every list the failed primary may
    /// hold. `None`: no restriction (the old primary was fenced through
    /// its manager).
    pub promotable: Option<&'a BTreeSet<String>>,
    /// The failed primary's pod was deleted in this change (or is gone).
    pub pod_deleted: bool,
    /// The replicas were detached from the failed primary in this change.
    pub detached: bool,
    /// Members the failed primary reported as synchronous standbys since
    /// it became primary (empty: unknown, every member is compared).
    pub sync_standbys: &'a [String],
}

impl HaView<'_> {
    fn member(&self, name: &str) -> Option<&ObservedMember> {
        self.members.iter().find(|m| m.name == name)
    }
}

/// One step towards the right primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HaDecision {
    /// The primary is fit: keep it, renew its lease, converge the replicas.
    Keep {
        /// The primary.
        primary: String,
    },
    /// No primary is recorded yet: this one is (the one ready primary, or
    /// the one member waiting for its lease).
    Adopt {
        /// The member.
        primary: String,
    },
    /// Nothing safe to do now.
    Wait {
        /// Why (status, Events).
        reason: String,
        /// When to look again.
        retry_after: Duration,
    },
    /// Another member runs as a writer beside the primary: fence it.
    FenceIntruder {
        /// The second writer.
        instance: String,
        /// The recognised primary.
        primary: String,
    },
    /// The primary failed: record the failover, stop renewing its lease,
    /// stop routing writes.
    StartFailover {
        /// The failed primary.
        from: String,
        /// What failed.
        why: String,
    },
    /// A switchover asked for through `status.targetPrimary` cannot be
    /// done; the target is reset and the cluster left alone.
    RefuseSwitchover {
        /// The requested target.
        target: String,
        /// Why.
        why: String,
    },
    /// Record and start a switchover.
    StartSwitchover {
        /// The primary.
        from: String,
        /// The ready replica.
        to: String,
    },
    /// Stop `instance` through its manager and keep it down (the old
    /// primary of a failover: fence; of a switchover: clean demotion).
    Fence {
        /// The instance.
        instance: String,
    },
    /// The failed primary's manager does not answer: revoke failsafe on
    /// every other member (they stop acknowledging its term) before
    /// waiting its lease out.
    Revoke {
        /// The failed primary.
        from: String,
    },
    /// The failed primary's manager does not answer and its lease has
    /// expired: delete its pod (a frozen manager cannot stop its server).
    DeletePod {
        /// The instance.
        instance: String,
    },
    /// Detach every other member from the unreachable old primary, so it
    /// cannot get a commit acknowledged, before positions are compared.
    Detach {
        /// The old primary.
        from: String,
    },
    /// A switchover whose primary no longer answers becomes a failover.
    AbortSwitchover {
        /// The primary.
        from: String,
        /// Why.
        why: String,
    },
    /// Record `targetPrimary` and a new lease term, then promote.
    Promote {
        /// The member to promote.
        candidate: String,
        /// The old primary.
        from: String,
        /// Why this one (Events).
        reason: String,
        /// A switchover: wait until the candidate holds the old primary's
        /// last WAL first.
        catch_up: bool,
    },
}

/// Grace before a failed primary is replaced, by how it failed.
fn grace(view: &HaView<'_>, primary: &str) -> (Duration, String) {
    if view.fenced.contains(primary) {
        return (Duration::ZERO, "fenced by the user".into());
    }
    if view.primary_crashed {
        return (Duration::ZERO, "its server exited unexpectedly".into());
    }
    let Some(m) = view.member(primary) else {
        return (UNREACHABLE_GRACE, "not observed".into());
    };
    match m.status.as_ref() {
        None => (
            UNREACHABLE_GRACE,
            format!(
                "instance manager unreachable ({})",
                m.error.as_deref().unwrap_or("no answer")
            ),
        ),
        Some(s)
            if matches!(s.process, ProcessState::Exited | ProcessState::Stopping)
                || (s.fenced && !s.awaiting_lease) =>
        {
            let why = s
                .message
                .as_deref()
                .map(|m| m.split("; last output").next().unwrap_or(m).to_string())
                .unwrap_or_else(|| format!("server {:?}", s.process));
            (Duration::ZERO, why)
        }
        Some(s) if s.awaiting_lease => (
            AWAITING_LEASE_GRACE,
            "restarted, waiting for its write lease".into(),
        ),
        Some(s) => (
            NOT_READY_GRACE,
            s.message
                .clone()
                .unwrap_or_else(|| format!("not ready (role {})", s.role.as_str())),
        ),
    }
}

/// The next step, from what is observed and recorded. Pure. `elect` is the
/// engine's election over members (`Engine::elect`).
pub fn decide(view: &HaView<'_>, elect: &dyn Fn(&[ObservedMember]) -> Election) -> HaDecision {
    match view.change {
        Some(c) if c.reason == PrimaryChangeReason::Failover => failover_step(view, &c.from, elect),
        Some(c) => switchover_step(view, &c.from),
        None => idle(view, elect),
    }
}

fn idle(view: &HaView<'_>, elect: &dyn Fn(&[ObservedMember]) -> Election) -> HaDecision {
    let Some(primary) = view.current_primary else {
        // A new cluster (or one from before this step existed): the one
        // ready primary, else the member waiting for its lease (it ran as
        // the primary).
        return match elect(view.members) {
            Election::Keep { primary } => HaDecision::Adopt { primary },
            other => {
                let awaiting: Vec<&ObservedMember> = view
                    .members
                    .iter()
                    .filter(|m| m.status.as_ref().is_some_and(|s| s.awaiting_lease))
                    .collect();
                match awaiting.as_slice() {
                    [m] => HaDecision::Adopt {
                        primary: m.name.clone(),
                    },
                    // The pods' readiness changes wake the reconcile
                    // when the first primary starts: no short requeue.
                    _ => HaDecision::Wait {
                        reason: format!("no primary yet: {}", describe(&other)),
                        retry_after: NO_PRIMARY_RETRY,
                    },
                }
            }
        };
    };
    let primary = primary.to_string();
    if let Some(other) = view
        .members
        .iter()
        .find(|m| m.name != primary && m.role() == Role::Primary)
    {
        return HaDecision::FenceIntruder {
            instance: other.name.clone(),
            primary,
        };
    }
    let pm = view.member(&primary);
    let fit = pm.is_some_and(|m| m.role() == Role::Primary && m.ready())
        && !view.fenced.contains(&primary)
        && !view.primary_crashed;
    let requested = view.target_primary.filter(|t| *t != primary);
    if fit {
        if let Some(target) = requested {
            let why = if view.fenced.contains(target) {
                Some(format!(
                    "{target} is fenced ({FENCED_ANNOTATION}); unfence it first"
                ))
            } else {
                switchover_refusal(target, view.instances, Some(&primary), view.members)
            };
            return match why {
                Some(why) => HaDecision::RefuseSwitchover {
                    target: target.to_string(),
                    why,
                },
                None => HaDecision::StartSwitchover {
                    from: primary,
                    to: target.to_string(),
                },
            };
        }
        return HaDecision::Keep { primary };
    }
    if let Some(target) = requested {
        return HaDecision::RefuseSwitchover {
            target: target.to_string(),
            why: format!(
                "the primary {primary} is not ready; a failover, not a switchover, replaces it"
            ),
        };
    }
    if view.instances.len() <= 1 {
        return HaDecision::Wait {
            reason: format!("the primary {primary} is not ready and there is no replica"),
            retry_after: Duration::from_secs(2),
        };
    }
    if view.instances.iter().all(|i| view.fenced.contains(i)) {
        return HaDecision::Wait {
            reason: format!("every instance is fenced; {primary} stays the primary, stopped"),
            retry_after: Duration::from_secs(5),
        };
    }
    if !view
        .members
        .iter()
        .any(|m| m.name != primary && m.status.is_some())
    {
        // No other manager answers: nothing could be promoted, and the
        // operator may be the one cut off. Fencing the primary (or
        // deleting its pod) would only stop the writes.
        return HaDecision::Wait {
            reason: format!(
                "the primary {primary} is unfit and no other instance manager answers; nothing to fail over to"
            ),
            retry_after: Duration::from_secs(2),
        };
    }
    let (grace, why) = grace(view, &primary);
    let due = view.failover_delay + grace;
    if view.primary_down_for >= due {
        HaDecision::StartFailover { from: primary, why }
    } else {
        HaDecision::Wait {
            reason: format!(
                "primary {primary} unfit ({why}) for {}ms; failing over after {}ms",
                view.primary_down_for.as_millis(),
                due.as_millis()
            ),
            retry_after: (due - view.primary_down_for).min(Duration::from_secs(2)),
        }
    }
}

fn failover_step(
    view: &HaView<'_>,
    from: &str,
    elect: &dyn Fn(&[ObservedMember]) -> Election,
) -> HaDecision {
    if let Some(target) = view.target_primary.filter(|t| *t != from) {
        // Chosen (and recorded) before: the same one, never a second.
        return HaDecision::Promote {
            candidate: target.to_string(),
            from: from.to_string(),
            reason: "chosen before".into(),
            catch_up: false,
        };
    }
    let status = view.member(from).and_then(|m| m.status.as_ref());
    match status {
        Some(s) if s.fenced && s.process != ProcessState::Running => {}
        Some(_) => {
            return HaDecision::Fence {
                instance: from.to_string(),
            };
        }
        None => {
            // It may keep its lease on failsafe while it reaches every
            // replica of its list: they are revoked first, then their last
            // acknowledgements are waited out with the lease.
            if !view.revoked {
                return HaDecision::Revoke {
                    from: from.to_string(),
                };
            }
            if !view.lease_expired {
                return HaDecision::Wait {
                    reason: format!(
                        "waiting for the write lease of unreachable {from} and its replicas' failsafe acknowledgements to expire"
                    ),
                    retry_after: STEP_RETRY,
                };
            }
            if !view.pod_deleted {
                return HaDecision::DeletePod {
                    instance: from.to_string(),
                };
            }
            if !view.detached {
                return HaDecision::Detach {
                    from: from.to_string(),
                };
            }
        }
    }
    // Only the failed primary's synchronous standbys can hold its
    // acknowledged commits; a fenced instance is never elected. The old
    // primary stays in the list: the engine counts it among the members.
    let members: Vec<ObservedMember> = view
        .members
        .iter()
        .filter(|m| {
            m.name == from
                || (!view.fenced.contains(&m.name)
                    && (view.sync_standbys.is_empty() || view.sync_standbys.contains(&m.name)))
        })
        .cloned()
        .collect();
    match elect(&members) {
        // The most advanced replica, but it may still acknowledge the old
        // primary's failsafe requests (not revoked: revoke again; not in
        // every list the old primary may hold: wait). Never a less
        // advanced one instead: it may lack acknowledged commits.
        Election::Promote { candidate, .. }
            if view.promotable.is_some_and(|p| !p.contains(&candidate)) =>
        {
            HaDecision::Revoke {
                from: from.to_string(),
            }
        }
        Election::Promote { candidate, reason } => HaDecision::Promote {
            candidate,
            from: from.to_string(),
            reason,
            catch_up: false,
        },
        Election::Keep { primary } if primary != from => HaDecision::Promote {
            candidate: primary,
            from: from.to_string(),
            reason: "already reports itself primary".into(),
            catch_up: false,
        },
        other => HaDecision::Wait {
            reason: format!("failover from {from}: {}", describe(&other)),
            retry_after: match other {
                Election::Wait { retry_after, .. } => retry_after.min(STEP_RETRY),
                _ => Duration::from_secs(2),
            },
        },
    }
}

fn switchover_step(view: &HaView<'_>, from: &str) -> HaDecision {
    let Some(to) = view.target_primary.filter(|t| *t != from) else {
        return HaDecision::AbortSwitchover {
            from: from.to_string(),
            why: "no target recorded".into(),
        };
    };
    match view.member(from).and_then(|m| m.status.as_ref()) {
        None => HaDecision::AbortSwitchover {
            from: from.to_string(),
            why: format!("{from} does not answer"),
        },
        Some(s) if !(s.fenced && s.process != ProcessState::Running) => HaDecision::Fence {
            instance: from.to_string(),
        },
        Some(_) => HaDecision::Promote {
            candidate: to.to_string(),
            from: from.to_string(),
            reason: "switchover".into(),
            catch_up: true,
        },
    }
}

/// What [`decide`] says next once a switchover's old primary `from`
/// answered the fence with `reply`: the promotion of `to` after catching
/// up when the reply says the server stopped (the decision an observation
/// of the fenced, stopped primary leads to), `None` when it may still run
/// (look again). Pure.
pub fn after_switchover_fence(
    from: &str,
    to: &str,
    reply: &serde_json::Value,
) -> Option<HaDecision> {
    (reply.get("stopped").and_then(|v| v.as_bool()) == Some(true)).then(|| HaDecision::Promote {
        candidate: to.to_string(),
        from: from.to_string(),
        reason: "switchover".into(),
        catch_up: true,
    })
}

/// Remember the timeline each replica streams on (the timeline of its
/// running WAL receiver), the highest seen per member.
pub fn note_timelines(members: &[ObservedMember], known: &mut BTreeMap<String, u32>) {
    for m in members {
        let Some(s) = m.status.as_ref().filter(|s| s.role == Role::Replica) else {
            continue;
        };
        let receiving = s
            .details
            .get("walReceiver")
            .and_then(|r| r.get("running"))
            .and_then(|r| r.as_bool())
            == Some(true);
        if let (true, Position::Wal { timeline, .. }) = (receiving, &s.position) {
            let t = known.entry(m.name.clone()).or_insert(*timeline);
            *t = (*t).max(*timeline);
        }
    }
}

/// The members, each replica's timeline raised to the highest it was seen
/// streaming on. A standby without a running WAL receiver (its primary
/// gone, or detached from it) reports its control file's timeline, that
/// of its last restartpoint, which lags behind a promotion elsewhere
/// until its next restartpoint: a replica that streamed timeline 2 and
/// then lost its primary says 1. Its WAL is on 2, and the election
/// (newest timeline first) and the `FailoverCandidate` Event must say so.
/// A data directory's timeline never goes back (a rewind or a re-clone
/// moves it onto the current primary's). Pure.
pub fn with_known_timelines(
    members: &[ObservedMember],
    known: &BTreeMap<String, u32>,
) -> Vec<ObservedMember> {
    members
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let (Some(k), Some(s)) = (known.get(&m.name), m.status.as_mut())
                && s.role == Role::Replica
                && let Position::Wal { timeline, .. } = &mut s.position
            {
                *timeline = (*timeline).max(*k);
            }
            m
        })
        .collect()
}

fn describe(e: &Election) -> String {
    match e {
        Election::Keep { primary } => format!("{primary} is the primary"),
        Election::Promote { candidate, reason } => format!("would promote {candidate} ({reason})"),
        Election::Wait { reason, .. } => format!("waiting: {reason}"),
        Election::NoCandidate { reason } => format!("no candidate: {reason}"),
        Election::Native => "the engine elects natively".into(),
    }
}

/// Which replicas must be told to follow `primary` now, and whether
/// through pg_rewind: fenced or lease-waiting members at once; a member
/// whose history diverged at once, with a rewind; a running replica the
/// primary does not report streaming after [`NOT_STREAMING_GRACE`] (with
/// a rewind after [`REWIND_AFTER`]); a server that keeps exiting after
/// [`REWIND_AFTER`], with a rewind. `since` remembers when each was first
/// seen not streaming. Pure but for that map.
pub fn followers(
    primary: &str,
    members: &[ObservedMember],
    fenced: &BTreeSet<String>,
    since: &mut BTreeMap<String, Instant>,
    now: Instant,
) -> Vec<(String, bool)> {
    let streaming: Vec<String> = members
        .iter()
        .find(|m| m.name == primary)
        .and_then(|m| m.status.as_ref())
        .map(streaming_replicas)
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in members {
        let Some(s) = m
            .status
            .as_ref()
            .filter(|_| m.name != primary && !fenced.contains(&m.name))
        else {
            since.remove(&m.name);
            continue;
        };
        let is_streaming = streaming.contains(&m.name);
        let mut waited = || now.duration_since(*since.entry(m.name.clone()).or_insert(now));
        let (needed, rewind) = if s.fenced || s.awaiting_lease {
            (true, false)
        } else if !is_streaming && s.details.get("diverged").is_some() {
            (true, true)
        } else if s.role == Role::Replica && s.process == ProcessState::Running {
            if is_streaming {
                since.remove(&m.name);
                (false, false)
            } else {
                let w = waited();
                (w >= NOT_STREAMING_GRACE, w >= REWIND_AFTER)
            }
        } else if s.process == ProcessState::Exited {
            let due = waited() >= REWIND_AFTER;
            (due, due)
        } else if s.process == ProcessState::Starting {
            // Keep counting: a server that keeps exiting soon after it
            // starts is rewound after REWIND_AFTER in all.
            (false, false)
        } else {
            since.remove(&m.name);
            (false, false)
        };
        if needed {
            if rewind {
                since.remove(&m.name);
            }
            out.push((m.name.clone(), rewind));
        }
    }
    out
}

/// Whether to tell `primary` now which replicas stream from it (the
/// `syncStandbys` action), given what it was last told and, when this
/// process promoted it, how long ago. Pure.
///
/// - Not when it was told this very set already.
/// - Not while none streams yet, for [`SYNC_SETTLE`] after a promotion
///   and until it was told anything: the engine would have to guess whom
///   commits wait for (PostgreSQL: the first replicas in instance order,
///   after a switchover often the old primary, still restarting as a
///   standby), while a promoted primary runs with the cluster's full list
///   (every instance), which the first replica to stream satisfies. A
///   guess cost up to ten seconds: PostgreSQL re-checks a waiting commit
///   only when a named standby sends its next reply, and the replica that
///   streamed first had already confirmed the commit before it was named.
/// - Otherwise, when the set changed (none streaming included: the
///   engine then decides, e.g. asynchronous with `minSyncReplicas: 0`).
pub fn sync_standbys_due(
    told: Option<&(String, Vec<String>)>,
    primary: &str,
    streaming: &[String],
    promoted_for: Option<Duration>,
) -> bool {
    if told.is_some_and(|(p, s)| p == primary && s == streaming) {
        return false;
    }
    let told_this_primary = told.is_some_and(|(p, _)| p == primary);
    let settling = promoted_for.is_some_and(|d| d < SYNC_SETTLE);
    !(streaming.is_empty() && settling && !told_this_primary)
}

/// Where writes and reads go, given the engine's routing and the recorded
/// primary: writes only to the recognised primary while no change of
/// primary is in progress (a member that claims to be primary otherwise
/// never gets them); user-fenced instances get nothing. Pure.
pub fn restrict_routing(
    engine: Routing,
    current_primary: Option<&str>,
    changing: bool,
    fenced: &BTreeSet<String>,
) -> Routing {
    let rw = engine
        .rw
        .filter(|rw| !changing && Some(rw.as_str()) == current_primary && !fenced.contains(rw));
    let ro = engine
        .ro
        .into_iter()
        .filter(|r| !fenced.contains(r) && Some(r) != rw.as_ref())
        .collect();
    Routing { rw, ro }
}

// ---------------------------------------------------------------------
// The write lease, renewed in the background
// ---------------------------------------------------------------------

/// The lease holder and how to reach it.
#[derive(Clone)]
struct Holder {
    name: String,
    term: u64,
    client: InstanceClient,
    /// Its failsafe list: the other members reachable by pod IP (running
    /// pods), not fenced by the user.
    replicas: Vec<PeerEndpoint>,
}

/// Renews the primary's write lease every TTL/4 in a task of its own, so
/// that a slow reconcile never lets it lapse; wakes the cluster's
/// reconcile when a renewal fails or the answer shows the server not
/// running or restarted. Aborted when dropped (cluster deleted, operator
/// stopped or no longer the leader).
pub(crate) struct LeaseTask {
    holder: watch::Sender<Option<Holder>>,
    /// When each instance last confirmed a renewal.
    renewed: Arc<Mutex<BTreeMap<String, Instant>>>,
    /// A crash seen in a renewal answer: (instance, when).
    crashed: Arc<Mutex<Option<(String, Instant)>>>,
    /// The failsafe lists sent to each holder (which ones it may hold).
    lists: Arc<Mutex<SentLists>>,
    /// A renewal's answer said the holder had kept writes on failsafe for
    /// so many ms (reported by the step as an Event).
    failsafe_ended: Arc<Mutex<Option<(String, u64)>>>,
    /// User-fenced instances: not in failsafe lists.
    fenced: Mutex<BTreeSet<String>>,
    started: Instant,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseTask {
    fn start(wake: impl Fn() + Send + 'static) -> Self {
        let (holder, mut rx) = watch::channel::<Option<Holder>>(None);
        let renewed: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
        let crashed: Arc<Mutex<Option<(String, Instant)>>> = Arc::default();
        let lists: Arc<Mutex<SentLists>> = Arc::default();
        let failsafe_ended: Arc<Mutex<Option<(String, u64)>>> = Arc::default();
        let (seen, crash) = (renewed.clone(), crashed.clone());
        let (lists_t, ended_t) = (lists.clone(), failsafe_ended.clone());
        let task = tokio::spawn(async move {
            // The restart count of the holder's server at the last answer.
            let mut restarts: Option<(String, u64)> = None;
            loop {
                let current = rx.borrow_and_update().clone();
                if let Some(h) = current {
                    if let Ok(mut l) = lists_t.lock() {
                        l.sent(&h.name, h.term, &h.replicas);
                    }
                    let body = json!({ BODY_LEASE: LeaseGrant {
                        holder: h.name.clone(),
                        term: h.term,
                        ttl_ms: LEASE_TTL.as_millis() as u64,
                        replicas: Some(h.replicas.clone()),
                    }});
                    match h.client.action(&h.name, ACTION_LEASE, body).await {
                        Ok(reply) => {
                            if let Ok(mut r) = seen.lock() {
                                r.insert(h.name.clone(), Instant::now());
                            }
                            if let Ok(mut l) = lists_t.lock() {
                                l.confirmed(&h.name, h.term, &h.replicas);
                            }
                            if let Some(ms) = reply.get("failsafeKeptMs").and_then(|v| v.as_u64()) {
                                if let Ok(mut e) = ended_t.lock() {
                                    *e = Some((h.name.clone(), ms));
                                }
                                wake();
                            }
                            let count = reply.get("restarts").and_then(|v| v.as_u64());
                            let running = reply.get("process").and_then(|v| v.as_str());
                            let restarted = matches!(
                                (&restarts, count),
                                (Some((n, before)), Some(now)) if *n == h.name && now > *before
                            );
                            if restarted && let Ok(mut c) = crash.lock() {
                                *c = Some((h.name.clone(), Instant::now()));
                            }
                            if let Some(count) = count {
                                restarts = Some((h.name.clone(), count));
                            }
                            if restarted || running.is_some_and(|p| p != "running") {
                                wake();
                            }
                        }
                        Err(e) => {
                            tracing::debug!(instance = %h.name, error = %e, "lease renewal failed");
                            wake();
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(LEASE_TTL / 4) => {}
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
        });
        Self {
            holder,
            renewed,
            crashed,
            lists,
            failsafe_ended,
            fenced: Mutex::default(),
            started: Instant::now(),
            task,
        }
    }

    fn set(&self, holder: Option<(String, u64, InstanceClient)>) {
        let fenced = self.fenced.lock().map(|f| f.clone()).unwrap_or_default();
        let holder = holder.map(|(name, term, client)| {
            let replicas = failsafe::list(client.members(), &fenced, &name);
            Holder {
                name,
                term,
                client,
                replicas,
            }
        });
        self.holder.send_if_modified(|cur| {
            let same = match (cur.as_ref(), holder.as_ref()) {
                (Some(a), Some(b)) => a.name == b.name && a.term == b.term,
                (None, None) => true,
                _ => false,
            };
            if same {
                // A new client (pod IP changed) and list without waking
                // the task.
                if let (Some(c), Some(h)) = (cur.as_mut(), holder) {
                    c.client = h.client;
                    c.replicas = h.replicas;
                }
                false
            } else {
                *cur = holder;
                true
            }
        });
    }

    fn note_renewed(&self, name: &str) {
        if let Ok(mut r) = self.renewed.lock() {
            r.insert(name.to_string(), Instant::now());
        }
    }

    fn set_fenced(&self, fenced: &BTreeSet<String>) {
        if let Ok(mut f) = self.fenced.lock() {
            f.clone_from(fenced);
        }
    }

    /// The failsafe list a promotion's grant carries, noted as sent.
    fn list_for(&self, holder: &str, term: u64, client: &InstanceClient) -> Vec<PeerEndpoint> {
        let fenced = self.fenced.lock().map(|f| f.clone()).unwrap_or_default();
        let list = failsafe::list(client.members(), &fenced, holder);
        if let Ok(mut l) = self.lists.lock() {
            l.sent(holder, term, &list);
        }
        list
    }

    fn confirmed(&self, holder: &str, term: u64, list: &[PeerEndpoint]) {
        if let Ok(mut l) = self.lists.lock() {
            l.confirmed(holder, term, list);
        }
    }

    fn in_every_list(&self, holder: &str, term: u64) -> Option<BTreeSet<String>> {
        self.lists.lock().ok()?.in_every_list(holder, term)
    }

    fn take_failsafe_ended(&self) -> Option<(String, u64)> {
        self.failsafe_ended.lock().ok()?.take()
    }

    /// Whether `name`'s lease has certainly expired (see
    /// [`HaView::lease_expired`]).
    fn expired(&self, name: &str, now: Instant) -> bool {
        let last = self
            .renewed
            .lock()
            .ok()
            .and_then(|r| r.get(name).copied())
            .unwrap_or(self.started)
            .max(self.started);
        now > last + LEASE_TTL + LEASE_MARGIN
    }

    fn crashed(&self, name: &str) -> bool {
        self.crashed
            .lock()
            .ok()
            .is_some_and(|c| c.as_ref().is_some_and(|(n, _)| n == name))
    }

    fn clear_crash(&self) {
        if let Ok(mut c) = self.crashed.lock() {
            *c = None;
        }
    }
}

impl Drop for LeaseTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------
// What the controller remembers per cluster
// ---------------------------------------------------------------------

/// What this process remembers about one cluster between reconciles
/// (lost on restart: what must survive is in status).
pub(crate) struct ClusterHa {
    lease: LeaseTask,
    /// The primary seen unfit, and since when.
    down_since: Option<(String, Instant)>,
    /// The primary and the members it reported as synchronous standbys
    /// since it became primary.
    sync_standbys: Option<(String, Vec<String>)>,
    slots_done: Option<(String, Instant)>,
    sync_told: Option<(String, Vec<String>)>,
    /// The member this process promoted last, and when.
    promoted: Option<(String, Instant)>,
    not_streaming_since: BTreeMap<String, Instant>,
    last_follow: BTreeMap<String, (Instant, String)>,
    following: Arc<Mutex<BTreeSet<String>>>,
    /// The failed primary whose replicas were detached, whose pod was
    /// deleted (by failover start time).
    detached: Option<(String, chrono::DateTime<Utc>)>,
    /// The failed primary whose replicas were revoked (by failover start
    /// time), with their answers.
    revoked: Option<(String, chrono::DateTime<Utc>, RevokeOutcome)>,
    pod_deleted: Option<(String, chrono::DateTime<Utc>)>,
    /// A switchover's old primary and its last WAL position before it
    /// was stopped.
    switchover_lsn: Option<(String, u64)>,
    /// A switchover whose target and new lease term were recorded with
    /// its start (target, term, the change's start): its promotion needs
    /// no second intent write.
    switchover_intent: Option<(String, u64, chrono::DateTime<Utc>)>,
    /// When this process started the switchover in progress, and how long
    /// recording it and stopping the old primary took (the breakdown in
    /// the `Switchover` Event).
    switchover_clock: Option<(Instant, Duration, Duration)>,
    /// The highest timeline each replica was seen streaming on
    /// ([`with_known_timelines`]).
    timelines: BTreeMap<String, u32>,
    /// User-fenced instances this process stopped.
    fenced_done: BTreeSet<String>,
    fenced: BTreeSet<String>,
    last_wait: Option<String>,
    /// A primary restarted on purpose (the rolling update), and until
    /// when its failover waits longer ([`HaRegistry::expect_restart`]).
    planned_restart: Option<(String, Instant, Duration)>,
}

impl ClusterHa {
    /// Extra failover delay for `primary` while a planned restart of it
    /// runs.
    fn restart_allowance(&self, primary: &str, now: Instant) -> Duration {
        match &self.planned_restart {
            // The whole allowance while it runs (the primary's down time
            // counts from when it went down, about when it started).
            Some((p, until, allowance)) if p == primary && *until > now => *allowance,
            _ => Duration::ZERO,
        }
    }
}

/// One cluster's memory, locked by the reconcile that uses it.
type SharedClusterHa = Arc<tokio::sync::Mutex<ClusterHa>>;

/// Every cluster's [`ClusterHa`] of one kind, and the channel that wakes a
/// cluster's reconcile (`Controller::reconcile_on`).
pub(crate) struct HaRegistry {
    clusters: Mutex<HashMap<(String, String), SharedClusterHa>>,
    wake: UnboundedSender<ObjectRef<DynamicObject>>,
}

impl HaRegistry {
    /// A registry waking reconciles through `wake`.
    pub(crate) fn new(wake: UnboundedSender<ObjectRef<DynamicObject>>) -> Self {
        Self {
            clusters: Mutex::default(),
            wake,
        }
    }

    fn get(&self, ns: &str, name: &str, object: ObjectRef<DynamicObject>) -> SharedClusterHa {
        let mut map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((ns.to_string(), name.to_string()))
            .or_insert_with(|| {
                let wake = self.wake.clone();
                Arc::new(tokio::sync::Mutex::new(ClusterHa {
                    lease: LeaseTask::start(move || {
                        let _ = wake.unbounded_send(object.clone());
                    }),
                    down_since: None,
                    sync_standbys: None,
                    slots_done: None,
                    sync_told: None,
                    promoted: None,
                    not_streaming_since: BTreeMap::new(),
                    last_follow: BTreeMap::new(),
                    following: Arc::default(),
                    detached: None,
                    revoked: None,
                    pod_deleted: None,
                    switchover_lsn: None,
                    switchover_intent: None,
                    switchover_clock: None,
                    timelines: BTreeMap::new(),
                    fenced_done: BTreeSet::new(),
                    fenced: BTreeSet::new(),
                    last_wait: None,
                    planned_restart: None,
                }))
            })
            .clone()
    }

    /// Keep the clusters `keep(namespace, name)` accepts; the others' lease
    /// renewals stop.
    pub(crate) fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(ns, name), _| keep(ns, name));
    }

    /// The rolling update restarts (or recreates the pod of) `primary`
    /// on purpose: for `allowance` its failover waits that much longer
    /// (added to `failoverDelay`), so that the restart is not taken for a
    /// failure. A cluster this step has not seen yet is left alone.
    pub(crate) async fn expect_restart(
        &self,
        ns: &str,
        name: &str,
        primary: &str,
        allowance: Duration,
    ) {
        let state = {
            let map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
            map.get(&(ns.to_string(), name.to_string())).cloned()
        };
        if let Some(state) = state {
            state.lock().await.planned_restart =
                Some((primary.to_string(), Instant::now() + allowance, allowance));
        }
    }

    /// How many clusters have a lease task (tests, metrics).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.clusters.lock().unwrap().len()
    }
}

// ---------------------------------------------------------------------
// Carrying decisions out
// ---------------------------------------------------------------------

/// What the step decided for the rest of the reconcile: the HA fields of
/// status, where writes may go, and when to look again.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct HaOutcome {
    current_primary: Option<String>,
    target_primary: Option<String>,
    lease_term: u64,
    primary_change: Option<PrimaryChange>,
    timeline: Option<u32>,
    fenced: BTreeSet<String>,
    /// `Switchover` condition to set: (ok, reason, message).
    switchover: Option<(bool, &'static str, String)>,
    /// Look again this soon.
    pub(crate) requeue: Option<Duration>,
}

impl HaOutcome {
    /// The recorded primary (`status.currentPrimary` as this step moved
    /// it).
    pub(crate) fn current_primary(&self) -> Option<&str> {
        self.current_primary.as_deref()
    }

    /// Why no planned restart may start now: a failover or switchover in
    /// progress, or one requested (`targetPrimary` not the primary).
    pub(crate) fn changing(&self) -> Option<String> {
        if let Some(c) = &self.primary_change {
            let kind = match c.reason {
                PrimaryChangeReason::Failover => "failover",
                PrimaryChangeReason::Switchover => "switchover",
            };
            return Some(format!("waiting for the {kind} from {} to finish", c.from));
        }
        match (&self.target_primary, &self.current_primary) {
            (Some(t), Some(c)) if t != c => {
                Some(format!("waiting for the requested switchover to {t}"))
            }
            _ => None,
        }
    }

    /// The engine's routing restricted by [`restrict_routing`].
    pub(crate) fn routing(&self, engine: Routing) -> Routing {
        restrict_routing(
            engine,
            self.current_primary.as_deref(),
            self.primary_change.is_some(),
            &self.fenced,
        )
    }

    /// Put the HA fields into the computed status: the recorded primary
    /// (not the routed one), the intent, the term, the change in progress
    /// (phase `Failover`/`Switchover`), the timeline and the `Switchover`
    /// condition.
    pub(crate) fn apply(&self, previous: Option<&ClusterStatus>, status: &mut ClusterStatus) {
        let now = Utc::now();
        // No primary recorded and no change running (no manager has
        // answered yet, e.g. pods without a kubelet): the status writer's
        // view (the routed writer) stands.
        if self.current_primary.is_some() || self.primary_change.is_some() {
            let before = previous.and_then(|s| s.current_primary.clone());
            status.current_primary_timestamp = if before != self.current_primary {
                Some(now)
            } else {
                previous.and_then(|s| s.current_primary_timestamp)
            };
            status.current_primary = self.current_primary.clone();
            status.target_primary = self.target_primary.clone();
        }
        status.lease_term = self.lease_term;
        status.primary_change = self.primary_change.clone();
        status.timeline = self.timeline;
        if let Some(change) = &self.primary_change {
            let phase = match change.reason {
                PrimaryChangeReason::Failover => Phase::Failover,
                PrimaryChangeReason::Switchover => Phase::Switchover,
            };
            status.phase = Some(phase);
            status.phase_reason = Some(format!(
                "{} from {} in progress{}",
                phase.as_str().to_lowercase(),
                change.from,
                self.target_primary
                    .as_deref()
                    .filter(|t| *t != change.from)
                    .map(|t| format!(" to {t}"))
                    .unwrap_or_default()
            ));
        }
        if let Some((ok, reason, message)) = &self.switchover {
            set_condition(
                &mut status.conditions,
                condition_type::SWITCHOVER,
                *ok,
                reason,
                message.clone(),
                status.observed_generation,
                now,
            );
        }
    }
}

/// The instance-manager client of a cluster, reaching the managers as
/// observe does (by pod IP, running pods only: an action for any other
/// fails at once), with `timeout` per request.
fn client_for(
    cluster: &ValidatedCluster,
    manifest: &EngineManifest,
    pods: &[PodInfo],
    token: &str,
    timeout: Duration,
) -> InstanceClient {
    let members: Vec<PeerEndpoint> =
        reachable_endpoints(&crate::plan::kubernetes_members(cluster, manifest), pods);
    InstanceClient::new(
        token.to_string(),
        cluster.meta.uid.clone().unwrap_or_default(),
        members,
        timeout,
    )
}

fn wal_lsn(m: Option<&ObservedMember>) -> Option<u64> {
    match m?.status.as_ref()?.position {
        Position::Wal { received_lsn, .. } => received_lsn,
        _ => None,
    }
}

/// The HA fields as recorded now (what status says, as this step moves it).
#[derive(Clone, Debug)]
struct Record {
    current: Option<String>,
    target: Option<String>,
    term: u64,
    change: Option<PrimaryChange>,
    timeline: Option<u32>,
}

impl Record {
    /// Start a change of primary away from `from`, towards `target` (a
    /// switchover's replica; none for a failover, whose candidate is
    /// chosen later).
    fn start_change(&mut self, reason: PrimaryChangeReason, from: &str, target: Option<String>) {
        self.change = Some(PrimaryChange {
            reason,
            from: from.to_string(),
            started_at: Utc::now(),
        });
        self.target = target;
    }
}

/// Everything one step needs to act.
struct Io<'a> {
    ctx: &'a KindContext,
    obj: &'a DynamicObject,
    object_ref: ObjectReference,
    cluster: &'a ValidatedCluster,
    manifest: &'a EngineManifest,
    token: String,
}

impl Io<'_> {
    fn note(&self, warning: bool, reason: &str, note: String) {
        self.ctx
            .shared
            .reporter
            .note(&self.object_ref, warning, reason, note);
    }

    /// Merge-patch the HA fields into status now, before acting on them.
    async fn record(&self, rec: &Record, step: &str) -> Result<(), DecideError> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.ctx.shared.client.clone(),
            &self.cluster.meta.namespace,
            &self.ctx.resource,
        );
        let patch = json!({ "status": {
            "currentPrimary": rec.current,
            "targetPrimary": rec.target,
            // As the status writer has it: absent while zero.
            "leaseTerm": (rec.term > 0).then_some(rec.term),
            "primaryChange": rec.change,
            "timeline": rec.timeline,
        }});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        api.patch_status(&self.obj.name_any(), &params, &Patch::Merge(&patch))
            .await
            .map(|stored| self.ctx.remember_status(&stored))
            .map_err(|source| DecideError::RecordIntent {
                name: self.cluster.meta.name.clone(),
                step: step.to_string(),
                source,
            })
    }

    fn client(&self, pods: &[PodInfo], timeout: Duration) -> InstanceClient {
        client_for(self.cluster, self.manifest, pods, &self.token, timeout)
    }

    /// Put the `rw` route label on `instance`'s pod (with the primary
    /// role), or take it off, now rather than at the end of the
    /// reconcile: the `-rw` Service follows at once. The reconcile's
    /// label step sets the same values afterwards.
    async fn route_writes(&self, instance: &str, writer: bool) -> Result<(), kube::Error> {
        let labels = if writer {
            json!({ LABEL_ROUTE: ROUTE_RW, LABEL_ROLE: Role::Primary.as_str() })
        } else {
            json!({ LABEL_ROUTE: null })
        };
        let api: Api<Pod> =
            Api::namespaced(self.ctx.shared.client.clone(), &self.cluster.meta.namespace);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match api
            .patch(
                instance,
                &params,
                &Patch::Merge(&json!({ "metadata": { "labels": labels } })),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The instance API token from the cached credentials Secret.
fn read_token(ctx: &KindContext, ns: &str, cluster: &str) -> Option<String> {
    ctx.caches
        .secret(ns, &names::credentials_secret(cluster))
        .and_then(|s| s.data.as_ref()?.get(SECRET_KEY_API_TOKEN).cloned())
        .and_then(|b| String::from_utf8(b.0).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The HA step of a reconcile, between observe and routing: for engines
/// with the failover capability and a single primary. Decides and acts
/// until nothing more can be done now (at most [`MAX_STEPS`] decisions),
/// refreshing `seen.members` after each action. `None` for other engines.
pub(crate) async fn step(
    ctx: &KindContext,
    obj: &DynamicObject,
    cluster: &ValidatedCluster,
    manifest: &EngineManifest,
    seen: &mut Observation,
    previous: Option<&ClusterStatus>,
) -> Result<Option<HaOutcome>, DecideError> {
    let engine = &*ctx.engine;
    if engine.failover().is_none()
        || engine.topology(cluster, None).model != ReplicationModel::PrimaryReplica
    {
        return Ok(None);
    }
    let (ns, name) = (cluster.meta.namespace.clone(), cluster.meta.name.clone());
    let mut rec = Record {
        // Recorded by this step (it has a lease term); not the writer the
        // status writer routed by pod readiness before any manager
        // answered.
        current: previous
            .filter(|s| s.lease_term > 0)
            .and_then(|s| s.current_primary.clone()),
        target: previous.and_then(|s| s.target_primary.clone()),
        term: previous.map_or(0, |s| s.lease_term),
        change: previous.and_then(|s| s.primary_change.clone()),
        timeline: previous.and_then(|s| s.timeline),
    };
    let object_ref = obj.object_ref(&ctx.resource);
    let state = ctx.ha.get(
        &ns,
        &name,
        ObjectRef::new_with(&name, ctx.resource.clone()).within(&ns),
    );
    let mut mem = state.lock().await;
    let mut out = HaOutcome::default();

    // User fencing: the annotation, checked like the local runtime does;
    // a bad value changes nothing.
    let instances = cluster.instance_names();
    let object = json!({ "metadata": { "annotations": obj.annotations() } });
    match fenced_instances(&object, &instances) {
        Ok(f) => {
            if f != mem.fenced {
                ctx.shared.reporter.note(
                    &object_ref,
                    false,
                    "FencingChanged",
                    format!(
                        "fenced by the user: {}",
                        if f.is_empty() {
                            "none".to_string()
                        } else {
                            f.iter().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ),
                );
                mem.fenced = f;
            }
        }
        Err(e) => ctx.shared.reporter.note(
            &object_ref,
            true,
            "InvalidFencing",
            format!("{e}; fencing left as it was"),
        ),
    }
    out.fenced = mem.fenced.clone();
    mem.lease.set_fenced(&mem.fenced);

    let Some(token) = read_token(ctx, &ns, &name) else {
        out.current_primary = rec.current;
        out.target_primary = rec.target;
        out.lease_term = rec.term;
        out.primary_change = rec.change;
        out.timeline = rec.timeline;
        return Ok(Some(out));
    };
    let io = Io {
        ctx,
        obj,
        object_ref,
        cluster,
        manifest,
        token,
    };
    let failover_delay = cluster
        .spec
        .get("failoverDelay")
        .and_then(|v| v.as_u64())
        .map(Duration::from_secs)
        .unwrap_or_default();

    apply_fencing(&io, &mut mem, &seen.members, &seen.pods).await;

    let mut requeue: Option<Duration> = None;
    // The next decision when a manager's reply already settled it (no
    // need to look again).
    let mut next: Option<HaDecision> = None;
    for _ in 0..MAX_STEPS {
        let now = Instant::now();
        // How long the recorded primary has been unfit.
        let primary_fit = rec.current.as_deref().is_some_and(|p| {
            seen.members
                .iter()
                .any(|m| m.name == p && m.role() == Role::Primary && m.ready())
                && !mem.lease.crashed(p)
        });
        let down_for = match (&rec.current, primary_fit) {
            (Some(p), false) => {
                let since = match &mem.down_since {
                    Some((n, t)) if n == p => *t,
                    _ => {
                        mem.down_since = Some((p.clone(), now));
                        now
                    }
                };
                now.duration_since(since)
            }
            _ => {
                mem.down_since = None;
                Duration::ZERO
            }
        };
        let from = rec.change.as_ref().map(|c| c.from.clone());
        let started = rec.change.as_ref().map(|c| c.started_at);
        let this_change = |m: &Option<(String, chrono::DateTime<Utc>)>| {
            m.as_ref()
                .is_some_and(|(n, t)| Some(n) == from.as_ref() && Some(*t) == started)
        };
        let pod_gone = from
            .as_deref()
            .is_some_and(|f| !seen.pods.iter().any(|p| p.name == f && !p.deleting));
        let sync: Vec<String> = match (&mem.sync_standbys, &from) {
            (Some((p, names)), Some(f)) if p == f => names.clone(),
            _ => Vec::new(),
        };
        // Replicas' timelines as last seen streaming (a standby that lost
        // its primary reports a stale one).
        note_timelines(&seen.members, &mut mem.timelines);
        let members = with_known_timelines(&seen.members, &mem.timelines);
        let revoke = mem
            .revoked
            .as_ref()
            .filter(|(n, t, out)| {
                Some(n) == from.as_ref() && Some(*t) == started && !out.revoked.is_empty()
            })
            .map(|(_, _, out)| out.clone());
        let promotable: Option<BTreeSet<String>> = match (&revoke, &from) {
            (Some(out), Some(f)) => {
                let possible = mem.lease.in_every_list(f, out.term);
                Some(
                    out.revoked
                        .iter()
                        .filter(|n| failsafe::may_promote(n, out, possible.as_ref()))
                        .cloned()
                        .collect(),
                )
            }
            _ => None,
        };
        let view = HaView {
            instances: &instances,
            members: &members,
            pods: &seen.pods,
            current_primary: rec.current.as_deref(),
            target_primary: rec.target.as_deref(),
            change: rec.change.as_ref(),
            fenced: &mem.fenced,
            // A primary the rolling update restarts on purpose gets longer.
            failover_delay: failover_delay
                + rec
                    .current
                    .as_deref()
                    .map_or(Duration::ZERO, |p| mem.restart_allowance(p, now)),
            primary_down_for: down_for,
            primary_crashed: rec.current.as_deref().is_some_and(|p| mem.lease.crashed(p)),
            lease_expired: from.as_deref().is_some_and(|f| mem.lease.expired(f, now))
                && revoke
                    .as_ref()
                    .is_none_or(|r| r.grants_expired(now, LEASE_MARGIN)),
            revoked: revoke.is_some(),
            promotable: promotable.as_ref(),
            pod_deleted: this_change(&mem.pod_deleted) || pod_gone,
            detached: this_change(&mem.detached),
            sync_standbys: &sync,
        };
        let decision = match next.take() {
            Some(d) => d,
            None => decide(&view, &|members| engine.elect(cluster, members)),
        };
        tracing::debug!(?decision, "ha decision");
        let acted = act(
            &io,
            &mut mem,
            &mut rec,
            seen,
            decision,
            &mut out,
            &mut requeue,
            &mut next,
        )
        .await?;
        if !acted {
            break;
        }
        if next.is_some() {
            continue;
        }
        // Look again after acting.
        let client = io.client(&seen.pods, ctx.shared.opts.instance_timeout);
        seen.members = observe_members(&client, &instances).await;
    }
    out.current_primary = rec.current;
    out.target_primary = rec.target;
    out.lease_term = rec.term;
    out.primary_change = rec.change;
    out.timeline = rec.timeline;
    out.requeue = requeue;
    Ok(Some(out))
}

/// Every instance's report, in instance order (as observe records them:
/// a member whose pod does not run has none).
async fn observe_members(client: &InstanceClient, instances: &[String]) -> Vec<ObservedMember> {
    let reports = client.observe_all().await;
    instances
        .iter()
        .map(|n| {
            reports
                .iter()
                .find(|r| &r.name == n)
                .cloned()
                .unwrap_or_else(|| ObservedMember {
                    name: n.clone(),
                    status: None,
                    error: Some("pod is not running".into()),
                })
        })
        .collect()
}

/// Stop the user-fenced instances that run; unfence those no longer named.
async fn apply_fencing(
    io: &Io<'_>,
    mem: &mut ClusterHa,
    members: &[ObservedMember],
    pods: &[PodInfo],
) {
    if mem.fenced.is_empty() && mem.fenced_done.is_empty() {
        return;
    }
    let quick = io.client(pods, Duration::from_secs(3));
    for m in members {
        let Some(s) = m.status.as_ref() else { continue };
        if mem.fenced.contains(&m.name) {
            if !s.fenced || !mem.fenced_done.contains(&m.name) {
                match quick.action(&m.name, ACTION_FENCE, json!({})).await {
                    Ok(_) => {
                        if mem.fenced_done.insert(m.name.clone()) {
                            io.note(
                                false,
                                "Fenced",
                                format!("{} stopped: fenced by the user", m.name),
                            );
                        }
                    }
                    Err(e) => tracing::warn!(instance = %m.name, error = %e, "fence failed"),
                }
            }
        } else if mem.fenced_done.contains(&m.name) {
            match quick.action(&m.name, ACTION_UNFENCE, json!({})).await {
                Ok(_) => {
                    mem.fenced_done.remove(&m.name);
                    io.note(
                        false,
                        "Unfenced",
                        format!("{} unfenced by the user", m.name),
                    );
                }
                Err(e) => tracing::warn!(instance = %m.name, error = %e, "unfence failed"),
            }
        }
    }
}

/// Carry out one decision. Returns whether it acted (observe again and
/// decide again) or waits.
#[allow(clippy::too_many_arguments)]
async fn act(
    io: &Io<'_>,
    mem: &mut ClusterHa,
    rec: &mut Record,
    seen: &Observation,
    decision: HaDecision,
    out: &mut HaOutcome,
    requeue: &mut Option<Duration>,
    next: &mut Option<HaDecision>,
) -> Result<bool, DecideError> {
    let members = &seen.members;
    let pods = &seen.pods;
    let wait = |requeue: &mut Option<Duration>, d: Duration| {
        *requeue = Some(requeue.map_or(d, |r| r.min(d)));
    };
    match decision {
        HaDecision::Keep { primary } => {
            mem.last_wait = None;
            if let Some((name, ms)) = mem.lease.take_failsafe_ended() {
                io.note(
                    false,
                    "FailsafeEnded",
                    format!(
                        "primary {name} kept writes on failsafe for {:.1} s while the operator was away",
                        ms as f64 / 1000.0
                    ),
                );
            }
            let client = io.client(pods, LEASE_TTL / 4);
            mem.lease.set(Some((primary.clone(), rec.term, client)));
            if let Some(again) = converge(io, mem, rec, &primary, members, pods).await {
                wait(requeue, again);
            }
            Ok(false)
        }
        HaDecision::Adopt { primary } => {
            rec.current = Some(primary.clone());
            rec.target = Some(primary.clone());
            // Term 1 at least: a recorded primary is one with a term
            // (the status writer's routed writer, recorded before any
            // manager answered, has none).
            rec.term = rec.term.max(1);
            io.record(rec, &format!("adopt {primary}")).await?;
            let client = io.client(pods, LEASE_TTL / 4);
            mem.lease.set(Some((primary.clone(), rec.term, client)));
            io.note(
                false,
                "PrimaryAdopted",
                format!("{primary} is the primary (write lease term {})", rec.term),
            );
            // Its lease is granted by the task now; look again shortly.
            wait(requeue, Duration::from_secs(1));
            Ok(false)
        }
        HaDecision::Wait {
            reason,
            retry_after,
        } => {
            if mem.last_wait.as_deref() != Some(reason.as_str()) {
                tracing::info!(cluster = %io.cluster.meta.name, "{reason}");
                mem.last_wait = Some(reason);
            }
            // A recorded primary that is merely slow keeps its lease until
            // a failover starts.
            if rec.change.is_none()
                && let Some(p) = rec.current.clone()
            {
                let client = io.client(pods, LEASE_TTL / 4);
                mem.lease.set(Some((p, rec.term, client)));
            }
            // A cluster without a primary yet keeps the pipeline's requeue
            // (its pods wake it; clusters whose managers never answer, as
            // in the 220-cluster benchmark, are not looked at more often).
            if retry_after < NO_PRIMARY_RETRY {
                wait(requeue, retry_after);
            }
            Ok(false)
        }
        HaDecision::FenceIntruder { instance, primary } => {
            io.note(
                true,
                "SplitBrainFenced",
                format!("{instance} reports itself primary while {primary} is; fencing it"),
            );
            let quick = io.client(pods, Duration::from_secs(5));
            if let Err(e) = quick.action(&instance, ACTION_FENCE, json!({})).await {
                tracing::warn!(%instance, error = %e, "fence failed");
                wait(requeue, STEP_RETRY);
                return Ok(false);
            }
            Ok(true)
        }
        HaDecision::StartFailover { from, why } => {
            // No more renewals: from here on its lease runs out.
            mem.lease.set(None);
            mem.lease.clear_crash();
            rec.start_change(PrimaryChangeReason::Failover, &from, None);
            io.record(rec, &format!("failover from {from}")).await?;
            io.note(
                true,
                "FailoverStarted",
                format!("primary {from} failed: {why}; writes stopped"),
            );
            wait(requeue, STEP_RETRY);
            Ok(true)
        }
        HaDecision::RefuseSwitchover { target, why } => {
            let message = format!("switchover to {target} refused: {why}");
            io.note(true, "SwitchoverRefused", message.clone());
            out.switchover = Some((false, "SwitchoverRefused", message));
            rec.target = rec.current.clone();
            // Recorded now, so that a reconcile that fails later does not
            // find the request again.
            io.record(rec, &format!("refuse the switchover to {target}"))
                .await?;
            Ok(true)
        }
        HaDecision::StartSwitchover { from, to } => {
            let started = Instant::now();
            mem.lease.set(None);
            rec.start_change(PrimaryChangeReason::Switchover, &from, Some(to.clone()));
            // The target and the new lease term are recorded with the
            // start, once: durable before the promotion (the irreversible
            // step; a restarted operator promotes this target and no
            // other, with a term above this one). `-rw` leaves the primary
            // meanwhile (its clean stop ends its sessions anyway).
            rec.term += 1;
            let step = format!("switchover from {from} to {to}");
            let (recorded, unrouted) =
                tokio::join!(io.record(rec, &step), io.route_writes(&from, false));
            recorded?;
            if let Err(e) = unrouted {
                tracing::warn!(instance = %from, error = %e, "rw label not removed yet");
            }
            if let Some(c) = &rec.change {
                mem.switchover_intent = Some((to.clone(), rec.term, c.started_at));
            }
            io.note(
                false,
                "SwitchoverStarted",
                format!("switchover from {from} to {to}; writes stopped"),
            );
            let recorded_after = started.elapsed();
            // Stop the primary now, on the observation this decision was
            // made from (it was ready a moment ago), and go on to the
            // promotion on the manager's reply rather than a new look.
            if let Some(lsn) = wal_lsn(members.iter().find(|m| m.name == from)) {
                mem.switchover_lsn = Some((from.clone(), lsn));
            }
            match io
                .client(pods, Duration::from_secs(60))
                .action(&from, ACTION_FENCE, json!({}))
                .await
            {
                Ok(reply) => {
                    io.note(
                        false,
                        "Demoted",
                        format!("{from} stopped cleanly for the switchover"),
                    );
                    mem.switchover_clock = Some((started, recorded_after, started.elapsed()));
                    // Stopped for sure: what `decide` says next on an
                    // observation of a fenced, stopped primary.
                    *next = after_switchover_fence(&from, &to, &reply);
                }
                // Look again: a primary that stopped answering turns the
                // switchover into a failover (`switchover_step`).
                Err(e) => tracing::warn!(instance = %from, error = %e, "fence failed"),
            }
            Ok(true)
        }
        HaDecision::Fence { instance } => {
            mem.lease.set(None);
            let switchover = rec
                .change
                .as_ref()
                .is_some_and(|c| c.reason == PrimaryChangeReason::Switchover);
            if switchover && let Some(lsn) = wal_lsn(members.iter().find(|m| m.name == instance)) {
                mem.switchover_lsn = Some((instance.clone(), lsn));
            }
            // A clean stop for a switchover may take a checkpoint; a failed
            // primary must not hold the failover up for long.
            let timeout = if switchover {
                Duration::from_secs(60)
            } else {
                Duration::from_secs(5)
            };
            match io
                .client(pods, timeout)
                .action(&instance, ACTION_FENCE, json!({}))
                .await
            {
                Ok(_) => {
                    io.note(
                        false,
                        if switchover { "Demoted" } else { "Fenced" },
                        format!(
                            "{instance} {}",
                            if switchover {
                                "stopped cleanly for the switchover"
                            } else {
                                "fenced through its instance manager (server stopped)"
                            }
                        ),
                    );
                    Ok(true)
                }
                Err(e) => {
                    tracing::warn!(%instance, error = %e, "fence failed");
                    wait(requeue, STEP_RETRY);
                    Ok(false)
                }
            }
        }
        HaDecision::Revoke { from } => {
            let term = rec.term;
            let quick = io.client(pods, Duration::from_secs(3));
            let others: Vec<String> = io
                .cluster
                .instance_names()
                .into_iter()
                .filter(|n| *n != from)
                .collect();
            let body = serde_json::to_value(RevokeRequest { term }).unwrap_or_default();
            let results = futures::future::join_all(
                others
                    .iter()
                    .map(|n| quick.action(n, ACTION_REVOKE, body.clone())),
            )
            .await;
            let now = Instant::now();
            let replies: Vec<(String, Result<RevokeReply, String>)> = others
                .into_iter()
                .zip(results)
                .map(|(n, r)| {
                    let reply = r.map_err(|e| e.to_string()).and_then(|v| {
                        serde_json::from_value::<RevokeReply>(v).map_err(|e| e.to_string())
                    });
                    (n, reply)
                })
                .collect();
            let mut outcome = RevokeOutcome::from_replies(term, &replies, now);
            // A second revocation in the same change (the elected replica
            // was not revoked the first time) adds to the first.
            let before = mem
                .revoked
                .as_ref()
                .filter(|(n, t, _)| {
                    rec.change
                        .as_ref()
                        .is_some_and(|c| c.from == *n && c.started_at == *t)
                })
                .map(|(_, _, o)| o.clone());
            let grew = before
                .as_ref()
                .is_none_or(|b| !outcome.revoked.is_subset(&b.revoked));
            if let Some(b) = before {
                outcome = b.merged(outcome);
            }
            io.note(
                outcome.revoked.is_empty(),
                "FailsafeRevoked",
                format!(
                    "failsafe acknowledgements for {from} (term {term}) revoked on: {}; {}",
                    if outcome.revoked.is_empty() {
                        "none (retrying)".to_string()
                    } else {
                        outcome
                            .revoked
                            .iter()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    match outcome.granted_until {
                        Some(u) => format!(
                            "the last one they gave ends in {} ms",
                            u.saturating_duration_since(now).as_millis()
                        ),
                        None => "none of them holds a valid one".into(),
                    }
                ),
            );
            let any = !outcome.revoked.is_empty();
            if let Some(c) = &rec.change {
                mem.revoked = Some((c.from.clone(), c.started_at, outcome));
            }
            if !any || !grew {
                // Nobody (more) confirmed: look again later, not in a
                // tight loop (the elected replica may not be in every
                // list the old primary may hold until a grant naming it
                // is confirmed).
                wait(requeue, STEP_RETRY);
                return Ok(false);
            }
            Ok(true)
        }
        HaDecision::DeletePod { instance } => {
            let api: Api<Pod> =
                Api::namespaced(io.ctx.shared.client.clone(), &io.cluster.meta.namespace);
            match api.delete(&instance, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(source) => {
                    return Err(DecideError::DeletePod {
                        pod: instance,
                        source,
                    });
                }
            }
            if let Some(c) = &rec.change {
                mem.pod_deleted = Some((c.from.clone(), c.started_at));
            }
            io.note(
                true,
                "Fenced",
                format!(
                    "{instance}: instance manager unreachable and its write lease expired; pod deleted (host-side fence)"
                ),
            );
            Ok(true)
        }
        HaDecision::Detach { from } => {
            let quick = io.client(pods, Duration::from_secs(3));
            let others: Vec<String> = members
                .iter()
                .map(|m| m.name.clone())
                .filter(|n| *n != from)
                .collect();
            let results = futures::future::join_all(
                others
                    .iter()
                    .map(|n| quick.action(n, ACTION_FOLLOW, json!({ "primary": null }))),
            )
            .await;
            let detached: Vec<&str> = others
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|(n, _)| n.as_str())
                .collect();
            if let Some(c) = &rec.change {
                mem.detached = Some((c.from.clone(), c.started_at));
            }
            io.note(
                false,
                "ReplicasDetached",
                format!("replicas detached from {from}: {}", detached.join(", ")),
            );
            Ok(true)
        }
        HaDecision::AbortSwitchover { from, why } => {
            rec.start_change(PrimaryChangeReason::Failover, &from, None);
            io.record(rec, &format!("failover from {from}")).await?;
            io.note(
                true,
                "SwitchoverAborted",
                format!("switchover from {from} aborted ({why}); failing over instead"),
            );
            Ok(true)
        }
        HaDecision::Promote {
            candidate,
            from,
            reason,
            catch_up,
        } => {
            let started = Instant::now();
            if rec.target.as_deref() != Some(candidate.as_str()) {
                io.note(
                    false,
                    "FailoverCandidate",
                    format!("promoting {candidate} ({reason})"),
                );
            }
            // Intent first: the target and the new term, so that a
            // restarted operator promotes this one and no other (a
            // switchover recorded both when it started).
            let recorded = rec.change.as_ref().is_some_and(|c| {
                mem.switchover_intent.as_ref() == Some(&(candidate.clone(), rec.term, c.started_at))
            }) && rec.target.as_deref() == Some(candidate.as_str());
            if !recorded {
                rec.target = Some(candidate.clone());
                rec.term += 1;
                io.record(rec, &format!("promote {candidate}")).await?;
            }
            let (caught_up, rounds) = if catch_up {
                catch_up_wait(io, mem, &from, &candidate, pods).await
            } else {
                (Duration::ZERO, 0)
            };
            let promoting = Instant::now();
            let others: Vec<String> = io
                .cluster
                .instance_names()
                .into_iter()
                .filter(|n| *n != candidate)
                .collect();
            let list = mem
                .lease
                .list_for(&candidate, rec.term, &io.client(pods, LEASE_TTL / 4));
            let body = json!({
                BODY_LEASE: LeaseGrant {
                    holder: candidate.clone(),
                    term: rec.term,
                    ttl_ms: LEASE_TTL.as_millis() as u64,
                    replicas: Some(list.clone()),
                },
                "replicas": others,
            });
            match io
                .client(pods, Duration::from_secs(90))
                .action(&candidate, ACTION_PROMOTE, body)
                .await
            {
                Ok(reply) => {
                    let promoted_in = promoting.elapsed();
                    // The manager's own time from its server connection
                    // to the answer (the rest is HTTP, the lease write and
                    // the connection).
                    let server_ms = reply.get("tookMs").and_then(|t| t.as_u64());
                    mem.lease.note_renewed(&candidate);
                    mem.lease.confirmed(&candidate, rec.term, &list);
                    mem.lease.set(Some((
                        candidate.clone(),
                        rec.term,
                        io.client(pods, LEASE_TTL / 4),
                    )));
                    let timeline = reply
                        .get("timeline")
                        .and_then(|t| t.as_u64())
                        .map(|t| t as u32);
                    rec.timeline = timeline.or(rec.timeline);
                    let kind = rec.change.as_ref().map(|c| c.reason);
                    rec.current = Some(candidate.clone());
                    rec.change = None;
                    // The others follow at once (in the background): in
                    // synchronous mode the new primary's first commit
                    // waits for one of them.
                    for name in &others {
                        if !mem.fenced.contains(name) {
                            follow(io, mem, name, &candidate, false, pods);
                        }
                    }
                    // The fact, and `-rw` moved to the promoted primary
                    // (it holds the new term's lease) without waiting for
                    // the end of the reconcile.
                    let recording = Instant::now();
                    let step = format!("{candidate} promoted");
                    let (recorded, (routed, routed_in), unrouted) = tokio::join!(
                        io.record(rec, &step),
                        async {
                            let routed = io.route_writes(&candidate, true).await;
                            (routed, recording.elapsed())
                        },
                        io.route_writes(&from, false)
                    );
                    recorded?;
                    if let Err(e) = routed.and(unrouted) {
                        tracing::warn!(instance = %candidate, error = %e, "rw label not moved yet");
                    }
                    let recorded_in = recording.elapsed();
                    mem.down_since = None;
                    mem.sync_standbys = None;
                    mem.sync_told = None;
                    mem.switchover_lsn = None;
                    mem.switchover_intent = None;
                    let clock = mem.switchover_clock.take();
                    mem.slots_done = Some((candidate.clone(), Instant::now()));
                    mem.promoted = Some((candidate.clone(), Instant::now()));
                    io.note(
                        false,
                        "Promoted",
                        format!(
                            "{candidate} promoted (timeline {}, lease term {}) in {}ms; rw moved to it",
                            timeline.map_or("?".to_string(), |t| t.to_string()),
                            rec.term,
                            started.elapsed().as_millis()
                        ),
                    );
                    if kind == Some(PrimaryChangeReason::Switchover) {
                        let message = format!("switched over from {from} to {candidate}");
                        // Where the time went, from this process's start
                        // of the switchover (when it started it).
                        let breakdown = clock.map(|(at, record, fenced)| {
                            format!(
                                " in {} ms (intent recorded {} ms, old primary stopped {} ms, catch-up {} ms in {rounds} round(s), promote {} ms ({} ms of it in the server), rw moved {} ms, fact recorded {} ms)",
                                at.elapsed().as_millis(),
                                record.as_millis(),
                                fenced.saturating_sub(record).as_millis(),
                                caught_up.as_millis(),
                                promoted_in.as_millis(),
                                server_ms.map_or("?".to_string(), |m| m.to_string()),
                                routed_in.as_millis(),
                                recorded_in.as_millis()
                            )
                        });
                        tracing::info!(
                            cluster = %io.cluster.meta.name,
                            "{message}{}",
                            breakdown.clone().unwrap_or_default()
                        );
                        io.note(
                            false,
                            "Switchover",
                            format!("{message}{}", breakdown.unwrap_or_default()),
                        );
                        out.switchover = Some((true, "SwitchoverDone", message));
                    }
                    Ok(true)
                }
                Err(e) => {
                    io.note(true, "PromoteFailed", format!("promote {candidate}: {e}"));
                    wait(requeue, Duration::from_secs(1));
                    Ok(false)
                }
            }
        }
    }
}

/// A switchover: wait until `to` received past the old primary's last
/// observed position and as far as any other replica (a clean shutdown
/// sends its last WAL to connected standbys), at most
/// [`CATCH_UP_TIMEOUT`], polling every 10 ms as the local runtime does.
/// Returns how long it waited and how many rounds of status calls it took.
async fn catch_up_wait(
    io: &Io<'_>,
    mem: &ClusterHa,
    from: &str,
    to: &str,
    pods: &[PodInfo],
) -> (Duration, u32) {
    let client = io.client(pods, Duration::from_secs(2));
    let last = mem
        .switchover_lsn
        .as_ref()
        .filter(|(n, _)| n == from)
        .map(|(_, l)| *l);
    let others: Vec<String> = io
        .cluster
        .instance_names()
        .into_iter()
        .filter(|n| n != to && n != from)
        .collect();
    let received = |s: Result<crate::instance::protocol::MemberStatus, _>| {
        s.ok().and_then(|s| match s.position {
            Position::Wal { received_lsn, .. } => received_lsn,
            _ => None,
        })
    };
    let started = Instant::now();
    let deadline = started + CATCH_UP_TIMEOUT;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let (target, others) = futures::future::join(
            client.status(to),
            futures::future::join_all(others.iter().map(|n| client.status(n))),
        )
        .await;
        let goal = others
            .into_iter()
            .filter_map(received)
            .chain(last.map(|l| l + 1))
            .max();
        if received(target).is_some_and(|r| goal.is_none_or(|g| r >= g)) {
            return (started.elapsed(), rounds);
        }
        if Instant::now() > deadline {
            io.note(
                true,
                "SwitchoverCatchUpTimeout",
                format!("{to} did not confirm the last WAL of {from} in time; promoting anyway"),
            );
            return (started.elapsed(), rounds);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The primary is fit: record its synchronous standbys and timeline,
/// ensure its slots, tell it which replicas stream, repoint the others.
/// Returns when to look again, if sooner than usual (the synchronous
/// standbys of a just promoted primary that nothing streams from yet).
async fn converge(
    io: &Io<'_>,
    mem: &mut ClusterHa,
    rec: &mut Record,
    primary: &str,
    members: &[ObservedMember],
    pods: &[PodInfo],
) -> Option<Duration> {
    let status = members
        .iter()
        .find(|m| m.name == primary)
        .and_then(|m| m.status.as_ref())?;
    let entry = mem
        .sync_standbys
        .get_or_insert_with(|| (primary.to_string(), Vec::new()));
    if entry.0 != primary {
        *entry = (primary.to_string(), Vec::new());
    }
    for name in sync_standbys(status) {
        if !entry.1.contains(&name) {
            entry.1.push(name);
            entry.1.sort();
        }
    }
    if let Position::Wal { timeline, .. } = status.position {
        rec.timeline = Some(timeline);
    }
    let replicas: Vec<String> = io
        .cluster
        .instance_names()
        .into_iter()
        .filter(|n| n != primary)
        .collect();
    // Short: these calls are quick on a fit primary, and the step (with
    // the cluster's reconcile) waits for them. With 30 s, a manager that
    // froze right after it was observed fit could hold the failover up by
    // 30 s (the likely cause of the 40 s from the freeze to the failover
    // seen once in
    // `a_frozen_primary_manager_is_failed_over_and_rejoins_when_thawed`);
    // what did not answer is asked again on the next reconcile.
    let act = io.client(pods, CONVERGE_TIMEOUT);
    if !mem
        .slots_done
        .as_ref()
        .is_some_and(|(p, at)| p == primary && at.elapsed() < SLOTS_EVERY)
    {
        match act
            .action(primary, ACTION_SLOTS, json!({ "replicas": replicas }))
            .await
        {
            Ok(_) => mem.slots_done = Some((primary.to_string(), Instant::now())),
            Err(e) => tracing::warn!(error = %e, "replication slots not ensured yet"),
        }
    }
    let streaming: Vec<String> = streaming_replicas(status)
        .into_iter()
        .filter(|n| replicas.contains(n))
        .collect();
    let told = (primary.to_string(), streaming.clone());
    let promoted_for = mem
        .promoted
        .as_ref()
        .filter(|(p, _)| p == primary)
        .map(|(_, at)| at.elapsed());
    let mut again = None;
    if sync_standbys_due(mem.sync_told.as_ref(), primary, &streaming, promoted_for) {
        let body = json!({ "available": streaming, "replicas": replicas });
        match act.action(primary, ACTION_SYNC_STANDBYS, body).await {
            Ok(reply) => {
                if let Some(names) = reply
                    .get("synchronousStandbyNames")
                    .and_then(|v| v.as_str())
                    .filter(|n| !n.is_empty())
                {
                    io.note(
                        false,
                        "SynchronousStandbys",
                        format!(
                            "{primary}: synchronous_standby_names = {names} (streaming: {})",
                            if told.1.is_empty() {
                                "none".to_string()
                            } else {
                                told.1.join(", ")
                            }
                        ),
                    );
                }
                mem.sync_told = Some(told);
            }
            Err(e) => tracing::debug!(error = %e, "synchronous standbys not set"),
        }
    } else if mem.sync_told.as_ref() != Some(&told) {
        // Settling after the promotion: look again when it ends.
        again = promoted_for.map(|d| SYNC_SETTLE.saturating_sub(d) + Duration::from_millis(100));
    }
    let fenced = mem.fenced.clone();
    let due = followers(
        primary,
        members,
        &fenced,
        &mut mem.not_streaming_since,
        Instant::now(),
    );
    for (name, rewind) in due {
        follow(io, mem, &name, primary, rewind, pods);
    }
    again
}

/// Tell `name` to follow `primary` in the background (a rewind takes
/// seconds), the same primary at most every [`FOLLOW_EVERY`].
fn follow(
    io: &Io<'_>,
    mem: &mut ClusterHa,
    name: &str,
    primary: &str,
    rewind: bool,
    pods: &[PodInfo],
) {
    if mem
        .last_follow
        .get(name)
        .is_some_and(|(t, p)| p == primary && t.elapsed() < FOLLOW_EVERY)
    {
        return;
    }
    {
        let Ok(mut busy) = mem.following.lock() else {
            return;
        };
        if !busy.insert(name.to_string()) {
            return;
        }
    }
    mem.last_follow
        .insert(name.to_string(), (Instant::now(), primary.to_string()));
    io.note(
        false,
        "Follow",
        format!(
            "{name} told to follow {primary}{}",
            if rewind { " (through pg_rewind)" } else { "" }
        ),
    );
    let client = io.client(pods, Duration::from_secs(90));
    let endpoint = crate::plan::kubernetes_members(io.cluster, io.manifest)
        .into_iter()
        .find(|e| e.name == primary);
    let busy = mem.following.clone();
    let (name, primary) = (name.to_string(), primary.to_string());
    tokio::spawn(async move {
        let body = json!({ "primary": primary, "rewind": rewind, "endpoint": endpoint });
        match client.action(&name, ACTION_FOLLOW, body).await {
            Ok(reply) => tracing::info!(instance = %name, %primary, reply = %reply, "following"),
            Err(e) => tracing::warn!(instance = %name, %primary, error = %e, "follow failed"),
        }
        if let Ok(mut b) = busy.lock() {
            b.remove(&name);
        }
    });
}

#[cfg(test)]
mod tests;
