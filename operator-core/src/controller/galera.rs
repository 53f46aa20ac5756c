//! galera: the controller's bootstrap step for multi-writer (Galera)
//! clusters, run after observe. When no member runs in a Primary
//! component (a new cluster, or every member crashed), `Engine::elect`
//! names the member to bootstrap the group from — the highest recovered
//! seqno of the majority's cluster UUID, or
//! `spec.bootstrap.forceBootstrapFrom` — or says why it waits. The
//! decision is written to `status.bootstrap` *before* that member's
//! instance manager is ordered to `bootstrap`; while it stands, only that
//! member is ever ordered (also by a restarted controller), and it is
//! removed once a member is Synced in a Primary component again. The
//! `PrimaryComponent` condition says where this stands (with the reason
//! while waiting), and Events report decisions, orders and the recovery.
//!
//! IO: one status merge patch (the decision, before the order) and the
//! `bootstrap` action to one instance manager. The decisions themselves are
//! pure ([`plan`], [`order_due`]) and shared with the local runtime through
//! [`crate::galera`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::api::DynamicObject;

use super::error::ReconcileError;
use super::observe::{Observation, reachable_endpoints};
use super::reconcile::{KindContext, write_status};
use crate::api::status::{BootstrapStatus, ClusterStatus, condition_type, set_condition};
use crate::build::names;
use crate::engine::{Election, InstanceOps, ObservedMember, ReplicationModel, ValidatedCluster};
use crate::galera::{
    ACTION_BOOTSTRAP, BootstrapStep, ComponentWatch, StuckWatch, bootstrap_step, in_primary,
    position_of, wsrep_status,
};
use crate::instance::client::InstanceClient;
use crate::instance::protocol::{ProcessState, SECRET_KEY_API_TOKEN};
use crate::instance::server::ACTION_RESTART;
use crate::plan::kubernetes_members;

/// Least time between two `bootstrap` requests while none was accepted.
pub const RETRY_ORDER_EVERY: Duration = Duration::from_secs(2);
/// An accepted order whose member is down again (its server not running,
/// e.g. its pod was recreated and the order, kept in the pod's run
/// directory, went with it) is sent again after this long. A member picks
/// an order up within half a second, so this is long past any start.
pub const REORDER_AFTER: Duration = Duration::from_secs(10);
/// Requeue while the group is being bootstrapped or waits for positions:
/// a manager's report changing leaves no trace in Kubernetes objects.
pub const REQUEUE_RECOVERING: Duration = Duration::from_secs(2);
/// Bounds the `bootstrap` request (the manager answers at once).
const ORDER_TIMEOUT: Duration = Duration::from_secs(10);

/// Event action of a bootstrap of a new group (no member had state).
pub const ACTION_NEW_CLUSTER: &str = "BootstrapNewCluster";
/// Event action of a bootstrap from a recovered position (a full crash).
pub const ACTION_FROM_POSITION: &str = "BootstrapFromPosition";

/// The Event action of the bootstrap `d`: a new group's events and a
/// recovery's are different series even on the same member.
pub fn action_of(d: &BootstrapStatus) -> &'static str {
    if d.uuid.is_none() {
        ACTION_NEW_CLUSTER
    } else {
        ACTION_FROM_POSITION
    }
}

/// Condition reasons of `PrimaryComponent`.
pub mod reason {
    /// A member is Synced in a Primary component.
    pub const PRIMARY: &str = "Primary";
    /// The election waits (positions missing, a member still syncing).
    pub const WAITING: &str = "BootstrapWaiting";
    /// A member whose server may be in a primary component holds the
    /// decision back.
    pub const BLOCKED: &str = "BootstrapBlocked";
    /// Members disagree on the cluster UUID: a human must choose.
    pub const NO_CANDIDATE: &str = "NoBootstrapCandidate";
    /// A bootstrap is decided, not yet accepted by its member.
    pub const DECIDED: &str = "BootstrapDecided";
    /// The member accepted the order; waiting for it to be Synced.
    pub const ORDERED: &str = "BootstrapOrdered";
}

