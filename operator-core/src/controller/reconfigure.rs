//! reconfigure: hands the engine settings a cluster wants (the engine block
//! of its `<cluster>-config` ConfigMap, just applied) to running instance
//! managers that report other settings, with the `reconfigure` action, so
//! that a changed `spec.postgresql.parameters` or `spec.configuration`
//! reaches the running servers without a pod restart. IO: instance
//! managers over HTTP (reached by pod IP, as observe reaches them) and
//! Events through the reporter; [`plan`] is pure.
//!
//! What a manager cannot apply live it reports as `pendingRestart`; this
//! step restarts nothing: the rolling update restarts such members in
//! update order. A primary whose new settings lower a parameter standbys
//! need at least as high (`primaryFirst`) is reconfigured alone, and the
//! other members only once it restarted with them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::Resource;
use kube::api::DynamicObject;
use serde_json::json;

use super::decide::PodInfo;
use super::observe::{Observation, reachable_endpoints};
use super::reconcile::KindContext;
use crate::build::names;
use crate::engine::{
    EngineManifest, InstanceOps, ObservedMember, OpError, ReplicationModel, ValidatedCluster,
};
use crate::instance::client::InstanceClient;
use crate::instance::protocol::{
    ACTION_RECONFIGURE, ProcessState, Role, SECRET_KEY_API_TOKEN, settings_hash,
};

/// Event reason of a member that took new settings.
pub const REASON_RECONFIGURED: &str = "InstanceReconfigured";
/// Event reason of a member that did not answer `reconfigure`.
pub const REASON_FAILED: &str = "ReconfigureFailed";
/// Event action of a member that took all of its new settings live.
pub const ACTION_RELOADED: &str = "Reconfigure";
/// Event action of a member that waits for a restart for some of them.
pub const ACTION_PENDING_RESTART: &str = "ReconfigureRestartPending";
/// A member that failed to take settings is asked again after this long
/// (the cluster is requeued by then).
pub const RETRY_FAILED: Duration = Duration::from_secs(15);
/// Bound of one `reconfigure` request (a reload, a few `SET GLOBAL`s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Requeue while a member's new settings are not handed over yet.
const REQUEUE: Duration = Duration::from_secs(5);
/// Requeue while members wait for another member's restart (the rolling
/// update's), which no Kubernetes object shows.
const REQUEUE_WAITING: Duration = Duration::from_secs(10);

/// What the step remembers between reconciles: failed attempts, so that a
/// member that refuses (e.g. an engine without the action) is not asked
/// again at every reconcile, nor reported each time.
#[derive(Default)]
pub(crate) struct Memory {
    failed: Mutex<HashMap<MemberKey, Failed>>,
}

/// Namespace, cluster, instance.
type MemberKey = (String, String, String);

/// A member's last failed `reconfigure`.
struct Failed {
    /// The settings hash it was asked to take.
    hash: String,
    at: Instant,
    /// Its manager has no such action (404): not asked again for these
    /// settings; they reach it at its next restart.
    unsupported: bool,
}

/// Why a member did not take the settings.
struct SendError {
    message: String,
    unsupported: bool,
}

impl Memory {
    /// Keep the clusters `keep(namespace, name)` accepts.
    pub(crate) fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.retain(|(ns, name, _), _| keep(ns, name));
    }
}

/// Which members to hand the wanted settings now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The primary, reconfigured alone before the others (whose turn
    /// depends on its answer).
    pub first: Option<String>,
    /// The members to reconfigure (after `first`, when its answer allows).
    pub then: Vec<String>,
    /// Why members with other settings wait, if any do.
    pub waiting: Option<String>,
}

impl Plan {
    /// Whether nothing is to be sent and nobody waits.
    pub fn is_empty(&self) -> bool {
        self.first.is_none() && self.then.is_empty() && self.waiting.is_none()
    }
}

