//! status: pure. The cluster status from what observe saw and the previous
//! status; the phase; the conditions; the merge patch; the state changes
//! worth an Event. No IO.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::decide::PodInfo;
use crate::api::status::{
    ClusterStatus, InstanceStatus, Phase, WsrepStatus, condition_type, get_condition, set_condition,
};
use crate::build::names;
use crate::engine::{ObservedMember, Routing};
use crate::galera;
use crate::instance::protocol::Role;

/// Longest per-instance message kept in status.
const MAX_INSTANCE_MESSAGE: usize = 256;

/// Everything the status of a valid cluster is computed from.
#[derive(Clone, Debug)]
pub struct StatusInput<'a> {
    /// Cluster name.
    pub cluster: &'a str,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Instance names the spec asks for, in ordinal order.
    pub instance_names: &'a [String],
    /// The cluster's pods.
    pub pods: &'a [PodInfo],
    /// Instance-manager reports.
    pub members: &'a [ObservedMember],
    /// The routing decided this round.
    pub routing: &'a Routing,
    /// `Engine::unsupported_capabilities`.
    pub unsupported: Vec<String>,
    /// The time to stamp on changes.
    pub now: DateTime<Utc>,
}

/// The phase of a valid cluster: `Healthy` when every instance is ready and
/// a writer is routed; otherwise `Creating` until the cluster was first
/// healthy (or, after a rejected spec, while nothing is ready), then
/// `Degraded`.
pub fn phase_for(previous: Option<Phase>, healthy: bool, ready_instances: i32) -> Phase {
    if healthy {
        return Phase::Healthy;
    }
    match previous {
        None | Some(Phase::Creating) => Phase::Creating,
        Some(Phase::Failed) if ready_instances == 0 => Phase::Creating,
        _ => Phase::Degraded,
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn instance_status(name: &str, pods: &[PodInfo], members: &[ObservedMember]) -> InstanceStatus {
    let pod = pods.iter().find(|p| p.name == name);
    let member = members.iter().find(|m| m.name == name);
    let report = member.and_then(|m| m.status.as_ref());
    let message = match (pod, report) {
        (None, _) => Some("pod does not exist yet".to_string()),
        (Some(p), _) if p.deleting => Some("pod is being deleted".to_string()),
        (Some(_), Some(r)) => r.message.clone(),
        (Some(p), None) if p.phase.as_deref() != Some("Running") => Some(format!(
            "pod is {}",
            p.phase.as_deref().unwrap_or("pending")
        )),
        (Some(_), None) => member.and_then(|m| m.error.clone()),
    };
    InstanceStatus {
        name: name.to_string(),
        role: report
            .map_or(Role::Unknown, |r| r.role)
            .as_str()
            .to_string(),
        ready: pod.is_some_and(|p| p.ready && !p.deleting),
        position: report.and_then(|r| r.position.describe()),
        message: message.map(|m| truncate(&m, MAX_INSTANCE_MESSAGE)),
        wsrep: report.and_then(galera::wsrep_status),
        pending_restart: report.is_some_and(|r| r.pending_restart),
    }
}

/// Compute the status of a valid cluster. Fields the operator writes as
/// intent (`targetPrimary`) are carried over from `previous`; condition
/// transition times move only when a condition flips; the primary
/// timestamp moves only when the primary changes.
pub fn compute_status(previous: Option<&ClusterStatus>, input: &StatusInput<'_>) -> ClusterStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let instances = i32::try_from(input.instance_names.len()).unwrap_or(i32::MAX);
    let instances_status: Vec<InstanceStatus> = input
        .instance_names
        .iter()
        .map(|n| instance_status(n, input.pods, input.members))
        .collect();
    let ready_instances =
        i32::try_from(instances_status.iter().filter(|s| s.ready).count()).unwrap_or(i32::MAX);
    let all_ready = instances > 0 && ready_instances == instances;
    let healthy = all_ready && input.routing.rw.is_some();
    let phase = phase_for(previous.and_then(|s| s.phase), healthy, ready_instances);
    let not_ready: Vec<&str> = instances_status
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.name.as_str())
        .collect();
    let ready_text = format!("{ready_instances}/{instances}");
    let detail = if healthy {
        format!("{ready_text} instances ready")
    } else if all_ready {
        format!("{ready_text} instances ready; no writer is routed")
    } else {
        format!(
            "{ready_text} instances ready; waiting for {}",
            not_ready.join(", ")
        )
    };

    if status.current_primary != input.routing.rw {
        status.current_primary_timestamp = Some(input.now);
    }
    status.current_primary = input.routing.rw.clone();
    status.phase = Some(phase);
    status.phase_reason = Some(detail.clone());
    status.observed_generation = input.generation;
    status.instances = instances;
    status.ready_instances = ready_instances;
    status.ready = Some(ready_text);
    status.instances_status = instances_status;
    status.write_service = Some(names::rw_service(input.cluster));
    status.read_service = Some(names::ro_service(input.cluster));
    status.unsupported_capabilities = input.unsupported.clone();

    let ready_reason = if healthy {
        "AllInstancesReady"
    } else if all_ready {
        "NoWriter"
    } else {
        "InstancesNotReady"
    };
    let conditions: [(&str, bool, &str, &str); 3] = if healthy {
        [
            (condition_type::READY, true, ready_reason, &detail),
            (condition_type::PROGRESSING, false, "ReconcileComplete", ""),
            (condition_type::DEGRADED, false, "AsExpected", ""),
        ]
    } else {
        [
            (condition_type::READY, false, ready_reason, &detail),
            (
                condition_type::PROGRESSING,
                true,
                "WaitingForInstances",
                &detail,
            ),
            if phase == Phase::Creating {
                (condition_type::DEGRADED, false, "Creating", "")
            } else {
                (condition_type::DEGRADED, true, ready_reason, &detail)
            },
        ]
    };
    for (type_, value, reason, message) in conditions {
        set_condition(
            &mut status.conditions,
            type_,
            value,
            reason,
            message,
            input.generation,
            input.now,
        );
    }
    status
}

/// The status of a cluster whose spec was rejected: phase `Failed`,
/// `Degraded=True` with reason `InvalidSpec` and the message naming the
/// field, `Progressing=False`. Observed facts (instances, primary, `Ready`)
/// are kept: the pods may still serve.
pub fn failed_status(
    previous: Option<&ClusterStatus>,
    message: &str,
    generation: Option<i64>,
    unsupported: Vec<String>,
    now: DateTime<Utc>,
) -> ClusterStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.phase = Some(Phase::Failed);
    status.phase_reason = Some(message.to_string());
    status.observed_generation = generation;
    status.unsupported_capabilities = unsupported;
    for (type_, value) in [
        (condition_type::DEGRADED, true),
        (condition_type::PROGRESSING, false),
    ] {
        set_condition(
            &mut status.conditions,
            type_,
            value,
            "InvalidSpec",
            message,
            generation,
            now,
        );
    }
    status
}