/// What the controller remembers per Galera cluster between reconciles.
/// Losing it (a restart) is safe: the decision itself is in status.
#[derive(Default)]
pub(crate) struct Memory {
    clusters: Mutex<HashMap<(String, String), ClusterMemory>>,
}

#[derive(Default)]
struct ClusterMemory {
    components: ComponentWatch,
    stuck: StuckWatch,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    /// The `PrimaryComponent` reason last reported while managers answered.
    last_reason: Option<&'static str>,
}

impl Memory {
    /// Keep the clusters `keep(namespace, name)` accepts.
    pub(crate) fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        clusters.retain(|(ns, name), _| keep(ns, name));
    }

    fn with<T>(&self, ns: &str, name: &str, f: impl FnOnce(&mut ClusterMemory) -> T) -> T {
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        f(clusters
            .entry((ns.to_string(), name.to_string()))
            .or_default())
    }
}

/// What the step leaves for the status computation and the requeue.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    /// The status to compute the new one from, when the step changed it
    /// (decision cleared or ordered, `PrimaryComponent`); else the
    /// previous one.
    base: Option<ClusterStatus>,
    /// Look again this soon.
    pub requeue: Option<Duration>,
}

impl Recovery {
    /// The status the new one is computed from.
    pub(crate) fn base<'a>(
        &'a self,
        previous: Option<&'a ClusterStatus>,
    ) -> Option<&'a ClusterStatus> {
        self.base.as_ref().or(previous)
    }
}

/// What to do this round. Pure.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Nothing to send or record.
    Nothing,
    /// The group runs again: drop the decision.
    Complete {
        /// The member the decision named.
        bootstrapped: String,
        /// A Synced member now.
        primary: String,
    },
    /// Record this decision in status, then order it.
    Decide(BootstrapStatus),
    /// Order the decided member (again).
    Order(String),
}

/// The `PrimaryComponent` condition: status, reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing {
    /// `True` when a member is Synced in a Primary component.
    pub primary: bool,
    /// One of [`reason`].
    pub reason: &'static str,
    /// Human-readable detail (the election's reason while waiting).
    pub message: String,
}

/// Whether an order to the pending decision's member may be sent now: one
/// not yet accepted every [`RETRY_ORDER_EVERY`]; an accepted one again
/// only when it is older than [`REORDER_AFTER`] and the member's server
/// is down (the order was lost with its pod, or it bootstrapped and
/// crashed before anyone was Synced). Pure.
pub fn order_due(
    pending: &BootstrapStatus,
    member: Option<&ObservedMember>,
    last_attempt: Option<Instant>,
    now_instant: Instant,
    now: DateTime<Utc>,
) -> bool {
    let paced = last_attempt.is_none_or(|t| now_instant.duration_since(t) >= RETRY_ORDER_EVERY);
    match pending.ordered_at {
        None => paced,
        Some(at) => {
            let server_down = member.and_then(|m| m.status.as_ref()).is_some_and(|s| {
                matches!(s.process, ProcessState::Preparing | ProcessState::Exited)
            });
            let stale = (now - at).to_std().is_ok_and(|d| d >= REORDER_AFTER);
            paced && server_down && stale
        }
    }
}

