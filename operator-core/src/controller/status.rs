//! status: pure. The cluster status from what observe saw and the previous
//! status; the phase; the conditions; the merge patch; the state changes
//! worth an Event. No IO.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::decide::PodInfo;
use crate::api::status::{
    ClusterStatus, InstanceStatus, Phase, condition_type, get_condition, set_condition,
};
use crate::build::names;
use crate::engine::{ObservedMember, Routing};
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
}

impl StateChange {
    /// Whether the change is bad news (Event type `Warning`).
    pub fn is_warning(&self) -> bool {
        match self {
            Self::Phase { to, .. } => matches!(to, Phase::Degraded | Phase::Failed),
            Self::Primary { to, .. } => to.is_none(),
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
        }
    }
}

/// The changes between two statuses that deserve an Event: a phase
/// transition, a new primary. A rejected spec shows as a transition to
/// `Failed`, reported as `InvalidSpec`.
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
    out
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

    #[test]
    fn long_messages_are_truncated_on_a_char_boundary() {
        let s = "é".repeat(300);
        let t = truncate(&s, 255);
        assert!(t.len() <= 255 + "…".len());
        assert!(t.ends_with('…'));
    }
}