/// The status while the cluster is being deleted.
pub fn deleting_status(previous: Option<&ClusterStatus>, now: DateTime<Utc>) -> ClusterStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let generation = status.observed_generation;
    status.phase = Some(Phase::Deleting);
    status.phase_reason = Some("the cluster is being deleted".into());
    set_condition(
        &mut status.conditions,
        condition_type::READY,
        false,
        "Deleting",
        "the cluster is being deleted",
        generation,
        now,
    );
    status
}

/// The JSON merge patch (`{"status": …}`) that turns `old` (the object's
/// current `status`, as JSON) into `new`: keys that `new` no longer has are
/// set to `null` so that the merge removes them.
///
/// `targetPrimary` is sent only when it changes: a user sets it (the
/// switchover request) on the status subresource while a reconcile may be
/// computing a status from the object before that; an unchanged value
/// sent back would overwrite the request.
pub fn status_patch(new: &ClusterStatus, old: Option<&Value>) -> Value {
    let mut body = serde_json::to_value(new).unwrap_or_else(|_| Value::Object(Default::default()));
    if let (Value::Object(body), Some(Value::Object(old))) = (&mut body, old) {
        for key in old.keys() {
            if !body.contains_key(key) {
                body.insert(key.clone(), Value::Null);
            }
        }
        let target = body.get(TARGET_PRIMARY).unwrap_or(&Value::Null);
        if old.get(TARGET_PRIMARY).unwrap_or(&Value::Null) == target {
            body.remove(TARGET_PRIMARY);
        }
    }
    serde_json::json!({ "status": body })
}