/// The plan and the condition from the election, the decision in status
/// (`pending`), the members that hold a new decision back, and whether an
/// order is due. Pure.
pub fn plan(
    election: &Election,
    pending: Option<&BootstrapStatus>,
    blockers: &[String],
    members: &[ObservedMember],
    order_due: bool,
    now: DateTime<Utc>,
) -> (Plan, Standing) {
    let step = bootstrap_step(election, pending.map(|p| p.instance.as_str()), order_due);
    match step {
        BootstrapStep::Completed(bootstrapped) => {
            let primary = match election {
                Election::Keep { primary } => primary.clone(),
                _ => bootstrapped.clone(),
            };
            let standing = Standing {
                primary: true,
                reason: reason::PRIMARY,
                message: format!("{primary} is Synced in a Primary component"),
            };
            (
                Plan::Complete {
                    bootstrapped,
                    primary,
                },
                standing,
            )
        }
        BootstrapStep::Decide { .. } if !blockers.is_empty() => (
            Plan::Nothing,
            Standing {
                primary: false,
                reason: reason::BLOCKED,
                message: format!("not bootstrapping yet: {}", blockers.join("; ")),
            },
        ),
        BootstrapStep::Decide { member, reason } => {
            let (uuid, seqno) = position_of(members, &member).unzip();
            let decision = BootstrapStatus {
                instance: member,
                // No state (a new cluster): empty or the nil UUID.
                uuid: uuid.filter(|u| u.chars().any(|c| c != '0' && c != '-')),
                seqno: seqno.filter(|s| *s >= 0),
                reason,
                decided_at: now,
                ordered_at: None,
            };
            let standing = standing_for(&decision);
            (Plan::Decide(decision), standing)
        }
        BootstrapStep::Order(member) => (
            Plan::Order(member),
            standing_for(pending.expect("an order comes from a pending decision")),
        ),
        BootstrapStep::None => {
            let standing = match (election, pending) {
                (_, Some(p)) => standing_for(p),
                (Election::Keep { primary }, None) => Standing {
                    primary: true,
                    reason: reason::PRIMARY,
                    message: format!("{primary} is Synced in a Primary component"),
                },
                (Election::NoCandidate { reason }, None) => Standing {
                    primary: false,
                    reason: reason::NO_CANDIDATE,
                    message: reason.clone(),
                },
                (Election::Wait { reason, .. }, None) => match in_component(members) {
                    // Not Synced yet, but the group runs (a lone member
                    // donating a state transfer).
                    Some(m) => Standing {
                        primary: true,
                        reason: reason::PRIMARY,
                        message: format!("{m} in a Primary component; no member is Synced yet"),
                    },
                    None => Standing {
                        primary: false,
                        reason: reason::WAITING,
                        message: reason.clone(),
                    },
                },
                // Promote without a decision is always `Decide`; native
                // elections are not multi-writer.
                (Election::Promote { .. } | Election::Native, None) => Standing {
                    primary: false,
                    reason: reason::WAITING,
                    message: String::new(),
                },
            };
            (Plan::Nothing, standing)
        }
    }
}

/// The first member reporting itself in a Primary component, as `name is
/// state`.
fn in_component(members: &[ObservedMember]) -> Option<String> {
    members.iter().find(|m| in_primary(m)).map(|m| {
        let state = m
            .status
            .as_ref()
            .and_then(wsrep_status)
            .map(|w| w.state)
            .unwrap_or_default();
        format!("{} is {state}", m.name)
    })
}

/// The condition while the decision `p` stands. Pure.
pub fn standing_for(p: &BootstrapStatus) -> Standing {
    Standing {
        primary: false,
        reason: if p.ordered_at.is_some() {
            reason::ORDERED
        } else {
            reason::DECIDED
        },
        message: format!(
            "bootstrapping the group from {}{}: {}; {}",
            p.instance,
            describe_position(p),
            p.reason,
            if p.ordered_at.is_some() {
                "ordered; waiting for it to be Synced"
            } else {
                "ordering it"
            }
        ),
    }
}

fn describe_position(p: &BootstrapStatus) -> String {
    match (&p.uuid, p.seqno) {
        (Some(u), Some(s)) => format!(" (position {u}:{s})"),
        (None, Some(s)) => format!(" (seqno {s})"),
        _ => String::new(),
    }
}

/// Set `PrimaryComponent` from `standing` (its transition time moves only
/// when it flips).
pub fn set_standing(
    status: &mut ClusterStatus,
    standing: &Standing,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    set_condition(
        &mut status.conditions,
        condition_type::PRIMARY_COMPONENT,
        standing.primary,
        standing.reason,
        standing.message.clone(),
        generation,
        now,
    );
}

