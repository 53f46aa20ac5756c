//! observe: reads the cluster's pods and credentials Secret from the watch
//! cache and asks each running instance manager for its status over HTTP.
//! IO: instance managers only (the cache is in memory).

use std::time::Duration;

use super::cache::Caches;
use super::decide::PodInfo;
use crate::build::{names, selector_labels};
use crate::engine::{EngineManifest, ObservedMember, ValidatedCluster};
use crate::instance::client::InstanceClient;
use crate::instance::config::PeerEndpoint;
use crate::instance::protocol::SECRET_KEY_API_TOKEN;
use crate::plan;

/// What observe saw.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// The cluster's instance pods (names within the spec's instances).
    pub pods: Vec<PodInfo>,
    /// One entry per instance name: the manager's report or why none.
    pub members: Vec<ObservedMember>,
}

/// Take the pods from the cache, then query the managers of running pods concurrently
/// (each bounded by `timeout`). Managers that do not answer are recorded
/// with their error: in a test API server without kubelets, or while pods
/// start, that is normal.
pub(crate) async fn observe(
    caches: &Caches,
    cluster: &ValidatedCluster,
    kind: &str,
    manifest: &EngineManifest,
    timeout: Duration,
) -> Observation {
    let ns = &cluster.meta.namespace;
    let name = &cluster.meta.name;
    let instance_names = cluster.instance_names();
    let mut pods: Vec<PodInfo> = caches
        .pods(ns, &selector_labels(name, kind))
        .iter()
        .map(|p| PodInfo::from_pod(p))
        .filter(|p| instance_names.contains(&p.name))
        .collect();
    // The store is a hash map: keep the ordinal order the API listed.
    pods.sort_by(|a, b| {
        let ord = |p: &PodInfo| super::decide::ordinal(name, &p.name);
        ord(a).cmp(&ord(b)).then_with(|| a.name.cmp(&b.name))
    });

    let reachable = reachable_endpoints(&plan::kubernetes_members(cluster, manifest), &pods);
    let mut reports = Vec::new();
    if !reachable.is_empty() {
        match read_token(caches, ns, name) {
            Some(token) => {
                let uid = cluster.meta.uid.clone().unwrap_or_default();
                reports = InstanceClient::new(token, uid, reachable, timeout)
                    .observe_all()
                    .await;
            }
            None => tracing::debug!("no {SECRET_KEY_API_TOKEN} in the credentials Secret yet"),
        }
    }
    let members = instance_names
        .iter()
        .map(|n| {
            reports
                .iter()
                .find(|r| &r.name == n)
                .cloned()
                .unwrap_or_else(|| ObservedMember {
                    name: n.clone(),
                    status: None,
                    error: Some(if pods.iter().any(|p| &p.name == n && p.reachable()) {
                        format!("no {SECRET_KEY_API_TOKEN} to authenticate with")
                    } else {
                        "pod is not running".to_string()
                    }),
                })
        })
        .collect();
    Observation { pods, members }
}

/// The instance managers the controller can ask, addressed by pod IP: the
/// members whose pod runs and has an IP, with `host` replaced by
/// `status.podIP`. The headless-Service DNS names of
/// [`plan::kubernetes_members`] resolve only inside the cluster (an operator
/// running outside it, or a resolver that lags a recreated pod, cannot use
/// them); CloudNativePG also reaches instance managers by pod IP. Peers
/// inside the cluster keep the DNS names (the instance config). Pure.
pub(crate) fn reachable_endpoints(members: &[PeerEndpoint], pods: &[PodInfo]) -> Vec<PeerEndpoint> {
    members
        .iter()
        .filter_map(|m| {
            let pod = pods.iter().find(|p| p.name == m.name && p.reachable())?;
            let ip = pod.pod_ip.clone()?;
            Some(PeerEndpoint {
                host: ip,
                ..m.clone()
            })
        })
        .collect()
}

/// The instance API token from the cached credentials Secret, if present.
fn read_token(caches: &Caches, ns: &str, cluster: &str) -> Option<String> {
    caches
        .secret(ns, &names::credentials_secret(cluster))
        .and_then(|s| s.data.as_ref()?.get(SECRET_KEY_API_TOKEN).cloned())
        .and_then(|b| String::from_utf8(b.0).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> PeerEndpoint {
        PeerEndpoint {
            name: name.into(),
            host: format!("{name}.pg-headless.ns.svc"),
            db_port: 5432,
            api_port: plan::POD_API_PORT,
            ports: Default::default(),
        }
    }

    fn pod(name: &str, ip: Option<&str>, phase: &str, deleting: bool) -> PodInfo {
        PodInfo {
            name: name.into(),
            phase: Some(phase.into()),
            pod_ip: ip.map(str::to_string),
            deleting,
            ..Default::default()
        }
    }

    #[test]
    fn instance_managers_are_reached_by_pod_ip() {
        let members = [
            member("pg-0"),
            member("pg-1"),
            member("pg-2"),
            member("pg-3"),
        ];
        let pods = [
            pod("pg-0", Some("10.1.0.7"), "Running", false),
            // Scheduled, no IP yet.
            pod("pg-1", None, "Pending", false),
            // Being deleted: its manager is going away.
            pod("pg-2", Some("10.1.0.9"), "Running", true),
            // pg-3 has no pod.
        ];
        let got = reachable_endpoints(&members, &pods);
        assert_eq!(
            got,
            vec![PeerEndpoint {
                host: "10.1.0.7".into(),
                ..member("pg-0")
            }],
            "only running pods with an IP, addressed by that IP on the API port"
        );
        assert_eq!(got[0].api_port, plan::POD_API_PORT);
    }

    #[test]
    fn no_pods_no_endpoints() {
        assert!(reachable_endpoints(&[member("pg-0")], &[]).is_empty());
    }
}