/// Decide who takes `desired` (a [`settings_hash`]) now. A member is
/// outdated when its manager answers with another hash; one that reports
/// none (a manager older than the action) or is still preparing its data
/// directory (which renders its configuration at the end) is left alone.
/// With one primary (`model` `PrimaryReplica`): nothing while no member is
/// primary; an outdated primary first, alone; the others while the
/// primary does not wait for a restart that must come before theirs
/// (`restartPrimaryFirst`). Other models: every outdated member at once.
/// Pure.
pub fn plan(desired: &str, members: &[ObservedMember], model: ReplicationModel) -> Plan {
    let outdated: Vec<&ObservedMember> = members
        .iter()
        .filter(|m| {
            m.status.as_ref().is_some_and(|s| {
                s.process != ProcessState::Preparing
                    && s.config_hash.as_deref().is_some_and(|h| h != desired)
            })
        })
        .collect();
    if outdated.is_empty() {
        return Plan::default();
    }
    if model != ReplicationModel::PrimaryReplica {
        return Plan {
            then: outdated.iter().map(|m| m.name.clone()).collect(),
            ..Default::default()
        };
    }
    let Some(primary) = members.iter().find(|m| m.role() == Role::Primary) else {
        return Plan {
            waiting: Some("no primary answers; its settings go first".into()),
            ..Default::default()
        };
    };
    let replicas: Vec<String> = outdated
        .iter()
        .filter(|m| m.name != primary.name)
        .map(|m| m.name.clone())
        .collect();
    if outdated.iter().any(|m| m.name == primary.name) {
        return Plan {
            first: Some(primary.name.clone()),
            then: replicas,
            waiting: None,
        };
    }
    let status = primary.status.as_ref();
    if status.is_some_and(|s| s.pending_restart && s.restart_primary_first) && !replicas.is_empty()
    {
        return Plan {
            waiting: Some(format!(
                "{} (primary) must restart with the new settings before the other members take them (a parameter standbys need at least as high as the primary is lowered)",
                primary.name
            )),
            ..Default::default()
        };
    }
    Plan {
        then: replicas,
        ..Default::default()
    }
}