/// The step. For multi-writer engines only (others get a default
/// [`Recovery`]). `previous`/`previous_value` are the status as stored:
/// when a decision is recorded they are updated to what was written, so
/// the status write at the end of the reconcile patches against it.
pub(crate) async fn recover(
    ctx: &KindContext,
    obj: &DynamicObject,
    cluster: &ValidatedCluster,
    seen: &Observation,
    previous: &mut Option<ClusterStatus>,
    previous_value: &mut Option<serde_json::Value>,
) -> Result<Recovery, ReconcileError> {
    let engine = &*ctx.engine;
    if engine.topology(cluster, None).model != ReplicationModel::MultiWriter {
        return Ok(Recovery::default());
    }
    let (ns, name) = (cluster.meta.namespace.as_str(), cluster.meta.name.as_str());
    let object_ref: ObjectReference = obj.object_ref(&ctx.resource);
    let reporter = &ctx.shared.reporter;
    let generation = cluster.meta.generation;
    let members = &seen.members;
    let election = engine.elect(cluster, members);
    let now = Utc::now();
    let now_instant = Instant::now();
    let pending = previous.as_ref().and_then(|s| s.bootstrap.clone());
    let (blockers, last_attempt) = ctx.galera.with(ns, name, |m| {
        let mut blockers = m.components.blockers(members, now_instant);
        blockers.extend(m.components.stragglers(&election, members, now_instant));
        (blockers, m.last_attempt)
    });
    let due = pending.as_ref().is_some_and(|p| {
        order_due(
            p,
            members.iter().find(|m| m.name == p.instance),
            last_attempt,
            now_instant,
            now,
        )
    });
    let (plan, standing) = plan(&election, pending.as_ref(), &blockers, members, due, now);
    let mut base = previous.clone().unwrap_or_default();
    // Managers that answer: the members are up and a decision may come
    // any moment (none answering: pods are not running, and their
    // changes trigger a reconcile anyway).
    let reporting = members.iter().any(|m| m.status.is_some());
    let recovering = !standing.primary && (pending.is_some() || reporting);
    let order = match plan {
        Plan::Nothing => None,
        Plan::Complete {
            bootstrapped,
            primary,
        } => {
            base.bootstrap = None;
            ctx.galera.with(ns, name, |m| {
                m.last_attempt = None;
                m.last_error = None;
            });
            let decision = pending.as_ref();
            let what = if decision.is_some_and(|d| d.uuid.is_none()) {
                "the new group is Primary"
            } else {
                "the group is Primary again"
            };
            reporter.note_about(
                &object_ref,
                &bootstrapped,
                decision.map_or(ACTION_FROM_POSITION, action_of),
                false,
                "Bootstrapped",
                format!("{what}: bootstrapped from {bootstrapped}; {primary} is Synced"),
            );
            None
        }
        Plan::Decide(decision) => {
            // Persisted before the order: a restarted controller orders
            // this member or nobody.
            base.bootstrap = Some(decision.clone());
            set_standing(&mut base, &standing, generation, now);
            write_status(ctx, obj, previous_value.as_ref(), &base).await?;
            *previous_value = serde_json::to_value(&base).ok();
            *previous = Some(base.clone());
            reporter.note_about(
                &object_ref,
                &decision.instance,
                action_of(&decision),
                false,
                reason::DECIDED,
                format!(
                    "bootstrap from {}{}: {}",
                    decision.instance,
                    describe_position(&decision),
                    decision.reason
                ),
            );
            Some(decision.instance)
        }
        Plan::Order(member) => Some(member),
    };
    set_standing(&mut base, &standing, generation, now);
    // A waiting Event once per reason, and only while managers answer (a
    // cluster whose pods do not run yet says so in its condition only).
    let new_reason = ctx.galera.with(ns, name, |m| {
        let new = m.last_reason != Some(standing.reason);
        if reporting || standing.primary {
            m.last_reason = Some(standing.reason);
        }
        new && reporting
    });
    if new_reason
        && matches!(
            standing.reason,
            reason::WAITING | reason::BLOCKED | reason::NO_CANDIDATE
        )
    {
        reporter.note(
            &object_ref,
            standing.reason == reason::NO_CANDIDATE,
            standing.reason,
            standing.message.clone(),
        );
    }
    if let Some(member) = order {
        send_order(ctx, cluster, seen, &object_ref, &member, &mut base, now).await;
        // The condition says "ordered" once the member accepted.
        if let Some(standing) = base.bootstrap.as_ref().map(standing_for) {
            set_standing(&mut base, &standing, generation, now);
        }
    }
    let stuck = ctx
        .galera
        .with(ns, name, |m| m.stuck.due(members, now_instant));
    for member in &stuck {
        restart_stuck(ctx, cluster, seen, &object_ref, member).await;
    }
    Ok(Recovery {
        base: Some(base),
        requeue: recovering.then_some(REQUEUE_RECOVERING),
    })
}