/// The JSON key of `status.targetPrimary`.
const TARGET_PRIMARY: &str = "targetPrimary";

/// A change worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateChange {
    /// The phase moved.
    Phase {
        /// Before (`None` on the first status).
        from: Option<Phase>,
        /// After.
        to: Phase,
        /// `phaseReason` after.
        reason: String,
    },
    /// The writer moved.
    Primary {
        /// Before.
        from: Option<String>,
        /// After.
        to: Option<String>,
    },
    /// A Galera member became Synced in the group it was not part of.
    MemberJoined {
        /// The instance.
        instance: String,
        /// Its facts now (cluster size, seqno, last state transfer).
        wsrep: WsrepStatus,
    },
    /// A Galera member dropped out of the group.
    MemberLeft {
        /// The instance.
        instance: String,
        /// What it reports now (or why it reports nothing).
        why: String,
    },
}

impl StateChange {
    /// Whether the change is bad news (Event type `Warning`).
    pub fn is_warning(&self) -> bool {
        match self {
            Self::Phase { to, .. } => matches!(to, Phase::Degraded | Phase::Failed),
            Self::Primary { to, .. } => to.is_none(),
            Self::MemberJoined { .. } => false,
            Self::MemberLeft { .. } => true,
        }
    }

    /// The instance the change is about, if one.
    pub fn instance(&self) -> Option<&str> {
        match self {
            Self::MemberJoined { instance, .. } | Self::MemberLeft { instance, .. } => {
                Some(instance)
            }
            Self::Phase { .. } | Self::Primary { .. } => None,
        }
    }

    /// PascalCase Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Phase { to, .. } => match to {
                Phase::Failed => "InvalidSpec",
                other => other.as_str(),
            },
            Self::Primary { .. } => "PrimaryChanged",
            Self::MemberJoined { .. } => "MemberJoined",
            Self::MemberLeft { .. } => "MemberLeft",
        }
    }

    /// Human-readable note.
    pub fn note(&self) -> String {
        let or_none = |s: &Option<String>| s.clone().unwrap_or_else(|| "none".into());
        match self {
            Self::Phase { from, to, reason } => match from {
                Some(from) => format!("phase {from} -> {to}: {reason}"),
                None => format!("phase {to}: {reason}"),
            },
            Self::Primary { from, to } => {
                format!("primary {} -> {}", or_none(from), or_none(to))
            }
            Self::MemberJoined { instance, wsrep } => {
                let size = wsrep
                    .cluster_size
                    .map_or_else(|| "?".to_string(), |s| s.to_string());
                let transfer = match wsrep.last_state_transfer.as_deref() {
                    Some("ist") => ", after an IST (missing write-sets only)".to_string(),
                    Some("sst") => ", after an SST (a full copy)".to_string(),
                    Some(other) => format!(", after state transfer {other}"),
                    None => String::new(),
                };
                format!(
                    "{instance} is Synced in the primary component (cluster size {size}, seqno {}{transfer})",
                    wsrep.seqno
                )
            }
            Self::MemberLeft { instance, why } => format!("{instance} left the group: {why}"),
        }
    }
}

/// The changes between two statuses that deserve an Event: a phase
/// transition, a new primary, a Galera member joining (Synced, with the
/// state transfer it received) or leaving the group. A rejected spec shows
/// as a transition to `Failed`, reported as `InvalidSpec`. Only
/// transitions count, so a steady cluster produces none.
pub fn state_changes(previous: Option<&ClusterStatus>, new: &ClusterStatus) -> Vec<StateChange> {
    let mut out = Vec::new();
    let old_phase = previous.and_then(|s| s.phase);
    if let Some(to) = new.phase
        && old_phase != Some(to)
    {
        out.push(StateChange::Phase {
            from: old_phase,
            to,
            reason: new.phase_reason.clone().unwrap_or_default(),
        });
    }
    let old_primary = previous.and_then(|s| s.current_primary.clone());
    if old_primary != new.current_primary {
        out.push(StateChange::Primary {
            from: old_primary,
            to: new.current_primary.clone(),
        });
    }
    out.extend(membership_changes(previous, new));
    out
}

