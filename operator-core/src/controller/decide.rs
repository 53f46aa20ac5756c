//! decide: pure. From what observe saw (pods and instance-manager reports)
//! to where traffic goes and which pod labels must move. No IO.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use crate::build::{LABEL_ROLE, LABEL_ROUTE, ROUTE_RO, ROUTE_RW};
use crate::engine::{ObservedMember, Routing};
use crate::instance::protocol::Role;

/// What the controller needs to know about one instance pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Pod name (`<cluster>-<ordinal>`).
    pub name: String,
    /// The pod's `Ready` condition is `True`.
    pub ready: bool,
    /// `status.phase` (`Pending`, `Running`, …).
    pub phase: Option<String>,
    /// `status.podIP`, once assigned.
    pub pod_ip: Option<String>,
    /// Current labels.
    pub labels: BTreeMap<String, String>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl PodInfo {
    /// Extract the fields the controller uses from a pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        Self {
            name: pod.metadata.name.clone().unwrap_or_default(),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            phase: status.and_then(|s| s.phase.clone()),
            pod_ip: status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            deleting: pod.metadata.deletion_timestamp.is_some(),
        }
    }

    /// Whether the instance manager may answer (the pod runs and has an
    /// address).
    pub fn reachable(&self) -> bool {
        !self.deleting && self.pod_ip.is_some() && self.phase.as_deref() == Some("Running")
    }
}

/// The ordinal of `<cluster>-<ordinal>`.
pub fn ordinal(cluster: &str, pod: &str) -> Option<u32> {
    pod.strip_prefix(cluster)?.strip_prefix('-')?.parse().ok()
}

/// Where traffic goes. When at least one instance manager answered, the
/// engine's routing over the observed members decides (restricted to pods
/// that exist and are not being deleted). When none answered (instance API
/// unreachable, e.g. no kubelet in tests or the operator cut off by a
/// NetworkPolicy), fall back to pod readiness: the previous writer if its
/// pod is ready, else the ready pod of ordinal 0; every other ready pod
/// reads.
pub fn decide_routing(
    cluster: &str,
    engine_routing: Routing,
    members: &[ObservedMember],
    pods: &[PodInfo],
    previous_primary: Option<&str>,
    multi_writer: bool,
) -> Routing {
    let live = |name: &str| pods.iter().any(|p| p.name == name && !p.deleting);
    if members.iter().any(|m| m.status.is_some()) {
        let mut engine_routing = engine_routing;
        // Any routable member of a multi-writer group (Galera) can take
        // writes: keep the writer where it is while the engine still routes
        // to it, so that a returning lower ordinal does not take writes
        // back (sessions on two writers conflict at certification).
        if multi_writer
            && let Some(prev) = previous_primary.filter(|p| live(p))
            && engine_routing.rw.as_deref() != Some(prev)
            && engine_routing.ro.iter().any(|r| r == prev)
        {
            let old = engine_routing.rw.replace(prev.to_string());
            engine_routing.ro.retain(|r| r != prev);
            engine_routing.ro.extend(old);
        }
        let rw = engine_routing.rw.filter(|n| live(n));
        let mut ro: Vec<String> = Vec::new();
        for name in engine_routing.ro {
            if live(&name) && Some(&name) != rw.as_ref() && !ro.contains(&name) {
                ro.push(name);
            }
        }
        return Routing { rw, ro };
    }
    let ready = |name: &str| {
        pods.iter()
            .any(|p| p.name == name && p.ready && !p.deleting)
    };
    let rw = previous_primary
        .filter(|p| ready(p))
        .map(str::to_string)
        .or_else(|| {
            pods.iter()
                .find(|p| p.ready && !p.deleting && ordinal(cluster, &p.name) == Some(0))
                .map(|p| p.name.clone())
        });
    let ro = pods
        .iter()
        .filter(|p| p.ready && !p.deleting && Some(&p.name) != rw.as_ref())
        .map(|p| p.name.clone())
        .collect();
    Routing { rw, ro }
}