/// Ask `member`'s manager to restart its server, which runs outside the
/// group without trying to join ([`crate::galera::stuck_outside_group`]);
/// the restarted server joins again (IST, or SST when the donor's cache
/// no longer has its write sets). An Event either way; a failure is tried
/// again after the next grace period.
async fn restart_stuck(
    ctx: &KindContext,
    cluster: &ValidatedCluster,
    seen: &Observation,
    object_ref: &ObjectReference,
    member: &str,
) {
    let result = match client(ctx, cluster, seen) {
        Some(client) => client
            .action(member, ACTION_RESTART, serde_json::json!({}))
            .await
            .map_err(|e| e.to_string()),
        None => Err(format!(
            "no {SECRET_KEY_API_TOKEN} in Secret {} to authenticate with",
            names::credentials_secret(&cluster.meta.name)
        )),
    };
    let (warning, note) = match result {
        Ok(_) => (
            false,
            format!(
                "{member}'s server ran outside the group (Initialized, Disconnected) for {}s: restarted so that it joins again",
                crate::galera::STUCK_GRACE.as_secs()
            ),
        ),
        Err(e) => (
            true,
            format!("restarting stuck member {member} failed: {e}"),
        ),
    };
    ctx.shared.reporter.note_about(
        object_ref,
        member,
        "Restart",
        warning,
        "MemberRestarted",
        note,
    );
}

/// POST `bootstrap` to `member`; on success stamp `orderedAt` in `base`.
/// Failures are Events (when the error changes), never reconcile errors:
/// the next round tries again.
async fn send_order(
    ctx: &KindContext,
    cluster: &ValidatedCluster,
    seen: &Observation,
    object_ref: &ObjectReference,
    member: &str,
    base: &mut ClusterStatus,
    now: DateTime<Utc>,
) {
    let (ns, name) = (cluster.meta.namespace.as_str(), cluster.meta.name.as_str());
    ctx.galera
        .with(ns, name, |m| m.last_attempt = Some(Instant::now()));
    let reporter = &ctx.shared.reporter;
    let action = base
        .bootstrap
        .as_ref()
        .map_or(ACTION_FROM_POSITION, action_of);
    let result = match client(ctx, cluster, seen) {
        Some(client) => client
            .action(member, ACTION_BOOTSTRAP, serde_json::json!({}))
            .await
            .map_err(|e| e.to_string()),
        None => Err(format!(
            "no {SECRET_KEY_API_TOKEN} in Secret {} to authenticate with",
            names::credentials_secret(name)
        )),
    };
    match result {
        Ok(reply) => {
            if let Some(p) = base.bootstrap.as_mut() {
                p.ordered_at = Some(now);
            }
            ctx.galera.with(ns, name, |m| m.last_error = None);
            reporter.note_about(
                object_ref,
                member,
                action,
                false,
                reason::ORDERED,
                format!("{member} ordered to bootstrap a new primary component ({reply})"),
            );
        }
        Err(e) => {
            let note = format!("bootstrap order to {member} failed: {e}");
            let new = ctx.galera.with(ns, name, |m| {
                let new = m.last_error.as_deref() != Some(note.as_str());
                m.last_error = Some(note.clone());
                new
            });
            if new {
                reporter.note_about(
                    object_ref,
                    member,
                    action,
                    true,
                    "BootstrapOrderRefused",
                    note,
                );
            } else {
                tracing::debug!("{note}");
            }
        }
    }
}