/// Galera joins and leaves between two statuses, from the instances'
/// `wsrep` facts. An instance without `wsrep` facts in either status is
/// not a Galera member and never counts. A member has joined when it is
/// Synced and was not a full member before (Synced, or a donor in a
/// Primary component); it has left when it said it was in the group
/// before (see [`galera::in_group`]) and is outside now. A member whose
/// server runs without saying whether it is in a primary component (a
/// busy joiner or donor) counts as outside for both: a joiner busy
/// receiving an SST gets its `MemberJoined` when it is Synced, a joiner
/// whose server keeps failing is never reported leaving a group it never
/// joined, and a donor busy during an SST is reported joining again when
/// it is Synced (a busy member that then goes down is not reported
/// leaving).
fn membership_changes(previous: Option<&ClusterStatus>, new: &ClusterStatus) -> Vec<StateChange> {
    let mut out = Vec::new();
    for now in &new.instances_status {
        let before = previous.and_then(|p| p.instances_status.iter().find(|i| i.name == now.name));
        let before_wsrep = before.and_then(|b| b.wsrep.as_ref());
        if now.wsrep.is_none() && before_wsrep.is_none() {
            continue;
        }
        let synced = now.wsrep.as_ref().is_some_and(is_synced);
        let was_full_member = before_wsrep.is_some_and(|w| {
            let state = galera_state(w);
            state == "synced"
                || (w.cluster_status.as_deref() == Some("Primary")
                    && (state.starts_with("donor") || state.starts_with("desync")))
        });
        // A first sighting counts as outside.
        let was_in = before.map_or(Some(false), |b| galera::in_group(b.wsrep.as_ref()));
        if synced && !was_full_member {
            out.push(StateChange::MemberJoined {
                instance: now.name.clone(),
                wsrep: now.wsrep.clone().unwrap_or_default(),
            });
        } else if was_in == Some(true) && galera::in_group(now.wsrep.as_ref()) == Some(false) {
            let why = match &now.wsrep {
                Some(w) => format!(
                    "{}{}",
                    w.state,
                    w.cluster_status
                        .as_deref()
                        .map(|c| format!(", {c}"))
                        .unwrap_or_default()
                ),
                None => now
                    .message
                    .clone()
                    .unwrap_or_else(|| "its instance manager does not answer".into()),
            };
            out.push(StateChange::MemberLeft {
                instance: now.name.clone(),
                why,
            });
        }
    }
    out
}

fn galera_state(w: &WsrepStatus) -> String {
    w.state.trim().to_ascii_lowercase()
}

fn is_synced(w: &WsrepStatus) -> bool {
    galera_state(w) == "synced"
}