/// The step, after the ConfigMap was applied and the managers observed:
/// reconfigure the members [`plan`] names, report each in an Event. Never
/// fails the reconcile (a member that does not take the settings is
/// asked again later); returns a requeue delay while members wait.
pub(crate) async fn step(
    ctx: &KindContext,
    obj: &DynamicObject,
    cluster: &ValidatedCluster,
    manifest: &EngineManifest,
    seen: &Observation,
) -> Option<Duration> {
    let engine = &*ctx.engine;
    let desired_block = match engine.instance_settings(cluster) {
        Ok(b) => b,
        // Build already turned this into an error; not reached.
        Err(_) => return None,
    };
    let desired = settings_hash(&desired_block);
    let model = engine.topology(cluster, None).model;
    let mut plan = plan(&desired, &seen.members, model);
    if plan.is_empty() {
        return None;
    }
    let (ns, name) = (cluster.meta.namespace.as_str(), cluster.meta.name.as_str());
    let key = |instance: &str| (ns.to_string(), name.to_string(), instance.to_string());
    // Members that failed lately with the same settings wait their turn.
    {
        let failed = ctx
            .reconfigure
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let recent = |instance: &String| {
            failed.get(&key(instance)).is_some_and(|f| {
                f.hash == desired && (f.unsupported || f.at.elapsed() < RETRY_FAILED)
            })
        };
        if plan.first.as_ref().is_some_and(recent) {
            return Some(REQUEUE);
        }
        plan.then.retain(|m| !recent(m));
    }
    let object_ref = obj.object_ref(&ctx.resource);
    if let Some(why) = &plan.waiting {
        tracing::debug!("new settings wait: {why}");
        if plan.first.is_none() && plan.then.is_empty() {
            return Some(REQUEUE_WAITING);
        }
    }
    let Some(client) = client(ctx, cluster, manifest, &seen.pods) else {
        tracing::debug!("no {SECRET_KEY_API_TOKEN} to reconfigure with");
        return Some(REQUEUE);
    };
    let body = json!({ "engine": desired_block });
    let report = |instance: &str, result: &Result<serde_json::Value, SendError>| {
        let reporter = &ctx.shared.reporter;
        match result {
            // Actions told apart: Events of the same reason, action and
            // pod within minutes are one series that keeps its first note.
            Ok(reply) => reporter.note_about(
                &object_ref,
                instance,
                if reply["restart"] == true {
                    ACTION_PENDING_RESTART
                } else {
                    ACTION_RELOADED
                },
                false,
                REASON_RECONFIGURED,
                describe_reply(instance, reply),
            ),
            Err(e) => reporter.note_about(
                &object_ref,
                instance,
                "Reconfigure",
                true,
                REASON_FAILED,
                if e.unsupported {
                    format!(
                        "{instance}'s instance manager has no reconfigure action; it takes the new settings when its pod restarts: {}",
                        e.message
                    )
                } else {
                    format!(
                        "{instance} did not take the new settings (asked again in {}s): {}",
                        RETRY_FAILED.as_secs(),
                        e.message
                    )
                },
            ),
        }
    };
    let remember = |instance: &str, result: &Result<serde_json::Value, SendError>| {
        let mut failed = ctx
            .reconfigure
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(_) => failed.remove(&key(instance)),
            Err(e) => failed.insert(
                key(instance),
                Failed {
                    hash: desired.clone(),
                    at: Instant::now(),
                    unsupported: e.unsupported,
                },
            ),
        };
    };
    if let Some(primary) = &plan.first {
        let result = send(&client, primary, &body).await;
        report(primary, &result);
        remember(primary, &result);
        match &result {
            Ok(reply) if reply["primaryFirst"] == true && reply["restart"] == true => {
                if !plan.then.is_empty() {
                    ctx.shared.reporter.note(
                        &object_ref,
                        false,
                        REASON_RECONFIGURED,
                        format!(
                            "{} wait for {primary} (primary) to restart with the new settings: they lower a parameter standbys need at least as high as the primary",
                            plan.then.join(", ")
                        ),
                    );
                }
                return Some(REQUEUE);
            }
            Ok(_) => {}
            Err(_) => return Some(REQUEUE),
        }
    }
    let results =
        futures::future::join_all(plan.then.iter().map(|m| send(&client, m, &body))).await;
    for (m, result) in plan.then.iter().zip(&results) {
        report(m, result);
        remember(m, result);
    }
    Some(REQUEUE)
}