/// A client for the cluster's instance managers, reached as observe
/// reaches them (by pod IP, [`reachable_endpoints`]).
fn client(
    ctx: &KindContext,
    cluster: &ValidatedCluster,
    seen: &Observation,
) -> Option<InstanceClient> {
    let (ns, name) = (cluster.meta.namespace.as_str(), cluster.meta.name.as_str());
    let token = ctx
        .caches
        .secret(ns, &names::credentials_secret(name))
        .and_then(|s| s.data.as_ref()?.get(SECRET_KEY_API_TOKEN).cloned())
        .and_then(|b| String::from_utf8(b.0).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())?;
    let manifest = ctx.engine.manifest(cluster);
    let members = reachable_endpoints(&kubernetes_members(cluster, &manifest), &seen.pods);
    Some(InstanceClient::new(
        token,
        cluster.meta.uid.clone().unwrap_or_default(),
        members,
        ORDER_TIMEOUT,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::get_condition;
    use crate::instance::protocol::{MemberStatus, Position, Role};

    const U1: &str = "6f0f2b9e-1111-11ee-8000-000000000001";

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn crashed(name: &str, seqno: i64, process: ProcessState) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role: Role::Unknown,
                process,
                position: Position::Galera {
                    cluster_uuid: U1.into(),
                    seqno,
                    state: "Recovered".into(),
                },
                ..Default::default()
            }),
            error: None,
        }
    }

    fn decision(instance: &str, ordered_at: Option<DateTime<Utc>>) -> BootstrapStatus {
        BootstrapStatus {
            instance: instance.into(),
            uuid: Some(U1.into()),
            seqno: Some(120),
            reason: "full crash: highest seqno".into(),
            decided_at: t(0),
            ordered_at,
        }
    }

    fn promote(c: &str) -> Election {
        Election::Promote {
            candidate: c.into(),
            reason: format!("full crash: {c} has the highest recovered seqno"),
        }
    }

    #[test]
    fn a_decision_carries_the_candidates_position() {
        let members = [
            crashed("pxc-0", 90, ProcessState::Preparing),
            crashed("pxc-1", 120, ProcessState::Preparing),
        ];
        let (p, standing) = plan(&promote("pxc-1"), None, &[], &members, false, t(5));
        let Plan::Decide(d) = p else { panic!("{p:?}") };
        assert_eq!(d.instance, "pxc-1");
        assert_eq!(d.uuid.as_deref(), Some(U1));
        assert_eq!(d.seqno, Some(120));
        assert_eq!(d.decided_at, t(5));
        assert_eq!(d.ordered_at, None);
        assert_eq!(standing.reason, reason::DECIDED);
        assert!(!standing.primary);
        assert!(
            standing
                .message
                .contains(&format!("pxc-1 (position {U1}:120)")),
            "{}",
            standing.message
        );
        // A new cluster: no position to record.
        let fresh = [ObservedMember {
            name: "pxc-0".into(),
            status: Some(MemberStatus {
                position: Position::Galera {
                    cluster_uuid: String::new(),
                    seqno: -1,
                    state: "Recovered".into(),
                },
                ..Default::default()
            }),
            error: None,
        }];
        let (p, _) = plan(&promote("pxc-0"), None, &[], &fresh, false, t(5));
        let Plan::Decide(d) = p else { panic!("{p:?}") };
        assert_eq!((d.uuid.as_deref(), d.seqno), (None, None));
        assert_eq!(action_of(&d), ACTION_NEW_CLUSTER);
        let mut nil = fresh[0].clone();
        nil.status.as_mut().unwrap().position = Position::Galera {
            cluster_uuid: "00000000-0000-0000-0000-000000000000".into(),
            seqno: -1,
            state: "Recovered".into(),
        };
        let (p, _) = plan(&promote("pxc-0"), None, &[], &[nil], false, t(5));
        let Plan::Decide(d) = p else { panic!("{p:?}") };
        assert_eq!(d.uuid, None, "the nil UUID is no state");
        assert_eq!(action_of(&decision("pxc-1", None)), ACTION_FROM_POSITION);
    }

    #[test]
    fn plan_table() {
        let members = [crashed("pxc-1", 120, ProcessState::Preparing)];
        let wait = Election::Wait {
            reason: "no member is running; 1 of 3 members reported a recovered position, need 2"
                .into(),
            retry_after: Duration::from_secs(5),
        };
        let keep = Election::Keep {
            primary: "pxc-2".into(),
        };
        let split = Election::NoCandidate {
            reason: "members disagree on the cluster UUID".into(),
        };
        let ordered = decision("pxc-1", Some(t(1)));
        let unordered = decision("pxc-1", None);
        let blockers = vec!["pxc-0's server runs but did not say".to_string()];
        struct Case<'a> {
            election: &'a Election,
            pending: Option<&'a BootstrapStatus>,
            blockers: &'a [String],
            due: bool,
            plan: Plan,
            reason: &'static str,
        }
        let cases = [
            // Waiting for positions: no decision, the reason in the condition.
            Case {
                election: &wait,
                pending: None,
                blockers: &[],
                due: true,
                plan: Plan::Nothing,
                reason: reason::WAITING,
            },
            Case {
                election: &split,
                pending: None,
                blockers: &[],
                due: true,
                plan: Plan::Nothing,
                reason: reason::NO_CANDIDATE,
            },
            // A member of unknown component holds a new decision back.
            Case {
                election: &promote("pxc-1"),
                pending: None,
                blockers: &blockers,
                due: true,
                plan: Plan::Nothing,
                reason: reason::BLOCKED,
            },
            // A standing decision is ordered to its own member only, even
            // when the election now prefers another one or waits.
            Case {
                election: &promote("pxc-2"),
                pending: Some(&unordered),
                blockers: &blockers,
                due: true,
                plan: Plan::Order("pxc-1".into()),
                reason: reason::DECIDED,
            },
            Case {
                election: &wait,
                pending: Some(&ordered),
                blockers: &[],
                due: true,
                plan: Plan::Order("pxc-1".into()),
                reason: reason::ORDERED,
            },
            Case {
                election: &promote("pxc-2"),
                pending: Some(&ordered),
                blockers: &[],
                due: false,
                plan: Plan::Nothing,
                reason: reason::ORDERED,
            },
            // The group runs: the decision is complete, whoever is Synced.
            Case {
                election: &keep,
                pending: Some(&ordered),
                blockers: &[],
                due: false,
                plan: Plan::Complete {
                    bootstrapped: "pxc-1".into(),
                    primary: "pxc-2".into(),
                },
                reason: reason::PRIMARY,
            },
            Case {
                election: &keep,
                pending: None,
                blockers: &[],
                due: false,
                plan: Plan::Nothing,
                reason: reason::PRIMARY,
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let (p, standing) = plan(c.election, c.pending, c.blockers, &members, c.due, t(9));
            assert_eq!(p, c.plan, "case {i}");
            assert_eq!(standing.reason, c.reason, "case {i}");
            assert_eq!(standing.primary, c.reason == reason::PRIMARY, "case {i}");
        }
        // A lone member donating an SST: the group runs, nothing is Synced.
        let donor = ObservedMember {
            name: "pxc-0".into(),
            status: Some(MemberStatus {
                position: Position::Galera {
                    cluster_uuid: U1.into(),
                    seqno: 3,
                    state: "Donor/Desynced".into(),
                },
                details: serde_json::json!({"wsrepClusterStatus": "Primary"}),
                ..Default::default()
            }),
            error: None,
        };
        let (p, standing) = plan(&wait, None, &[], &[donor], true, t(9));
        assert_eq!(p, Plan::Nothing);
        assert!(standing.primary, "{standing:?}");
        assert_eq!(
            standing.message,
            "pxc-0 is Donor/Desynced in a Primary component; no member is Synced yet"
        );
        // The waiting reason is the election's, word for word.
        let (_, standing) = plan(&wait, None, &[], &members, true, t(9));
        assert!(standing.message.contains("1 of 3"), "{}", standing.message);
    }

    #[test]
    fn orders_are_paced_and_repeated_only_to_a_member_that_is_down() {
        let now_i = Instant::now();
        let down = crashed("pxc-1", 120, ProcessState::Preparing);
        let starting = crashed("pxc-1", 120, ProcessState::Starting);
        let unordered = decision("pxc-1", None);
        // Not accepted yet: every RETRY_ORDER_EVERY.
        assert!(order_due(&unordered, Some(&down), None, now_i, t(0)));
        let just = now_i - Duration::from_millis(500);
        assert!(!order_due(&unordered, Some(&down), Some(just), now_i, t(0)));
        let earlier = now_i - RETRY_ORDER_EVERY;
        assert!(order_due(
            &unordered,
            Some(&down),
            Some(earlier),
            now_i,
            t(0)
        ));
        // Accepted: not again while fresh, nor while its server starts.
        let ordered = decision("pxc-1", Some(t(0)));
        assert!(!order_due(&ordered, Some(&down), None, now_i, t(5)));
        assert!(!order_due(&ordered, Some(&starting), None, now_i, t(60)));
        assert!(!order_due(&ordered, None, None, now_i, t(60)));
        // Accepted long ago and its server is down: the order was lost.
        assert!(order_due(&ordered, Some(&down), None, now_i, t(10)));
        let exited = crashed("pxc-1", 120, ProcessState::Exited);
        assert!(order_due(&ordered, Some(&exited), None, now_i, t(60)));
    }

    #[test]
    fn the_condition_follows_the_standing() {
        let mut status = ClusterStatus::default();
        let waiting = |message: &str| Standing {
            primary: false,
            reason: reason::WAITING,
            message: message.into(),
        };
        set_standing(&mut status, &waiting("1 of 3"), Some(1), t(0));
        // Same reason, new counts: the message follows, the time stays.
        set_standing(&mut status, &waiting("2 of 3"), Some(1), t(1));
        let c = get_condition(&status.conditions, condition_type::PRIMARY_COMPONENT).unwrap();
        assert_eq!((c.status.as_str(), c.message.as_str()), ("False", "2 of 3"));
        assert_eq!(c.last_transition_time, t(0));
        let primary = Standing {
            primary: true,
            reason: reason::PRIMARY,
            message: "pxc-1 is Synced".into(),
        };
        set_standing(&mut status, &primary, Some(1), t(2));
        let c = get_condition(&status.conditions, condition_type::PRIMARY_COMPONENT).unwrap();
        assert_eq!((c.status.as_str(), c.last_transition_time), ("True", t(2)));
    }

    #[test]
    fn the_decision_round_trips_through_status_json() {
        let status = ClusterStatus {
            bootstrap: Some(decision("pxc-1", Some(t(3)))),
            ..Default::default()
        };
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["bootstrap"]["instance"], "pxc-1");
        assert_eq!(v["bootstrap"]["seqno"], 120);
        assert_eq!(v["bootstrap"]["uuid"], U1);
        assert!(v["bootstrap"]["decidedAt"].is_string());
        assert!(v["bootstrap"]["orderedAt"].is_string());
        let back: ClusterStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, status);
        // Cleared: the merge patch removes it.
        let cleared = crate::controller::status::status_patch(
            &ClusterStatus::default(),
            Some(&serde_json::to_value(&status).unwrap()),
        );
        assert_eq!(cleared["status"]["bootstrap"], serde_json::Value::Null);
    }
}