/// The `Degraded` condition's message, if the condition is true.
pub fn degraded_message(status: &ClusterStatus) -> Option<&str> {
    get_condition(&status.conditions, condition_type::DEGRADED)
        .filter(|c| c.status == "True")
        .map(|c| c.message.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::protocol::{MemberStatus, Position};
    use serde_json::json;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    fn names() -> Vec<String> {
        (0..3).map(|i| format!("simple-pg-{i}")).collect()
    }

    fn pod(name: &str, ready: bool) -> PodInfo {
        PodInfo {
            name: name.into(),
            ready,
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.1".into()),
            ..Default::default()
        }
    }

    fn member(name: &str, role: Role) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role,
                ready: true,
                position: Position::Wal {
                    timeline: 1,
                    received_lsn: Some(0x3000060),
                    replayed_lsn: Some(0x3000060),
                },
                ..Default::default()
            }),
            error: None,
        }
    }

    fn input<'a>(
        instance_names: &'a [String],
        pods: &'a [PodInfo],
        members: &'a [ObservedMember],
        routing: &'a Routing,
        now: DateTime<Utc>,
    ) -> StatusInput<'a> {
        StatusInput {
            cluster: "simple-pg",
            generation: Some(4),
            instance_names,
            pods,
            members,
            routing,
            unsupported: vec!["backups".into()],
            now,
        }
    }

    #[test]
    fn phase_table() {
        assert_eq!(phase_for(None, false, 0), Phase::Creating);
        assert_eq!(phase_for(Some(Phase::Creating), false, 2), Phase::Creating);
        assert_eq!(phase_for(Some(Phase::Creating), true, 3), Phase::Healthy);
        assert_eq!(phase_for(Some(Phase::Healthy), false, 2), Phase::Degraded);
        assert_eq!(phase_for(Some(Phase::Degraded), false, 0), Phase::Degraded);
        assert_eq!(phase_for(Some(Phase::Failed), false, 0), Phase::Creating);
        assert_eq!(phase_for(Some(Phase::Failed), false, 1), Phase::Degraded);
    }

    #[test]
    fn creating_then_healthy_then_degraded() {
        let names = names();
        let members: Vec<ObservedMember> = vec![
            member("simple-pg-0", Role::Primary),
            member("simple-pg-1", Role::Replica),
            ObservedMember {
                name: "simple-pg-2".into(),
                status: None,
                error: Some("unreachable".into()),
            },
        ];
        let routing = Routing {
            rw: Some("simple-pg-0".into()),
            ro: vec!["simple-pg-1".into()],
        };

        // One pod missing: Creating.
        let pods = [pod("simple-pg-0", true), pod("simple-pg-1", true)];
        let s1 = compute_status(None, &input(&names, &pods, &members, &routing, t(10)));
        assert_eq!(s1.phase, Some(Phase::Creating));
        assert_eq!(s1.ready.as_deref(), Some("2/3"));
        assert_eq!((s1.ready_instances, s1.instances), (2, 3));
        assert_eq!(s1.current_primary.as_deref(), Some("simple-pg-0"));
        assert_eq!(s1.current_primary_timestamp, Some(t(10)));
        assert_eq!(s1.write_service.as_deref(), Some("simple-pg-rw"));
        assert_eq!(s1.read_service.as_deref(), Some("simple-pg-ro"));
        assert_eq!(s1.observed_generation, Some(4));
        assert_eq!(s1.unsupported_capabilities, ["backups"]);
        assert_eq!(s1.instances_status[0].role, "primary");
        assert_eq!(
            s1.instances_status[0].position.as_deref(),
            Some("tl 1 received 0/3000060 replayed 0/3000060")
        );
        assert_eq!(
            s1.instances_status[2].message.as_deref(),
            Some("pod does not exist yet")
        );
        let ready = get_condition(&s1.conditions, "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(
            get_condition(&s1.conditions, "Progressing").unwrap().status,
            "True"
        );
        assert_eq!(
            get_condition(&s1.conditions, "Degraded").unwrap().status,
            "False"
        );

        // All ready: Healthy; Ready flips (new time), Degraded does not.
        let pods = [
            pod("simple-pg-0", true),
            pod("simple-pg-1", true),
            pod("simple-pg-2", true),
        ];
        let s2 = compute_status(Some(&s1), &input(&names, &pods, &members, &routing, t(20)));
        assert_eq!(s2.phase, Some(Phase::Healthy));
        let ready = get_condition(&s2.conditions, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time),
            ("True", t(20))
        );
        let degraded = get_condition(&s2.conditions, "Degraded").unwrap();
        assert_eq!(degraded.last_transition_time, t(10));
        assert_eq!(
            s2.current_primary_timestamp,
            Some(t(10)),
            "primary unchanged"
        );

        // Same input later: identical status, so no patch is needed.
        let s2b = compute_status(Some(&s2), &input(&names, &pods, &members, &routing, t(30)));
        assert_eq!(s2b, s2);
        assert!(state_changes(Some(&s2), &s2b).is_empty());

        // A pod lost readiness: Degraded=True.
        let pods = [
            pod("simple-pg-0", true),
            pod("simple-pg-1", false),
            pod("simple-pg-2", true),
        ];
        let s3 = compute_status(Some(&s2), &input(&names, &pods, &members, &routing, t(40)));
        assert_eq!(s3.phase, Some(Phase::Degraded));
        assert_eq!(
            degraded_message(&s3),
            Some("2/3 instances ready; waiting for simple-pg-1")
        );
        let changes = state_changes(Some(&s2), &s3);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].is_warning());
        assert_eq!(changes[0].reason(), "Degraded");
    }

    #[test]
    fn primary_change_is_reported_and_stamped() {
        let names = names();
        let pods: Vec<_> = names.iter().map(|n| pod(n, true)).collect();
        let members: Vec<_> = names.iter().map(|n| member(n, Role::Replica)).collect();
        let r0 = Routing {
            rw: Some("simple-pg-0".into()),
            ro: vec![],
        };
        let r1 = Routing {
            rw: Some("simple-pg-1".into()),
            ro: vec![],
        };
        let s1 = compute_status(None, &input(&names, &pods, &members, &r0, t(1)));
        let s2 = compute_status(Some(&s1), &input(&names, &pods, &members, &r1, t(2)));
        assert_eq!(s2.current_primary_timestamp, Some(t(2)));
        let changes = state_changes(Some(&s1), &s2);
        assert_eq!(
            changes,
            [StateChange::Primary {
                from: Some("simple-pg-0".into()),
                to: Some("simple-pg-1".into())
            }]
        );
        assert_eq!(changes[0].note(), "primary simple-pg-0 -> simple-pg-1");
    }

    #[test]
    fn all_ready_without_writer_is_not_healthy() {
        let names = names();
        let pods: Vec<_> = names.iter().map(|n| pod(n, true)).collect();
        let s = compute_status(None, &input(&names, &pods, &[], &Routing::default(), t(1)));
        assert_eq!(s.phase, Some(Phase::Creating));
        assert_eq!(
            get_condition(&s.conditions, "Ready").unwrap().reason,
            "NoWriter"
        );
    }

    #[test]
    fn rejected_spec_sets_failed_and_degraded_with_field() {
        let msg = "spec.instances: must be odd for FakeCluster; got 2";
        let s = failed_status(None, msg, Some(7), vec![], t(5));
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(degraded_message(&s), Some(msg));
        let d = get_condition(&s.conditions, "Degraded").unwrap();
        assert_eq!(d.reason, "InvalidSpec");
        assert_eq!(d.observed_generation, Some(7));
        let changes = state_changes(None, &s);
        assert_eq!(changes[0].reason(), "InvalidSpec");
        assert!(changes[0].is_warning());
        // Fixed spec, nothing ready yet: back to Creating, Degraded clears.
        let names = names();
        let s2 = compute_status(
            Some(&s),
            &input(&names, &[], &[], &Routing::default(), t(6)),
        );
        assert_eq!(s2.phase, Some(Phase::Creating));
        assert_eq!(degraded_message(&s2), None);
    }

    #[test]
    fn deleting_status_sets_phase() {
        let s = deleting_status(None, t(1));
        assert_eq!(s.phase, Some(Phase::Deleting));
        assert_eq!(
            get_condition(&s.conditions, "Ready").unwrap().reason,
            "Deleting"
        );
    }

    #[test]
    fn status_patch_nulls_removed_fields() {
        let new = ClusterStatus {
            phase: Some(Phase::Healthy),
            ..Default::default()
        };
        let old = json!({"phase": "Creating", "currentPrimary": "simple-pg-0", "instances": 3});
        let patch = status_patch(&new, Some(&old));
        assert_eq!(patch["status"]["phase"], "Healthy");
        // An unchanged targetPrimary is not sent (a user's switchover
        // request written meanwhile is kept); a changed one is.
        let kept = ClusterStatus {
            target_primary: Some("simple-pg-0".into()),
            ..Default::default()
        };
        let old_target = json!({"targetPrimary": "simple-pg-0"});
        assert!(
            status_patch(&kept, Some(&old_target))["status"]
                .get("targetPrimary")
                .is_none()
        );
        let moved = ClusterStatus {
            target_primary: Some("simple-pg-2".into()),
            ..Default::default()
        };
        assert_eq!(
            status_patch(&moved, Some(&old_target))["status"]["targetPrimary"],
            "simple-pg-2"
        );
        assert_eq!(
            status_patch(&ClusterStatus::default(), Some(&old_target))["status"]["targetPrimary"],
            Value::Null
        );
        assert_eq!(patch["status"]["currentPrimary"], Value::Null);
        assert_eq!(patch["status"]["instances"], 0);
        assert!(
            status_patch(&new, None)["status"]
                .get("currentPrimary")
                .is_none()
        );
    }

    fn galera_member(name: &str, state: &str, cluster_status: Option<&str>) -> ObservedMember {
        let mut details = json!({"wsrepClusterSize": 3, "lastStateTransfer": "ist",
                                 "wsrepFlowControlPaused": 0.0});
        if let Some(cs) = cluster_status {
            details["wsrepClusterStatus"] = json!(cs);
        }
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role: if cluster_status == Some("Primary") {
                    Role::Member
                } else {
                    Role::Unknown
                },
                ready: state == "Synced",
                position: Position::Galera {
                    cluster_uuid: "u1".into(),
                    seqno: 42,
                    state: state.into(),
                },
                details,
                ..Default::default()
            }),
            error: None,
        }
    }

    fn unreachable(name: &str) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: None,
            error: Some("connection refused".into()),
        }
    }

    /// Statuses of a 3-member Galera cluster from rows of members.
    fn galera_statuses(rounds: &[Vec<ObservedMember>]) -> Vec<ClusterStatus> {
        let names: Vec<String> = (0..3).map(|i| format!("simple-galera-{i}")).collect();
        let pods: Vec<_> = names.iter().map(|n| pod(n, true)).collect();
        let mut out: Vec<ClusterStatus> = Vec::new();
        for (i, members) in rounds.iter().enumerate() {
            let s = compute_status(
                out.last(),
                &input(&names, &pods, members, &Routing::default(), t(i as i64)),
            );
            out.push(s);
        }
        out
    }

    fn membership(changes: &[StateChange]) -> Vec<String> {
        changes
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    StateChange::MemberJoined { .. } | StateChange::MemberLeft { .. }
                )
            })
            .map(|c| format!("{} {}", c.reason(), c.note()))
            .collect()
    }

    #[test]
    fn galera_facts_are_in_instance_status() {
        let members = vec![
            galera_member("simple-galera-0", "Synced", Some("Primary")),
            galera_member("simple-galera-1", "Recovered", None),
            unreachable("simple-galera-2"),
        ];
        let s = &galera_statuses(&[members])[0];
        let w = s.instances_status[0].wsrep.as_ref().unwrap();
        assert_eq!(
            (
                w.state.as_str(),
                w.seqno,
                w.cluster_size,
                w.cluster_status.as_deref()
            ),
            ("Synced", 42, Some(3), Some("Primary"))
        );
        assert_eq!(w.flow_control_paused, Some(0.0));
        assert_eq!(w.last_state_transfer.as_deref(), Some("ist"));
        let v = serde_json::to_value(s).unwrap();
        assert_eq!(v["instancesStatus"][0]["wsrep"]["clusterSize"], 3);
        assert_eq!(v["instancesStatus"][1]["wsrep"]["state"], "Recovered");
        assert!(v["instancesStatus"][2].get("wsrep").is_none());
        // Other engines' instances carry none.
        let names = names();
        let pods: Vec<_> = names.iter().map(|n| pod(n, true)).collect();
        let pg = [member("simple-pg-0", Role::Primary)];
        let s = compute_status(None, &input(&names, &pods, &pg, &Routing::default(), t(1)));
        assert!(s.instances_status[0].wsrep.is_none());
    }

    #[test]
    fn galera_joins_and_leaves_are_events_once() {
        let g = |i: usize| format!("simple-galera-{i}");
        let synced = |i: usize| galera_member(&g(i), "Synced", Some("Primary"));
        let statuses = galera_statuses(&[
            // 0: all Synced.
            vec![synced(0), synced(1), synced(2)],
            // 1: the same again.
            vec![synced(0), synced(1), synced(2)],
            // 2: 2 killed (unreachable), 1 busy donor (no answer).
            vec![
                synced(0),
                galera_member(&g(1), "Starting", None),
                unreachable(&g(2)),
            ],
            // 3: 2 recovered and joining, 1 a donor that answers.
            vec![
                synced(0),
                galera_member(&g(1), "Donor/Desynced", Some("Primary")),
                galera_member(&g(2), "Joining", Some("Primary")),
            ],
            // 4: all Synced again.
            vec![synced(0), synced(1), synced(2)],
            // 5: quorum lost: 0 and 1 non-Primary.
            vec![
                galera_member(&g(0), "Initialized", Some("non-Primary")),
                galera_member(&g(1), "Initialized", Some("non-Primary")),
                synced(2),
            ],
        ]);
        let diffs: Vec<Vec<String>> = std::iter::once(None)
            .chain(statuses.iter().map(Some))
            .zip(&statuses)
            .map(|(before, after)| membership(&state_changes(before, after)))
            .collect();
        // First status: every Synced member joined.
        assert_eq!(diffs[0].len(), 3, "{:?}", diffs[0]);
        assert!(
            diffs[0][0].starts_with(
                "MemberJoined simple-galera-0 is Synced in the primary component (cluster size 3, seqno 42, after an IST"
            ),
            "{:?}",
            diffs[0]
        );
        // Steady: nothing.
        assert!(diffs[1].is_empty(), "{:?}", diffs[1]);
        // The killed member left; the busy donor did not.
        assert_eq!(diffs[2].len(), 1, "{:?}", diffs[2]);
        assert!(
            diffs[2][0].starts_with("MemberLeft simple-galera-2 left the group"),
            "{:?}",
            diffs[2]
        );
        // Joining is not joined yet; the donor answering is no change.
        assert!(diffs[3].is_empty(), "{:?}", diffs[3]);
        // Synced again: 2 joined; the donor back to Synced counts once.
        assert!(
            diffs[4]
                .iter()
                .any(|d| d.starts_with("MemberJoined simple-galera-2")),
            "{:?}",
            diffs[4]
        );
        assert!(
            diffs[4].iter().all(|d| !d.contains("simple-galera-0")),
            "{:?}",
            diffs[4]
        );
        // Quorum lost: two leaves, as warnings.
        assert_eq!(diffs[5].len(), 2, "{:?}", diffs[5]);
        assert!(
            diffs[5][0].contains("Initialized, non-Primary"),
            "{:?}",
            diffs[5]
        );
        let changes = state_changes(Some(&statuses[4]), &statuses[5]);
        // Each names its instance (the Event's related pod).
        assert_eq!(changes[0].instance(), Some("simple-galera-0"));
        assert!(
            changes
                .iter()
                .filter(|c| c.reason() == "MemberLeft")
                .all(StateChange::is_warning)
        );
    }

    #[test]
    fn a_joiner_that_keeps_failing_never_leaves() {
        let g = |i: usize| format!("simple-galera-{i}");
        let synced = |i: usize| galera_member(&g(i), "Synced", Some("Primary"));
        let statuses = galera_statuses(&[
            vec![
                synced(0),
                galera_member(&g(1), "Recovered", None),
                synced(2),
            ],
            vec![synced(0), galera_member(&g(1), "Starting", None), synced(2)],
            vec![
                synced(0),
                galera_member(&g(1), "Recovered", None),
                synced(2),
            ],
            vec![synced(0), galera_member(&g(1), "Starting", None), synced(2)],
            vec![synced(0), synced(1), synced(2)],
        ]);
        for pair in statuses.windows(2) {
            let changes = membership(&state_changes(Some(&pair[0]), &pair[1]));
            assert!(
                changes.iter().all(|c| !c.starts_with("MemberLeft")),
                "{changes:?}"
            );
        }
        let last = membership(&state_changes(Some(&statuses[3]), &statuses[4]));
        assert_eq!(last.len(), 1, "{last:?}");
        assert!(
            last[0].starts_with("MemberJoined simple-galera-1"),
            "{last:?}"
        );
    }

    #[test]
    fn long_messages_are_truncated_on_a_char_boundary() {
        let s = "é".repeat(300);
        let t = truncate(&s, 255);
        assert!(t.len() <= 255 + "…".len());
        assert!(t.ends_with('…'));
    }
}