async fn send(
    client: &InstanceClient,
    instance: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, SendError> {
    client
        .action(instance, ACTION_RECONFIGURE, body.clone())
        .await
        .map_err(|e| SendError {
            unsupported: matches!(&e, OpError::Refused { message, .. } if message.starts_with("404")),
            message: e.to_string(),
        })
}

/// The Event note for a manager's `reconfigure` answer. Pure.
pub fn describe_reply(instance: &str, reply: &serde_json::Value) -> String {
    let list = |key: &str| -> Vec<String> {
        reply[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let changed = list("changed");
    let mut note = if changed.is_empty() {
        format!("{instance} runs with the new settings")
    } else {
        format!("{instance} took the new settings ({})", changed.join(", "))
    };
    if reply["restart"] == true {
        let restart_for = list("restartFor");
        note.push_str("; restart pending");
        if !restart_for.is_empty() {
            note.push_str(&format!(" for {}", restart_for.join(", ")));
        }
        note.push_str(" (the rolling update restarts it)");
        if reply["primaryFirst"] == true {
            note.push_str("; this primary must restart first, in place");
        }
    }
    note
}

/// The instance-manager client, reaching the managers as observe does.
fn client(
    ctx: &KindContext,
    cluster: &ValidatedCluster,
    manifest: &EngineManifest,
    pods: &[PodInfo],
) -> Option<InstanceClient> {
    let (ns, name) = (cluster.meta.namespace.as_str(), cluster.meta.name.as_str());
    let token = ctx
        .caches
        .secret(ns, &names::credentials_secret(name))
        .and_then(|s| s.data.as_ref()?.get(SECRET_KEY_API_TOKEN).cloned())
        .and_then(|b| String::from_utf8(b.0).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())?;
    let members = reachable_endpoints(&crate::plan::kubernetes_members(cluster, manifest), pods);
    Some(InstanceClient::new(
        token,
        cluster.meta.uid.clone().unwrap_or_default(),
        members,
        REQUEST_TIMEOUT,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::protocol::MemberStatus;

    const NEW: &str = "sha256:new";
    const OLD: &str = "sha256:old";

    fn member(name: &str, role: Role, hash: Option<&str>) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role,
                process: ProcessState::Running,
                config_hash: hash.map(str::to_string),
                ..Default::default()
            }),
            error: None,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn up_to_date_members_get_nothing() {
        let members = [
            member("pg-0", Role::Primary, Some(NEW)),
            member("pg-1", Role::Replica, Some(NEW)),
        ];
        assert!(plan(NEW, &members, ReplicationModel::PrimaryReplica).is_empty());
    }

    #[test]
    fn the_primary_goes_first_alone_then_the_replicas() {
        let members = [
            member("pg-0", Role::Replica, Some(OLD)),
            member("pg-1", Role::Primary, Some(OLD)),
            member("pg-2", Role::Replica, Some(NEW)),
        ];
        let p = plan(NEW, &members, ReplicationModel::PrimaryReplica);
        assert_eq!(p.first.as_deref(), Some("pg-1"));
        assert_eq!(p.then, names(&["pg-0"]));
    }

    #[test]
    fn replicas_wait_for_a_primary_that_must_restart_first() {
        let mut primary = member("pg-0", Role::Primary, Some(NEW));
        let s = primary.status.as_mut().unwrap();
        s.pending_restart = true;
        s.restart_primary_first = true;
        let members = [primary.clone(), member("pg-1", Role::Replica, Some(OLD))];
        let p = plan(NEW, &members, ReplicationModel::PrimaryReplica);
        assert!(p.first.is_none() && p.then.is_empty());
        assert!(p.waiting.unwrap().contains("pg-0 (primary) must restart"));
        // A pending restart of another kind (raised shared_buffers) does
        // not hold them.
        primary.status.as_mut().unwrap().restart_primary_first = false;
        let members = [primary, member("pg-1", Role::Replica, Some(OLD))];
        let p = plan(NEW, &members, ReplicationModel::PrimaryReplica);
        assert_eq!(p.then, names(&["pg-1"]));
    }

    #[test]
    fn no_primary_no_reconfigure() {
        let members = [
            member("pg-0", Role::Replica, Some(OLD)),
            member("pg-1", Role::Unknown, Some(OLD)),
        ];
        let p = plan(NEW, &members, ReplicationModel::PrimaryReplica);
        assert!(p.first.is_none() && p.then.is_empty() && p.waiting.is_some());
    }

    #[test]
    fn multi_writer_members_all_at_once_and_unknowns_left_alone() {
        let mut preparing = member("px-2", Role::Unknown, Some(OLD));
        preparing.status.as_mut().unwrap().process = ProcessState::Preparing;
        let members = [
            member("px-0", Role::Member, Some(OLD)),
            member("px-1", Role::Member, None),
            preparing,
            ObservedMember {
                name: "px-3".into(),
                status: None,
                error: Some("unreachable".into()),
            },
            member("px-4", Role::Member, Some(OLD)),
        ];
        let p = plan(NEW, &members, ReplicationModel::MultiWriter);
        assert_eq!(p.then, names(&["px-0", "px-4"]));
        assert!(p.first.is_none());
    }

    #[test]
    fn replies_are_described_for_events() {
        let reply = json!({"changed": ["work_mem"], "restart": false});
        assert_eq!(
            describe_reply("pg-1", &reply),
            "pg-1 took the new settings (work_mem)"
        );
        let reply = json!({
            "changed": ["max_connections"], "restart": true,
            "restartFor": ["max_connections"], "primaryFirst": true
        });
        let note = describe_reply("pg-0", &reply);
        assert!(
            note.contains("restart pending for max_connections")
                && note.contains("must restart first"),
            "{note}"
        );
    }
}