/// The labels a pod should carry: the route (`rw`, `ro`, or none) and the
/// observed role (`unknown` when its manager did not answer).
pub fn desired_pod_labels(
    pod: &str,
    routing: &Routing,
    members: &[ObservedMember],
) -> (Option<&'static str>, &'static str) {
    let route = if routing.rw.as_deref() == Some(pod) {
        Some(ROUTE_RW)
    } else if routing.ro.iter().any(|r| r == pod) {
        Some(ROUTE_RO)
    } else {
        None
    };
    let role = members
        .iter()
        .find(|m| m.name == pod)
        .map(ObservedMember::role)
        .unwrap_or(Role::Unknown);
    (route, role.as_str())
}

/// Merge patches (`{"metadata":{"labels":…}}`) for the pods whose route or
/// role label differs from the desired one; a removed route is `null`.
/// Pods being deleted are left alone.
pub fn label_patches(
    pods: &[PodInfo],
    routing: &Routing,
    members: &[ObservedMember],
) -> Vec<(String, Value)> {
    pods.iter()
        .filter(|p| !p.deleting)
        .filter_map(|p| {
            let (route, role) = desired_pod_labels(&p.name, routing, members);
            let current_route = p.labels.get(LABEL_ROUTE).map(String::as_str);
            let current_role = p.labels.get(LABEL_ROLE).map(String::as_str);
            let mut labels = serde_json::Map::new();
            if current_route != route {
                labels.insert(LABEL_ROUTE.into(), route.map_or(Value::Null, Value::from));
            }
            if current_role != Some(role) {
                labels.insert(LABEL_ROLE.into(), Value::from(role));
            }
            (!labels.is_empty()).then(|| (p.name.clone(), json!({"metadata": {"labels": labels}})))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::protocol::MemberStatus;

    fn pod(name: &str, ready: bool) -> PodInfo {
        PodInfo {
            name: name.into(),
            ready,
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.1".into()),
            ..Default::default()
        }
    }

    fn unreachable(name: &str) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: None,
            error: Some("connection refused".into()),
        }
    }

    fn reporting(name: &str, role: Role) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role,
                ready: true,
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn ordinal_parses_only_this_clusters_pods() {
        assert_eq!(ordinal("simple-pg", "simple-pg-0"), Some(0));
        assert_eq!(ordinal("simple-pg", "simple-pg-12"), Some(12));
        assert_eq!(ordinal("simple-pg", "simple-pg-x"), None);
        assert_eq!(ordinal("simple", "simple-pg-0"), None);
    }

    #[test]
    fn engine_routing_wins_when_a_member_reports() {
        let pods = [pod("simple-pg-0", true), pod("simple-pg-1", true)];
        let members = [
            unreachable("simple-pg-0"),
            reporting("simple-pg-1", Role::Primary),
        ];
        let engine = Routing {
            rw: Some("simple-pg-1".into()),
            ro: vec!["simple-pg-0".into(), "simple-pg-1".into(), "gone-9".into()],
        };
        let r = decide_routing(
            "simple-pg",
            engine,
            &members,
            &pods,
            Some("simple-pg-0"),
            false,
        );
        assert_eq!(r.rw.as_deref(), Some("simple-pg-1"));
        assert_eq!(r.ro, ["simple-pg-0"]);
    }

    #[test]
    fn a_multi_writer_group_keeps_its_writer() {
        let pods = [pod("db-0", true), pod("db-1", true), pod("db-2", true)];
        let members = [
            reporting("db-0", Role::Primary),
            reporting("db-1", Role::Primary),
            reporting("db-2", Role::Primary),
        ];
        // The engine prefers the lowest ordinal, back after a restart.
        let engine = || Routing {
            rw: Some("db-0".into()),
            ro: vec!["db-1".into(), "db-2".into()],
        };
        let r = decide_routing("db", engine(), &members, &pods, Some("db-1"), true);
        assert_eq!(r.rw.as_deref(), Some("db-1"));
        assert_eq!(r.ro, ["db-2", "db-0"]);
        // Not for a single-primary engine: its routing is the primary.
        let r = decide_routing("db", engine(), &members, &pods, Some("db-1"), false);
        assert_eq!(r.rw.as_deref(), Some("db-0"));
        // Nor when the previous writer is no longer routable.
        let unroutable = Routing {
            rw: Some("db-0".into()),
            ro: vec!["db-2".into()],
        };
        let r = decide_routing("db", unroutable, &members, &pods, Some("db-1"), true);
        assert_eq!(r.rw.as_deref(), Some("db-0"));
        assert_eq!(r.ro, ["db-2"]);
    }

    #[test]
    fn fallback_prefers_previous_writer_then_ordinal_zero() {
        let members = [unreachable("simple-pg-0"), unreachable("simple-pg-1")];
        let pods = [pod("simple-pg-0", true), pod("simple-pg-1", true)];
        let r = decide_routing(
            "simple-pg",
            Routing::default(),
            &members,
            &pods,
            None,
            false,
        );
        assert_eq!(r.rw.as_deref(), Some("simple-pg-0"));
        assert_eq!(r.ro, ["simple-pg-1"]);

        let r = decide_routing(
            "simple-pg",
            Routing::default(),
            &members,
            &pods,
            Some("simple-pg-1"),
            false,
        );
        assert_eq!(r.rw.as_deref(), Some("simple-pg-1"));
        assert_eq!(r.ro, ["simple-pg-0"]);

        // Ordinal 0 not ready: no writer, readers only.
        let pods = [pod("simple-pg-0", false), pod("simple-pg-1", true)];
        let r = decide_routing(
            "simple-pg",
            Routing::default(),
            &members,
            &pods,
            None,
            false,
        );
        assert_eq!(r.rw, None);
        assert_eq!(r.ro, ["simple-pg-1"]);
    }

    #[test]
    fn label_patches_only_for_differences() {
        let routing = Routing {
            rw: Some("simple-pg-0".into()),
            ro: vec!["simple-pg-1".into()],
        };
        let members = [
            reporting("simple-pg-0", Role::Primary),
            reporting("simple-pg-1", Role::Replica),
            unreachable("simple-pg-2"),
        ];
        let mut p0 = pod("simple-pg-0", true);
        p0.labels = BTreeMap::from([
            (LABEL_ROUTE.into(), "rw".into()),
            (LABEL_ROLE.into(), "primary".into()),
        ]);
        let mut p1 = pod("simple-pg-1", true);
        p1.labels = BTreeMap::from([
            (LABEL_ROUTE.into(), "rw".into()),
            (LABEL_ROLE.into(), "primary".into()),
        ]);
        let mut p2 = pod("simple-pg-2", false);
        p2.labels = BTreeMap::from([(LABEL_ROUTE.into(), "ro".into())]);
        let mut p3 = pod("simple-pg-3", false);
        p3.deleting = true;

        let patches = label_patches(&[p0, p1, p2, p3], &routing, &members);
        assert_eq!(
            patches,
            [
                (
                    "simple-pg-1".to_string(),
                    json!({"metadata": {"labels": {LABEL_ROUTE: "ro", LABEL_ROLE: "replica"}}})
                ),
                (
                    "simple-pg-2".to_string(),
                    json!({"metadata": {"labels": {LABEL_ROUTE: null, LABEL_ROLE: "unknown"}}})
                ),
            ]
        );
    }

    #[test]
    fn pod_info_reads_ready_condition() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "simple-pg-0", "labels": {"a": "b"}},
            "status": {
                "phase": "Running",
                "podIP": "10.1.2.3",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True"}
                ]
            }
        }))
        .unwrap();
        let info = PodInfo::from_pod(&pod);
        assert!(info.ready && info.reachable());
        assert_eq!(info.labels["a"], "b");

        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "simple-pg-1"},
            "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}
        }))
        .unwrap();
        let info = PodInfo::from_pod(&pod);
        assert!(!info.ready && !info.reachable());
    }
}
